"""The image side of dataset preparation: files -> cropped pixels -> SD-VAE latents.

    items = imagenet_items("/data/imagenet", "train")   # a source's reader (data/sources/)
    report = encode_items(items, load_vae(vae_dir), "/data/latents/train", image_size=256,
                          flip=True)
    print(report.summary())
    for example in read_chunks("/data/latents/train"):     # the TFDS builder's loop
      ...

`encode_items` writes `chunk_{k:06d}.npz` files of `chunk_size` items each
(chunk k holds items[k*chunk_size:(k+1)*chunk_size] minus the unreadable ones)
and `encode_manifest.json`; rerun with the same arguments and it encodes only
the chunks that are not there yet. Each chunk holds the posterior of the
*scaled* latent, `mean` and `std` (float32 [n, h/f, w/f, C]), so a training
latent is `mean + std * eps`. On several hosts each one calls `encode_items`
with the same items and encodes the chunks k with k % process_count ==
process_index; `read_chunks` and `chunk_report` then see every host's chunks
(the folder must be shared: a bucket, `gs://...`, will do: every file here is
one object, written whole, so a chunk cut short is never there to be read).

Images are read by the project's one reader (vision/images.py `load_image`, with
`orient=False`: no EXIF orientation, as the reference reads them; alpha on
white, 16-bit scaled; a file it cannot read is skipped and listed; an image
inside an archive is read by its byte range, `ImageItem.span`) and cropped
by `adm_center_crop`, the ADM/DiT rule the reference uses.
Which images, with which fields, is the sources' business (ImageNet's folders
or tars and JourneyDB's annotations are read in data/sources/imagenet.py and
text_to_image.py).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import glob
import hashlib
import io
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image
from tqdm import tqdm

from monoformer_jax.config.fields import integer
from monoformer_jax.errors import (
  ConfigError,
  DoesNotFitError,
  FileFormatError,
  MissingPathError,
  PathError,
)
from monoformer_jax.paths import is_local, read_range, whole_file
from monoformer_jax.vision.images import UnreadableImage, checked_resize, load_image

MANIFEST = "encode_manifest.json"
MANIFEST_FORMAT = 1
# Chunk arrays that are not per-item fields; ImageItem.fields may not use these names.
RESERVED = ("keys", "mean", "std", "mean_flip", "std_flip", "skipped", "skip_reasons")
# Manifest entries that must match for a rerun to reuse the chunks already written.
RESUME_FIELDS = (
  "format",
  "num_items",
  "chunk_size",
  "keys_sha256",
  "field_names",
  "image_size",
  "flip",
  "latent_shape",
  "scaling_factor",
  "shift_factor",
)
MAX_NAMES = 20  # skipped files a summary names


# --- Images -----------------------------------------------------------------------------


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
  """The ADM/DiT center crop: halve with BOX while the short side is >= 2*size,
  BICUBIC-resize the short side to `size`, crop the centre size x size; RGB."""
  if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
    raise ConfigError(f"crop size={size!r} must be a positive integer (e.g. 256)")
  if image.mode != "RGB":
    image = image.convert("RGB")
  while min(image.size) >= 2 * size:
    w, h = image.size
    image = image.resize((w // 2, h // 2), resample=Image.BOX)
  w, h = image.size
  scale = size / min(w, h)
  image = checked_resize(image, (round(w * scale), round(h * scale)), Image.BICUBIC)
  w, h = image.size
  left, top = (w - size) // 2, (h - size) // 2
  return image.crop((left, top, left + size, top + size))


# --- Items ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageItem:
  """One example to encode: its unique key, its image file and its other fields.

  An image inside an archive (ImageNet's tars) has `path` the archive, `member`
  its name there and `span` = (offset, size) of its bytes in `path`: it is read
  by that one byte range (paths.read_range; one ranged request on a bucket), so
  nothing is extracted and each host reads only its own chunks' images."""

  key: str
  path: str
  fields: dict = dataclasses.field(default_factory=dict)  # e.g. {"label": 3, "wnid": ...}
  member: str | None = None
  span: tuple[int, int] | None = None

  @property
  def source(self) -> str:
    """Where the image is, as the skipped lists name it: the file, or `archive:member`."""
    return self.path if self.member is None else f"{self.path}:{self.member}"


def read_item(item: ImageItem) -> Image.Image:
  """The item's image as `load_image(..., orient=False)` reads it (as the reference
  reads ImageNet); UnreadableImage when it cannot be read."""
  if item.span is None:
    return load_image(item.path, orient=False)
  offset, size = item.span
  try:
    data = read_range(item.path, offset, size)
  except OSError as e:
    raise UnreadableImage(
      item.source, f"its bytes cannot be read ({e})", "check the archive"
    ) from e
  if len(data) < size:
    raise UnreadableImage(
      item.source,
      f"only {len(data)} of its {size} bytes are there (the archive is cut short)",
      "download the archive again",
    )
  return load_image(data, orient=False)


# --- Reports ----------------------------------------------------------------------------


@dataclasses.dataclass
class EncodeReport:
  """What an encoding run (or the chunk files) hold; `summary()` for the log."""

  encoded: int = 0  # images in the chunks
  skipped: list = dataclasses.field(default_factory=list)  # (path, reason): unreadable
  missing: list = dataclasses.field(default_factory=list)  # paths not there (the caller's)
  chunks_written: int = 0
  chunks_reused: int = 0  # there from an earlier run
  missing_chunks: list = dataclasses.field(default_factory=list)  # chunk_report: not written

  def summary(self, listed: str | None = None) -> str:
    """One line; `listed`: the file that lists every skipped and missing image
    (`write_skipped`), named when there are any."""
    chunks = self.chunks_written + self.chunks_reused
    text = (
      f"encoded {self.encoded} images in {chunks} chunks ({self.chunks_reused} reused); "
      f"skipped {len(self.skipped)}"
    )
    text += _names(f"{path} ({_reason(path, reason)})" for path, reason in self.skipped)
    if self.missing:
      text += f"; missing {len(self.missing)}" + _names(self.missing)
    if listed and (self.skipped or self.missing):
      text += f"; all of them listed in {listed}"
    if self.missing_chunks:
      text += (
        f"; {len(self.missing_chunks)} chunks not written yet: "
        + ", ".join(map(str, self.missing_chunks[:MAX_NAMES]))
        + (
          f" and {len(self.missing_chunks) - MAX_NAMES} more"
          if len(self.missing_chunks) > MAX_NAMES
          else ""
        )
      )
    return text

  def nothing_encoded(self, what: str, listed: str | None) -> FileFormatError:
    """The error for an encoding of `what` ("imagenet/train") that holds no image."""
    total = len(self.skipped) + len(self.missing)
    if not total:
      return FileFormatError(f"{what}: there are no images to encode; check the input")
    shown = [f"{p} ({_reason(p, r)})" for p, r in self.skipped[:3]]
    shown += [f"{p} (not there)" for p in self.missing[: 3 - len(shown)]]
    return FileFormatError(
      f"{what}: none of its {total} images could be read"
      + (
        f" ({len(self.skipped)} unreadable, {len(self.missing)} not there)" if self.missing else ""
      )
      + f", e.g. {', '.join(shown)}"
      + (f"; all of them listed in {listed}" if listed else "")
      + "; fix or replace the files and run again (chunks are encoded again "
      "once their skipped files can be read)"
    )


def _reason(path: str, reason: str) -> str:
  """`reason` without the path that PIL's messages repeat."""
  return " ".join(reason.replace(f"'{path}'", "").replace(path, "").split()) or reason


SKIPPED_LIST = "skipped.tsv"


def write_skipped(output_dir, report: EncodeReport) -> None:
  """Writes every skipped image (path, tab, reason) and every missing one
  (path, tab, "not there") of `report` to output_dir/skipped.tsv, under a
  header line; removes an older list when nothing was skipped."""
  path = _join(output_dir, SKIPPED_LIST)
  rows = [(p, r) for p, r in report.skipped] + [(p, "not there") for p in report.missing]
  if not rows:
    epath.Path(path).unlink(missing_ok=True)
    return
  text = "".join(f"{p}\t{' '.join(str(r).split())}\n" for p, r in rows)
  _atomic_write(path, lambda file: file.write(("path\treason\n" + text).encode()))


def _names(names: Iterable[str]) -> str:
  names = list(names)
  if not names:
    return ""
  text = ": " + ", ".join(names[:MAX_NAMES])
  return text + (f", and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else "")


# --- Chunk files ------------------------------------------------------------------------


def _join(folder, name: str) -> str:
  """folder/name, for a local folder or a `gs://...` one."""
  folder = os.fspath(folder)
  return f"{folder.rstrip('/')}/{name}" if not is_local(folder) else os.path.join(folder, name)


def _exists(path: str) -> bool:
  return epath.Path(path).exists()


def chunk_path(output_dir, k: int) -> str:
  return _join(output_dir, f"chunk_{k:06d}.npz")


def _atomic_write(path: str, write) -> None:
  """write(file) into `path` whole or not at all (paths.whole_file: a renamed
  temporary file here, one upload on an object store); a failure is a PathError."""
  try:
    with whole_file(path) as file:
      write(file)
  except OSError as e:
    fix = (
      "check the folder is writable and has space"
      if is_local(path)
      else ("check the bucket and its permissions")
    )
    raise PathError(f"cannot write {path}: {e}; {fix}") from e


def _read_manifest(output_dir: str) -> dict | None:
  path = _join(output_dir, MANIFEST)
  if not _exists(path):
    return None
  try:
    manifest = json.loads(epath.Path(path).read_text(encoding="utf-8"))
    [manifest[name] for name in RESUME_FIELDS]
  except (ValueError, KeyError, TypeError) as e:
    raise FileFormatError(
      f"{path} is not an encode manifest ({e}); delete {output_dir} and encode again"
    ) from e
  return manifest


def _require_manifest(output_dir) -> dict:
  output_dir = os.fspath(output_dir)
  manifest = _read_manifest(output_dir)
  if manifest is None:
    raise MissingPathError(
      f"{_join(output_dir, MANIFEST)} is not there: "
      f"{output_dir} is not an encode_items output folder (or encoding "
      "has not started); run encode_items into it first"
    )
  return manifest


def _num_chunks(manifest: dict) -> int:
  return -(-manifest["num_items"] // manifest["chunk_size"])


def _load_chunk(path: str, arrays: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """The chunk's arrays (all, or the named ones); FileFormatError if it is broken."""
  try:
    source = io.BytesIO(epath.Path(path).read_bytes()) if not is_local(path) else path
    with np.load(source, allow_pickle=False) as f:
      return {name: f[name] for name in (f.files if arrays is None else arrays)}
  except FileNotFoundError:
    raise
  except Exception as e:  # not a zip (zipfile.BadZipFile), a member missing, cut short
    raise FileFormatError(
      f"chunk file {path} is broken ({type(e).__name__}: {e}); delete "
      "it and rerun encode_items, which encodes only the missing "
      "chunks"
    ) from e


def _count_into(report: EncodeReport, path: str) -> None:
  chunk = _load_chunk(path, ("keys", "skipped", "skip_reasons"))
  report.encoded += len(chunk["keys"])
  report.skipped.extend(zip(chunk["skipped"].tolist(), chunk["skip_reasons"].tolist()))


def read_chunks(output_dir) -> Iterator[dict[str, Any]]:
  """Every encoded example of `output_dir`, in item order: dicts of `key`,
  `mean`, `std` (and `mean_flip`, `std_flip`) and the items' fields.

  Raises MissingPathError naming a chunk that is not written (an interrupted
  run, or a host of a multi-host build that has not finished).
  """
  output_dir = os.fspath(output_dir)
  manifest = _require_manifest(output_dir)
  n = _num_chunks(manifest)
  for k in range(n):
    path = chunk_path(output_dir, k)
    if not _exists(path):
      hosts = manifest.get("process_count", 1)
      first = k * manifest["chunk_size"]
      last = min(first + manifest["chunk_size"], manifest["num_items"]) - 1
      raise MissingPathError(
        f"chunk {k} of {n} ({path}, items {first}..{last}) is not written: encoding was "
        f"interrupted, or process {k % hosts} of the {hosts}-host build has not finished; "
        "rerun encode_items with the same arguments (it encodes only missing chunks) or "
        "wait for that host"
      )
    chunk = _load_chunk(path)
    per_item = [name for name in chunk if name not in ("skipped", "skip_reasons")]
    for i in range(len(chunk["keys"])):
      example = {}
      for name in per_item:
        value = chunk[name][i]
        example["key" if name == "keys" else name] = value.item() if value.ndim == 0 else value
      yield example


def chunk_report(output_dir) -> EncodeReport:
  """The report of every chunk file of `output_dir` (all hosts, all runs so far);
  chunks not written yet are listed in `missing_chunks`."""
  output_dir = os.fspath(output_dir)
  manifest = _require_manifest(output_dir)
  report = EncodeReport()
  for k in range(_num_chunks(manifest)):
    path = chunk_path(output_dir, k)
    if _exists(path):
      _count_into(report, path)
      report.chunks_written += 1
    else:
      report.missing_chunks.append(k)
  return report


# --- Encoding ---------------------------------------------------------------------------


def _check_items(items: Sequence[ImageItem]) -> tuple[str, ...]:
  """The items' common field names; raises for duplicate keys or mixed fields."""
  field_names = tuple(sorted(items[0].fields)) if items else ()
  clash = sorted(set(field_names) & set(RESERVED))
  if clash:
    raise ConfigError(
      f"ImageItem fields {clash} clash with the chunk arrays {list(RESERVED)}; rename those fields"
    )
  for name in field_names:
    if np.asarray(items[0].fields[name]).dtype.kind == "O":
      raise ConfigError(
        f"ImageItem field {name!r} of item {items[0].key!r} is "
        f"{items[0].fields[name]!r}, which numpy cannot store without "
        "pickle; use numbers, strings or arrays"
      )
  seen = set()
  for item in items:
    if item.key in seen:
      raise ConfigError(
        f"two items have the key {item.key!r}; keys must be unique (they "
        "become the dataset's example keys)"
      )
    seen.add(item.key)
    if tuple(sorted(item.fields)) != field_names:
      raise ConfigError(
        f"item {item.key!r} has fields {sorted(item.fields)} but the first "
        f"item has {list(field_names)}; every item needs the same fields"
      )
  return field_names


def _manifest_for(items, field_names, vae, image_size, flip, chunk_size) -> dict:
  cfg = vae.config
  f = cfg.downsample_factor
  keys_sha256 = hashlib.sha256("\n".join(item.key for item in items).encode()).hexdigest()
  return dict(
    format=MANIFEST_FORMAT,
    num_items=len(items),
    chunk_size=chunk_size,
    keys_sha256=keys_sha256,
    field_names=list(field_names),
    image_size=image_size,
    flip=bool(flip),
    latent_shape=[image_size // f, image_size // f, cfg.latent_channels],
    scaling_factor=float(cfg.scaling_factor),
    shift_factor=float(cfg.shift_factor),
    process_count=jax.process_count(),
  )


def _make_encoder(vae, flip: bool):
  """(encode(pixels_uint8_BxHxWx3) -> dict of device arrays, device count): jitted,
  the batch split over a 1-D mesh of the local devices, the VAE replicated."""
  devices = jax.local_devices()
  mesh = Mesh(np.asarray(devices), ("batch",))
  batch, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  graphdef, state = nnx.split(vae)
  state = jax.device_put(state, replicated)
  cfg = vae.config

  def scaled_posterior(model, x_BxHxWx3):
    posterior = model.encode(x_BxHxWx3)
    mean_Bxhxwxc = (posterior.mean.astype(jnp.float32) - cfg.shift_factor) * cfg.scaling_factor
    std_Bxhxwxc = posterior.std.astype(jnp.float32) * cfg.scaling_factor
    return mean_Bxhxwxc, std_Bxhxwxc

  @functools.partial(jax.jit, in_shardings=(replicated, batch), out_shardings=batch)
  def run(state, pixels_BxHxWx3):
    model = nnx.merge(graphdef, state)
    x_BxHxWx3 = pixels_BxHxWx3.astype(jnp.float32) / 127.5 - 1.0
    out = dict(zip(("mean", "std"), scaled_posterior(model, x_BxHxWx3)))
    if flip:
      out["mean_flip"], out["std_flip"] = scaled_posterior(model, x_BxHxWx3[:, :, ::-1])
    return out

  def encode(pixels_BxHxWx3: np.ndarray):
    return run(state, jax.device_put(pixels_BxHxWx3, batch))

  return encode, len(devices)


def _prefetch(work: Iterable, fn, workers: int, depth: int) -> Iterator:
  """fn(x) for x in work, in order, computed by `workers` threads, `depth` ahead."""
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    try:
      for x in work:
        pending.append(pool.submit(fn, x))
        if len(pending) >= depth:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
    finally:
      for future in pending:
        future.cancel()


def encode_items(
  items: Sequence[ImageItem],
  vae,
  output_dir,
  *,
  image_size: int,
  flip: bool = False,
  batch_size: int = 32,
  chunk_size: int = 1024,
  progress: bool = True,
) -> EncodeReport:
  """Encode `items` into `output_dir/chunk_{k:06d}.npz`, skipping chunks already there.

  Pixels are `adm_center_crop(read_item(item), image_size)` as uint8 / 127.5 - 1;
  each chunk stores `keys`, `mean` and `std` of the scaled latent (float32
  [n, h/f, w/f, C]), with `flip` also `mean_flip` and `std_flip` of the mirrored
  image, every field as an array, and `skipped` / `skip_reasons` for its
  unreadable files (skipped, never fatal). Every batch is padded to one shape,
  `batch_size` rounded up to a multiple of the local device count, so the
  encoder compiles once. This process encodes the chunks k with
  k % process_count == process_index; the report covers those chunks.
  """
  items = list(items)
  image_size, batch_size, chunk_size = (
    integer(name, value, low=1, fix="encode_items takes positive sizes")
    for name, value in (
      ("image_size", image_size),
      ("batch_size", batch_size),
      ("chunk_size", chunk_size),
    )
  )
  f = vae.config.downsample_factor
  if image_size % f:
    raise ConfigError(
      f"encode_items image_size={image_size} must be a multiple of the "
      f"VAE's downsampling factor {f} (e.g. {max(f, image_size // f * f)})"
    )
  field_names = _check_items(items)
  output_dir = os.fspath(output_dir)
  if _exists(output_dir) and not epath.Path(output_dir).is_dir():
    raise PathError(f"encode_items output_dir {output_dir} is a file; give a folder")
  epath.Path(output_dir).mkdir(parents=True, exist_ok=True)

  manifest = _manifest_for(items, field_names, vae, image_size, flip, chunk_size)
  found = _read_manifest(output_dir)
  if found is not None:
    changed = [name for name in RESUME_FIELDS if found[name] != manifest[name]]
    if changed:
      details = ", ".join(
        f"{name}: {found[name]!r} there, {manifest[name]!r} now"
        for name in changed
        if name != "keys_sha256"
      )
      if "keys_sha256" in changed:
        details += (", " if details else "") + "the items (keys or order) differ"
      raise ConfigError(
        f"{output_dir} holds chunks of another encoding ({details}); encode "
        f"into a new folder, or delete {output_dir} to start over"
      )
  if found is None or found.get("process_count") != manifest["process_count"]:
    _atomic_write(
      _join(output_dir, MANIFEST), lambda file: file.write(json.dumps(manifest, indent=1).encode())
    )

  num_chunks = _num_chunks(manifest)
  index, count = jax.process_index(), jax.process_count()
  mine = [k for k in range(num_chunks) if k % count == index]
  for k in mine if is_local(output_dir) else ():  # temporaries a killed run left
    for tmp in glob.glob(os.path.join(output_dir, f".chunk_{k:06d}.npz.*.tmp")):
      os.remove(tmp)
  report = EncodeReport()
  todo = []
  for k in mine:
    path = chunk_path(output_dir, k)
    if _exists(path) and not _readable_now(path, items[k * chunk_size : (k + 1) * chunk_size]):
      _count_into(report, path)
      report.chunks_reused += 1
    else:
      todo.append(k)
  if not todo:
    return report

  encode, n_devices = _make_encoder(vae, flip)
  batch = -(-batch_size // n_devices) * n_devices
  latent_shape = tuple(manifest["latent_shape"])
  out_names = ("mean", "std", "mean_flip", "std_flip") if flip else ("mean", "std")

  def load(item):
    try:
      image = read_item(item)
      return item, np.asarray(adm_center_crop(image, image_size)), None
    except UnreadableImage as e:
      return item, None, e.reason

  jobs = (item for k in todo for item in items[k * chunk_size : (k + 1) * chunk_size])
  bar = tqdm(
    total=sum(len(items[k * chunk_size : (k + 1) * chunk_size]) for k in todo),
    unit="img",
    desc="encoding",
    disable=not progress,
  )
  workers = min(16, os.cpu_count() or 1)
  loaded = _prefetch(jobs, load, workers, depth=2 * batch + workers)
  try:
    for k in todo:  # a chunk is written as soon as its last item is encoded
      good, skipped, pixels, outputs = [], [], [], []
      size = len(items[k * chunk_size : (k + 1) * chunk_size])
      for item, pixels_HxWx3, reason in itertools.islice(loaded, size):
        if reason is not None:
          skipped.append((item.source, reason))
          bar.update(1)
          continue
        good.append(item)
        pixels.append(pixels_HxWx3)
        if len(pixels) == batch:
          outputs.append(_dispatch(encode, pixels, batch))
          bar.update(len(pixels))
          pixels = []
      if pixels:
        outputs.append(_dispatch(encode, pixels, batch))
        bar.update(len(pixels))
      arrays = {name: np.zeros((0, *latent_shape), np.float32) for name in out_names}
      if outputs:
        fetched = jax.device_get([out for _, out in outputs])
        arrays = {
          name: np.concatenate([out[name][:n] for (n, _), out in zip(outputs, fetched)])
          for name in out_names
        }
      _write_chunk(chunk_path(output_dir, k), good, skipped, arrays, field_names)
      report.encoded += len(good)
      report.skipped.extend(skipped)
      report.chunks_written += 1
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    raise DoesNotFitError(
      f"encoding {batch} images of {image_size}x{image_size} at once does not fit the "
      f"memory of {n_devices} {jax.default_backend()} devices; lower --batch_size (now "
      f"{batch_size}) and run again: the {report.chunks_written} chunks written so far are kept"
    ) from error
  finally:
    loaded.close()
    bar.close()
  return report


def _readable_now(path: str, chunk_items: Sequence[ImageItem]) -> list[str]:
  """The images chunk `path` (of `chunk_items`) skipped that can be read now
  (fixed or replaced since): such a chunk is encoded again, so a rerun after
  the files are repaired never keeps them out."""
  skipped = _load_chunk(path, ("skipped",))["skipped"].tolist()
  by_source = {item.source: item for item in chunk_items}
  readable = []
  for image in skipped:
    try:  # a name no item has now (the input moved): read as a file name, as it was listed
      read_item(by_source.get(image) or ImageItem(image, image))
    except UnreadableImage:
      continue
    readable.append(image)
  if readable:
    logging.info(
      "%s: %d images skipped before can be read now; encoding it again", path, len(readable)
    )
  return readable


def _dispatch(encode, pixels: list[np.ndarray], batch: int):
  """(n, encode(the n images zero-padded to `batch`)); the result is not waited for."""
  n = len(pixels)
  pixels_BxHxWx3 = np.zeros((batch, *pixels[0].shape), np.uint8)
  pixels_BxHxWx3[:n] = np.stack(pixels)
  return n, encode(pixels_BxHxWx3)


def _write_chunk(
  path: str,
  good: list[ImageItem],
  skipped: list[tuple[str, str]],
  arrays: dict[str, np.ndarray],
  field_names: Sequence[str],
) -> None:
  arrays = dict(arrays)
  arrays["keys"] = np.asarray([item.key for item in good], dtype=str)
  for name in field_names:
    values = np.asarray([item.fields[name] for item in good])
    if values.dtype.kind == "O":
      raise ConfigError(
        f"ImageItem field {name!r} mixes types or shapes across the items "
        f"of {path}, which numpy cannot store without pickle; give every "
        "item the same kind of value"
      )
    arrays[name] = values
  arrays["skipped"] = np.asarray([p for p, _ in skipped], dtype=str)
  arrays["skip_reasons"] = np.asarray([r for _, r in skipped], dtype=str)
  _atomic_write(path, lambda file: np.savez(file, **arrays))
