"""Samples at evaluation scale: 50,000 class-conditional images in resumable chunks.

The reference's protocol (its sample_ddp.py, after DiT's): every image gets a
class drawn uniformly at random, the prompt "Please generate an image of
{name}.", guidance against the empty prompt (its default scale 1.5, on eps
channels 0-2 only: `guided_channels=3`), DDPM with the learned variance
(20 respaced steps there; any respacing here), EMA weights; the images end
as ADM's sample npz (`arr_0` uint8 [N, H, W, C], `arr_1` the labels). Which
steps, scale and channels a metric samples with is its evaluator's
(registry.sampling_protocol). `balanced=True`
gives every class the same count instead (N a multiple of the class count
gets exactly N / classes each), shuffled, so a chunk is not one class.
With `prompts` (free text, e.g. COCO captions from evaluate's --prompts
file) sample i draws prompt i mod P instead, and its "label" in the npz is
that prompt's index.

The run is cut into chunks of `chunk_size` images (a multiple of the device
count: `default_chunk_size`, `check_chunk_size`). Chunk i's labels are the
run's labels [i*c, (i+1)*c) (drawn once from `seed`) and its noise comes from
a seed of its own, (seed, i), so a chunk's images do not depend on which
chunks ran before it or in this process: a run killed at any point and run
again with the same folder samples only the chunks that are missing and ends
with the same npz, byte for byte, as an uninterrupted run. Each chunk is
written whole (a temporary file, then renamed) by process 0. `run.json`
binds the folder to its checkpoint (the resolved path, step, weights and the
fingerprint of that save, checkpoints.fingerprint) and holds the settings: a
folder holding samples of another checkpoint, other weights or other
settings is refused rather than mixed or scored as this one's, and a chunk
that is not whole or not this run's is set aside and sampled again. Every
chunk is sampled by every process together (the batch is sharded over all
devices of the mesh); the last one is padded to the chunk size (one compiled
program) and the padding dropped.

Latent samples are decoded by the SD-VAE on the devices in batches of
`decode_batch`; pixels are quantised as the reference does
(clip(127.5 x + 128) truncated to uint8, i.e. x in [-1, 1] rounded to 0..255).
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from monoformer_jax import inference
from monoformer_jax.checkpoints import fingerprint, resolve
from monoformer_jax.config.fields import check_image_sampling, integer
from monoformer_jax.config.schema import max_sampling_steps, sampler_for
from monoformer_jax.data import prompts as prompt_format
from monoformer_jax.data.datasets import class_names
from monoformer_jax.errors import ConfigError, FileFormatError, UserError
from monoformer_jax.eval.fid import NpzReader
from monoformer_jax.parallel import distributed
from monoformer_jax.paths import whole_file

SAMPLES_FILE = "samples.npz"
CHUNKS_DIR = "chunks"
RUN_FILE = "run.json"
CHUNK_TARGET = 500  # images per chunk, about: minutes of work a restart may lose


def _whole_batches(num_samples: int, devices: int) -> int:
  """`num_samples` rounded up to a multiple of `devices`: the biggest chunk
  that is not mostly padding."""
  return -(-num_samples // devices) * devices


def default_chunk_size(num_samples: int | None = None, devices: int | None = None) -> int:
  """The largest multiple of the device count (`devices`, default
  jax.device_count()) not above CHUNK_TARGET, the device count itself where
  that is more (one image per device): 500 on 1, 4 or 5 devices, 496 on 8,
  480 on 32, 512 on 512; but no more than `num_samples` take (rounded up
  to the device count), as a chunk is padded to its size."""
  devices = jax.device_count() if devices is None else devices
  size = max(1, CHUNK_TARGET // devices) * devices
  return size if num_samples is None else min(size, _whole_batches(num_samples, devices))


def check_chunk_size(
  chunk_size: int, num_samples: int | None = None, flag: str = "--chunk_size"
) -> int:
  """`chunk_size` checked: a positive multiple of the device count, so a
  chunk's batch splits over every device (each draws the same share), and
  (given `num_samples`) not more than they take: the last chunk is padded
  to the chunk size, so a bigger one would draw padding (or never fit)."""
  fix = f"pass e.g. {flag}={default_chunk_size(num_samples)}"
  integer(flag, chunk_size, low=1, fix=fix)
  devices = jax.device_count()
  if chunk_size % devices:
    below = chunk_size // devices * devices
    near = [n for n in (below, below + devices) if n]
    raise ConfigError(
      f"{flag}={chunk_size} does not split over the {devices} devices: use a multiple of "
      f"{devices} (e.g. {' or '.join(map(str, near))}), or leave {flag} out for "
      f"{default_chunk_size(num_samples)}"
    )
  if num_samples is not None and chunk_size > _whole_batches(num_samples, devices):
    most = _whole_batches(num_samples, devices)
    raise ConfigError(
      f"{flag}={chunk_size} is more than --num_samples={num_samples} take: every chunk is "
      f"padded to {chunk_size} images, the padding drawn and dropped; pass at most {most} "
      f"(the samples rounded up to the {devices} devices), or leave {flag} out"
    )
  return int(chunk_size)


def class_labels(
  num_samples: int, num_classes: int, *, seed: int, balanced: bool = False
) -> np.ndarray:
  """int32 [N] labels: uniform draws (the reference), or each class the same
  number of times (the first N % classes classes one more), shuffled."""
  rng = np.random.default_rng([seed, 0x1ABE1])
  if balanced:
    labels = np.arange(num_samples) % num_classes
    return rng.permutation(labels).astype(np.int32)
  return rng.integers(0, num_classes, num_samples).astype(np.int32)


def prompt_labels(num_samples: int, num_prompts: int) -> np.ndarray:
  """int32 [N]: sample i draws prompt i mod P, the prompts in their order and
  repeated when fewer than the samples (as the reference's sample_t2i.py)."""
  return (np.arange(num_samples) % num_prompts).astype(np.int32)


def prompts_digest(prompts) -> dict:
  """What run.json records of a run's free prompts: their count and sha256."""
  import hashlib

  text = "\n".join(prompts).encode("utf-8")
  return dict(count=len(prompts), sha256=hashlib.sha256(text).hexdigest())


def chunk_seed(seed: int, index: int) -> int:
  """The sampler's seed for chunk `index` of a run seeded `seed`."""
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


def quantize(images_unit_BxHxWxC) -> np.ndarray:
  """[0, 1] float images as uint8, rounded as the reference's
  clamp(127.5 x + 128, 0, 255).to(uint8) rounds x = 2 u - 1."""
  u = np.asarray(images_unit_BxHxWxC, np.float32)
  return np.clip(np.floor(255.0 * u + 0.5), 0, 255).astype(np.uint8)


@jax.jit
def _decode(graphdef, state, latents_BxhxwxC):
  from monoformer_jax.vae import decode_latents

  pixels = decode_latents(nnx.merge(graphdef, state), latents_BxhxwxC)
  return jnp.clip((pixels + 1.0) / 2.0, 0.0, 1.0)


def decode_to_unit(x0_BxhxwxC, config, vae=None, decode_batch: int = 64) -> np.ndarray:
  """Samples in [0, 1] (float32 [B, H, W, C]): latents through the VAE,
  `decode_batch` at a time split over this host's devices (the VAE
  replicated on each; the last batch padded, so one program)."""
  if vae is None:
    return inference.to_pixels(x0_BxhxwxC, config, None)
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
  batch = -(-decode_batch // len(devices)) * len(devices)
  graphdef, state = nnx.split(vae)
  state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  x0 = np.asarray(x0_BxhxwxC, np.float32)
  out = []
  for start in range(0, len(x0), batch):
    part = x0[start : start + batch]
    padded = (
      np.concatenate([part, np.zeros((batch - len(part),) + part.shape[1:], part.dtype)])
      if len(part) < batch
      else part
    )
    pixels = _decode(graphdef, state, jax.device_put(padded, split))
    out.append(np.asarray(jax.device_get(pixels))[: len(part)])
  return np.concatenate(out)


def sample_shape(config, vae=None) -> tuple[int, int, int]:
  """(H, W, C) of the uint8 images `sample_classes` makes for a model of
  `config` (latents decoded by `vae`)."""
  side = int(config.model.image_size)
  if vae is None:
    return side, side, int(config.model.in_channels)
  side *= vae.config.downsample_factor
  return side, side, int(vae.config.out_channels)


def run_settings(
  config,
  *,
  checkpoint: str,
  step: int,
  weights: str,
  num_samples: int,
  chunk_size: int,
  num_steps: int,
  cfg_scale: float | None,
  sampler: str | None,
  seed: int,
  balanced: bool,
  guided_channels: int | None = None,
  prompts=None,
) -> dict:
  """The settings of a run of `checkpoint`'s `step` (its `weights`), checked
  before any model is loaded: what the folder's run.json records (the
  checkpoint's fingerprint is added when the folder is bound, `bind_folder`).
  `prompts`: free-text prompts instead of the config's classes (their digest
  is recorded, so a folder never resumes with other prompts)."""
  if prompts is None and not class_names(config):
    raise ConfigError(
      f"data.name={config.data.name!r} has no class names to prompt with; "
      "class-conditional sampling needs a dataset with classes (e.g. "
      "imagenet)"
    )
  integer("--num_samples", num_samples, low=1)
  check_chunk_size(chunk_size, num_samples)
  integer("--seed", seed, low=0)
  # None: the objective's own sampler, recorded by name (a folder of one
  # sampler never resumes with another's images)
  sampler = sampler_for(config.diffusion.objective, sampler, "--sampler")
  check_image_sampling(
    num_steps=num_steps,
    cfg_scale=cfg_scale,
    num_timesteps=max_sampling_steps(config.diffusion),
    prefix="--",
  )
  if guided_channels is not None:
    channels = int(config.model.in_channels)
    integer(
      "guided_channels",
      guided_channels,
      low=1,
      high=channels,
      fix=f"the model has model.in_channels={channels}; None guides every channel",
    )
  directory, step = resolve(checkpoint, step)
  settings = dict(
    checkpoint=dict(
      path=directory if "://" in directory else os.path.abspath(directory),
      step=int(step),
      weights=weights,
    ),
    num_samples=int(num_samples),
    chunk_size=int(chunk_size),
    num_steps=int(num_steps),
    cfg_scale=float(cfg_scale or 0.0),
    # eps channels 0..n-1 guided (None: all): other images, so never resumed the other way
    guided_channels=None if guided_channels is None else int(guided_channels),
    sampler=sampler,
    seed=int(seed),
    balanced=bool(balanced),
    data=config.data.name,
    image_size=int(config.model.image_size),
    # --config may change how the same weights sample
    diffusion=config.diffusion.to_dict(),
    dtype=config.model.dtype,
  )
  if prompts is not None:  # only then: class runs' run.json stays as it was
    settings["prompts"] = prompts_digest(prompts)
  return json.loads(json.dumps(settings))  # as run.json reads back (lists, not tuples)


def _describe(record: dict) -> str:
  return (
    f"{record.get('path')} step {record.get('step')} ({record.get('weights')} weights, "
    f"fingerprint {record.get('fingerprint')})"
  )


def _bind(out_dir: str, settings: dict):
  """Makes `out_dir` the folder of this run, or checks that it is: one that
  holds samples of another checkpoint, other weights or other settings is
  refused rather than mixed; one that holds nothing sampled yet is taken."""
  ours = settings["checkpoint"]
  path = epath.Path(out_dir) / RUN_FILE
  chunks = epath.Path(out_dir) / CHUNKS_DIR
  sampled = (epath.Path(out_dir) / SAMPLES_FILE).exists() or any(
    p.name.startswith("chunk_") and p.name.endswith(".npz")
    for p in (chunks.iterdir() if chunks.is_dir() else ())
  )
  if sampled:
    try:
      before = {}
      if path.exists():
        before = json.loads(path.read_text())
      theirs = before.get("checkpoint") if isinstance(before, dict) else None
    except (OSError, ValueError) as e:
      raise FileFormatError(
        f"{path} cannot be read ({e}), so the samples in {out_dir} cannot be told "
        "apart from another run's: pass another --sample_dir, or delete the folder "
        "to sample again"
      ) from e
    if not isinstance(theirs, dict):
      raise ConfigError(
        f"{out_dir} holds samples but no {RUN_FILE} saying which checkpoint they are "
        f"of (an older version's folder?), so they cannot be scored as "
        f"{_describe(ours)}'s: pass another --sample_dir, or delete the folder to "
        f"sample again (a samples.npz in it can still be scored with --samples)"
      )
    same = ("fingerprint", "step", "weights")
    if [theirs.get(k) for k in same] != [ours[k] for k in same]:
      again = (
        "; it was saved again since (trained anew?)"
        if theirs.get("fingerprint") != ours["fingerprint"]
        and (theirs.get("path"), theirs.get("step")) == (ours["path"], ours["step"])
        else ""
      )
      raise ConfigError(
        f"{out_dir} holds samples of {_describe(theirs)}, not of {_describe(ours)}"
        f"{again}: pass another --sample_dir, or delete {out_dir} to sample it again"
      )
    if theirs.get("path") != ours["path"]:
      logging.info(
        "%s: samples of %s, the same checkpoint (fingerprint %s) as %s",
        out_dir,
        theirs.get("path"),
        ours["fingerprint"],
        ours["path"],
      )
    rest = {k: v for k, v in settings.items() if k != "checkpoint"}
    changed = {k: (before.get(k), v) for k, v in rest.items() if before.get(k) != v}
    if changed:
      flag = (
        " (guided_channels None is evaluate's --guide_all_channels)"
        if "guided_channels" in changed
        else ""
      )
      raise ConfigError(
        f"{out_dir} holds samples of another run (settings then -> now: {changed}); "
        f"pass the same settings{flag} to resume it, or another --sample_dir"
      )
    return
  chunks.mkdir(parents=True, exist_ok=True)
  with whole_file(path) as f:
    f.write(json.dumps(settings, indent=1).encode())


def bind_folder(out_dir: str, settings: dict) -> None:
  """Binds `out_dir` to the run of `settings` (`run_settings`): process 0
  adds the checkpoint's fingerprint and makes or checks the folder (`_bind`);
  every process raises if it refuses (so none waits for the others)."""
  refusal = None
  if jax.process_index() == 0:
    record = settings["checkpoint"]
    record["fingerprint"] = fingerprint(record["path"], record["step"])
    try:
      _bind(out_dir, settings)
    except UserError as e:
      if jax.process_count() == 1:
        raise
      refusal = str(e)
  refusal = distributed.all_gather_json(refusal)[0]
  if refusal:
    raise ConfigError(refusal)


def _chunk_path(out_dir: str, index: int) -> str:
  return os.path.join(out_dir, CHUNKS_DIR, f"chunk_{index:05d}.npz")


def _chunk_problem(path: str, labels_n, shape: tuple[int, ...]) -> str | None:
  """Why the chunk file at `path` is not a whole chunk of this run (its
  labels `labels_n`, images of `shape`), or None; reads the labels and only
  the images' header."""
  try:
    npz = NpzReader(path, "sample chunk")
    try:
      got = npz.read("labels")
      image_shape, dtype = npz.header("images")
    finally:
      npz.close()
  except UserError as e:
    return str(e)
  if not np.array_equal(got, labels_n):
    return "holds other labels than this run's"
  want = (len(labels_n),) + tuple(shape)
  if tuple(image_shape) != want or dtype != np.uint8:
    return f"holds {dtype} images {list(image_shape)}, not uint8 {list(want)}"
  return None


def _done_chunks(out_dir: str, labels_N, chunk_size: int, shape: tuple[int, ...]) -> list[int]:
  """The chunks already written whole (process 0 looks; every process
  agrees). A chunk file that cannot be read or is not this run's (another
  label or image shape) is set aside as chunk_NNNNN.npz.bad, with a
  warning, and sampled again."""
  done = []
  if jax.process_index() == 0:
    for i in range(-(-len(labels_N) // chunk_size)):
      path = _chunk_path(out_dir, i)
      if not epath.Path(path).exists():
        continue
      problem = _chunk_problem(path, labels_N[i * chunk_size : (i + 1) * chunk_size], shape)
      if problem:
        _set_aside(path, path + ".bad")
        logging.warning("%s: %s; set aside as %s.bad and sampled again", path, problem, path)
      else:
        done.append(i)
  return distributed.all_gather_json(done)[0]


def _set_aside(path: str, aside: str):
  """Moves the file `path` to `aside`: a rename on this machine; on a bucket a
  copy and a delete (what a rename there is), made explicit, as gcsfs first
  tries a move request that not every GCS server answers."""
  if "://" not in path:
    os.replace(path, aside)
    return
  epath.Path(path).copy(aside, overwrite=True)
  epath.Path(path).unlink()


def _write_npz(path: str, arrays: dict[str, tuple[tuple, np.dtype, Iterable[np.ndarray]]]):
  """An npz like np.savez's, each array written part by part as its parts
  are produced, so that 50,000 images never sit in memory at once. `arrays`
  maps a name to (the whole array's shape, dtype, an iterable of the parts
  that concatenate to it along axis 0)."""
  with (
    whole_file(path) as out,
    zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf,
  ):
    for name, (shape, dtype, parts) in arrays.items():
      with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(
          f,
          dict(
            descr=np.lib.format.dtype_to_descr(np.dtype(dtype)),
            fortran_order=False,
            shape=tuple(shape),
          ),
        )
        for part in parts:
          f.write(np.ascontiguousarray(part, dtype).tobytes())


def sample_classes(
  model,
  config,
  tokenizer,
  labels_N,
  *,
  num_steps: int,
  cfg_scale: float | None,
  seed: int,
  sampler: str | None = None,
  guided_channels: int | None = None,
  batch: int | None = None,
  vae=None,
  decode_batch: int = 64,
  prompts=None,
) -> np.ndarray:
  """uint8 [N, H, W, C] samples of the class prompts of `labels_N` (or, with
  `prompts`, of prompts[label]) (guided
  against the empty prompt unless `cfg_scale` is 0 or None, on eps channels
  [0, guided_channels) or, None, on all), on every
  process, the batch padded to `batch` rows (so that calls share one
  program) and the padding dropped. A sample that is not finite (a diverged
  model) is replaced by a blank image and counted in a warning."""
  labels_N = np.asarray(labels_N)
  n = len(labels_N)
  padded = np.concatenate([labels_N, np.zeros((batch or n) - n, labels_N.dtype)])
  if prompts is None:
    classes = class_names(config)
    text = [prompt_format.class_prompt(classes[k]) for k in padded]
  else:
    text = [prompts[k] for k in padded]
  x0 = inference.generate_images(
    model,
    tokenizer,
    text,
    num_steps=num_steps,
    sampler=sampler,
    cfg_scale=cfg_scale or None,
    guided_channels=guided_channels,
    seed=seed,
    config=config,
  )
  x0 = np.asarray(multihost_utils.process_allgather(x0, tiled=True))[:n]
  bad = ~np.isfinite(x0).reshape(n, -1).all(axis=1)
  if bad.any():
    logging.warning(
      "%d of %d samples are not finite (a diverged model?); each is replaced by a blank image",
      bad.sum(),
      n,
    )
    x0 = np.where(bad[:, None, None, None], -1.0 if vae is None else 0.0, x0)
  return quantize(decode_to_unit(x0, config, vae, decode_batch))


def sample_run(
  model,
  config,
  tokenizer,
  out_dir: str,
  *,
  checkpoint: str,
  step: int,
  num_steps: int,
  cfg_scale: float | None,
  guided_channels: int | None,
  weights: str = "ema",
  num_samples: int = 50_000,
  chunk_size: int | None = None,
  sampler: str | None = None,
  seed: int = 0,
  balanced: bool = False,
  vae=None,
  decode_batch: int = 64,
  stop_after: int | None = None,
  prompts=None,
) -> str:
  """Samples `num_samples` images of the config's classes (or of `prompts`,
  free text, sample i drawing prompt i mod P: `prompt_labels`) into `out_dir`
  (resuming what is there) and returns the path of its `samples.npz`.
  `num_steps`, `cfg_scale` and `guided_channels` are the metrics' protocol
  (registry.sampling_protocol); `chunk_size` None is `default_chunk_size`'s.

  `model` holds the `weights` of `checkpoint`'s `step`: the folder is bound
  to them (`bind_folder`), so it resumes only for the same save of that
  checkpoint. Every process calls it; process 0 writes. `stop_after` ends
  the call after that many new chunks (what a killed run leaves behind; for
  tests)."""
  if chunk_size is None:
    chunk_size = default_chunk_size(num_samples)
  settings = run_settings(
    config,
    checkpoint=checkpoint,
    step=step,
    weights=weights,
    num_samples=num_samples,
    chunk_size=chunk_size,
    num_steps=num_steps,
    cfg_scale=cfg_scale,
    sampler=sampler,
    seed=seed,
    balanced=balanced,
    guided_channels=guided_channels,
    prompts=prompts,
  )
  bind_folder(out_dir, settings)
  sampler = settings["sampler"]
  writer = jax.process_index() == 0
  shape = sample_shape(config, vae)
  if prompts is None:
    classes = class_names(config)
    labels = class_labels(num_samples, len(classes), seed=seed, balanced=balanced)
  else:
    classes = prompts
    labels = prompt_labels(num_samples, len(prompts))
  count = -(-num_samples // chunk_size)
  done = set(_done_chunks(out_dir, labels, chunk_size, shape))
  todo = [i for i in range(count) if i not in done]
  if done:
    logging.info(
      "%s: %d of %d chunks already sampled, %d to go", out_dir, len(done), count, len(todo)
    )
  logging.info(
    "sampling %d images of %d %s in %d chunks of %d: %s, %d steps, guidance %s%s, %s weights",
    num_samples,
    len(classes),
    "classes" if prompts is None else "prompts",
    count,
    chunk_size,
    sampler,
    num_steps,
    cfg_scale or "off",
    f" on eps channels 0-{guided_channels - 1}" if cfg_scale and guided_channels else "",
    weights,
  )
  t_start = time.perf_counter()
  new = 0
  stopped = False
  with tqdm.tqdm(
    total=num_samples,
    initial=min(len(done) * chunk_size, num_samples),
    unit="img",
    desc="sampling",
    disable=not writer,
  ) as bar:
    for i in todo:
      if stop_after is not None and new >= stop_after:
        stopped = True
        break
      chunk_labels = labels[i * chunk_size : (i + 1) * chunk_size]
      images = sample_classes(
        model,
        config,
        tokenizer,
        chunk_labels,
        num_steps=num_steps,
        cfg_scale=cfg_scale,
        seed=chunk_seed(seed, i),
        sampler=sampler,
        guided_channels=guided_channels,
        batch=chunk_size,
        vae=vae,
        decode_batch=decode_batch,
        prompts=prompts,
      )
      if writer:
        path = _chunk_path(out_dir, i)
        with whole_file(path) as f:  # one object on a bucket: whole or absent
          np.savez(f, images=images, labels=chunk_labels)
      new += 1
      bar.update(len(chunk_labels))
      rate = new * chunk_size / (time.perf_counter() - t_start)
      bar.set_postfix_str(f"chunk {i + 1}/{count}")
      logging.info("chunk %d/%d written (%.2f images/s)", i + 1, count, rate)
  if stopped:
    return ""
  out = os.path.join(out_dir, SAMPLES_FILE)
  if writer:

    def chunk_images():  # one chunk in memory at a time
      for i in range(count):
        with epath.Path(_chunk_path(out_dir, i)).open("rb") as f, np.load(f) as chunk:
          yield chunk["images"]

    # The chunks hold these labels and images of `shape` (_done_chunks, or written above).
    _write_npz(
      out,
      dict(
        arr_0=((num_samples,) + shape, np.uint8, chunk_images()),
        arr_1=((num_samples,), labels.dtype, [labels]),
      ),
    )
    logging.info("wrote %s: arr_0 uint8 %s, arr_1 labels", out, (num_samples,) + shape)
  return out
