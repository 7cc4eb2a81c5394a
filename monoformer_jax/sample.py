r"""Sample a trained MonoFormer: `python -m monoformer_jax.sample COMMAND --checkpoint=CKPT ...`.

  images       draw --num_samples images of each --prompt and --class_name
  text         continue each --text_prompt
  read         read each --image and answer --text_prompt about it
  interleaved  continue each --text_prompt with text and images inline
  edit         redraw each --image as --prompt says

    python -m monoformer_jax.sample images --checkpoint=/tmp/digits --class_name=seven
    python -m monoformer_jax.sample images --checkpoint=/tmp/digits \
        --prompt="an image of three." --num_samples=8 --sampler=ddim --cfg_scale=2
    python -m monoformer_jax.sample text --checkpoint=/tmp/digits --text_prompt="two plus two is"
    python -m monoformer_jax.sample read --checkpoint=/tmp/digits --image=seven.png \
        --text_prompt="which digit is this?" --temperature=0
    python -m monoformer_jax.sample interleaved --checkpoint=/tmp/digits \
        --text_prompt="here is a" --temperature=1 --num_samples=8
    python -m monoformer_jax.sample edit --checkpoint=/tmp/digits --image=seven.png \
        --prompt="the next digit:" --edit_guidance=two_scale --cfg_scale=2 \
        --image_cfg_scale=1.5

Every command takes --checkpoint (required), --weights, --seed, --tokenizer,
--output_dir and --overwrite; those that draw images (images, interleaved,
edit) take --num_samples, --sampler, --eta, --num_steps, --cfg_scale,
--guide_eps_0_to_2 and --vae; those that write text (text, read, interleaved)
take --max_new_tokens, --temperature, --top_k and --top_p; images, text and
read take --cache, and read --vae. A flag of another command is refused, naming
the commands that take it (`COMMANDS` lists them).

`images` draws `--num_samples` per prompt (`--prompt` free text, `--class_name`
the reference's prompt around a class name): `images.png` (a row per prompt)
and `images.npz` (`images` float32 [B, h, w, C] in [0, 1], `prompts` [B]).
`text` continues each `--text_prompt`; `read` reads each `--image` (the
model's vision encoder, then the KV cache over it) and answers `--text_prompt`
about it (one question for every image, or one each). Both print their lines
and write them to `text.txt`. `interleaved` continues each `--text_prompt`,
and wherever the model writes <|im_start|> it draws an image and writes on,
`--num_samples` answers per prompt (with `--image`, one per prompt, read
first); `--max_new_tokens` counts the images' columns too. The answers go to
`interleaved.html` (the text with the images inline, PNGs in `interleaved/`)
and `interleaved.json` (the pieces in order). `edit` reads each `--image` and
draws a new one by `--prompt` (one instruction for every image, or one each),
`--num_samples` per image, guided against rows that drop what
`--edit_guidance` says (the instruction, the image, both, or InstructPix2Pix's
two scales, `--cfg_scale` and `--image_cfg_scale`): `edits.png` (each image
beside its edits) and `edits.npz`. Models trained without a vision encoder
cannot read, so they refuse `read`, `edit` and `interleaved --image`.

`--checkpoint` is a training workdir, one of its step folders, or the output
of `python -m monoformer_jax.convert`; the config saved with it describes the
model, and its mesh (`config.mesh`) shards the weights over the devices. The
files go to `--output_dir`, or without it to a new folder beside the checkpoint
(`WORKDIR/samples_step800`, or `MODEL_samples_step0` for a converted model;
`-2`, `-3`, ... when it exists); an `--output_dir` that already holds the files
the command writes needs `--overwrite`. Every flag is checked before the model
is loaded, and so is each prompt with what is written after it against the
rows the model was trained on (config.data.seq_len: `--max_new_tokens`
defaults to the rest of that row), and `--num_samples` against the free
memory and disk its images take. Images are drawn a training micro-batch at a
time. Latent models are decoded (and encode what they read) with the
SD-VAE at `--vae` (or the config's `vae.path`); the digits model works in
pixels.
"""

import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
import tqdm
from absl import app, flags, logging
from jax.experimental import multihost_utils

from monoformer_jax import cli, inference
from monoformer_jax.checkpoints import beside, load_config, model_on_mesh
from monoformer_jax.config.fields import check_image_sampling, check_prompts, check_text_sampling
from monoformer_jax.config.schema import (
  ALL_SAMPLERS,
  CONDITIONING_TOKEN_MODE,
  max_sampling_steps,
  sampler_for,
)
from monoformer_jax.errors import ConfigError
from monoformer_jax.layout import tokens_per_image
from monoformer_jax.paths import (
  free_bytes,
  fresh_output_dir,
  new_folder_beside,
  whole_file,
  writable_dir,
)
from monoformer_jax.vision.images import load_image

_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "Training workdir, step folder or converted model (required)."
)
_WEIGHTS = flags.DEFINE_enum(
  "weights", "ema", ["ema", "raw"], "EMA weights (the reference samples with them) or raw."
)
_PROMPT = flags.DEFINE_multi_string(
  "prompt", [], "images: an image prompt, free text; edit: the instruction (repeatable)."
)
_CLASS_NAME = flags.DEFINE_multi_string(
  "class_name", [], "images: a class to draw, e.g. 'seven' (repeatable)."
)
_TEXT_PROMPT = flags.DEFINE_multi_string(
  "text_prompt",
  [],
  "text, interleaved: text to continue; read: the question about the image(s) (repeatable).",
)
_IMAGE = flags.DEFINE_multi_string(
  "image", [], "read, edit, interleaved: an image for the model to read (repeatable; PNG or JPEG)."
)
_NUM_SAMPLES = flags.DEFINE_integer(
  "num_samples",
  4,
  "Images per prompt or class name (images), per image (edit), answers per prompt (interleaved).",
)
_EDIT_GUIDANCE = flags.DEFINE_enum(
  "edit_guidance",
  "both",
  ["both", "text", "image", "two_scale"],
  "edit: what the guided rows drop (two_scale: "
  "InstructPix2Pix's, --cfg_scale on the text and "
  "--image_cfg_scale on the image).",
)
_IMAGE_CFG_SCALE = flags.DEFINE_float(
  "image_cfg_scale", 1.5, "edit with --edit_guidance=two_scale: the image's guidance scale."
)
_SAMPLER = flags.DEFINE_enum(
  "sampler",
  None,
  list(ALL_SAMPLERS),
  "iddpm models: ddpm (learned variance, the reference) or ddim; flow models: euler or heun "
  "(default: the checkpoint's diffusion.objective's first: ddpm, euler).",
)
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM noise: 0 deterministic, 1 the posterior variance.")
_NUM_STEPS = flags.DEFINE_integer(
  "num_steps", None, "Denoising steps (default: the checkpoint's config.sample.num_steps)."
)
_CFG_SCALE = flags.DEFINE_float(
  "cfg_scale",
  None,
  "Guidance scale, 0 for none (default: the checkpoint's config.sample.cfg_scale).",
)
_GUIDE_EPS_0_TO_2 = flags.DEFINE_bool(
  "guide_eps_0_to_2", False, "Guide only epsilon channels 0-2, as the reference."
)
_CACHE = flags.DEFINE_bool(
  "cache", True, "Cache the prompt's keys/values (images) and the KV cache (text)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed, the same samples.")
_MAX_NEW_TOKENS = flags.DEFINE_integer(
  "max_new_tokens",
  None,
  "Longest text completion (interleaved: the columns, images included; default: as many as "
  "the rows the model was trained on hold, config.data.seq_len).",
)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Text temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 50, "Sample among the k likeliest tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Sample within this probability mass (1: all).")
_TOKENIZER = flags.DEFINE_string(
  "tokenizer", None, "tokenizer.model / tokenizer.json / 'bytes' (default config.data.tokenizer)."
)
_VAE = flags.DEFINE_string(
  "vae", None, "diffusers AutoencoderKL folder (default config.vae.path); latent models need one."
)
_OUTPUT_DIR = flags.DEFINE_string(
  "output_dir", None, "Where the command's files go (default: a new folder beside the checkpoint)."
)
_OVERWRITE = flags.DEFINE_bool(
  "overwrite", False, "Replace the command's files already in --output_dir."
)

# Flags by what they are for: every command takes SHARED; COMMANDS says which others.
SHARED = ("checkpoint", "weights", "seed", "tokenizer", "output_dir", "overwrite")
DRAWING = ("num_samples", "sampler", "eta", "num_steps", "cfg_scale", "guide_eps_0_to_2", "vae")
WRITING = ("max_new_tokens", "temperature", "top_k", "top_p")


class Loaded(NamedTuple):
  """What a command samples with, once every flag is checked and the model loaded."""

  model: object
  tokenizer: object
  config: object
  vae: object  # None: a pixel model, or a command that needs none
  sources: list  # the --image files, decoded
  num_steps: int | None  # a drawing command's: the flag, else config.sample's
  cfg_scale: float | None
  batch_size: int  # prompts drawn at a time: the rows of one training micro-batch
  out_dir: str | None  # None on the processes of a multi-host run that do not write


def _sampler(config) -> str:
  """--sampler, or the default of the checkpoint's diffusion.objective."""
  return sampler_for(config.diffusion.objective, _SAMPLER.value, "--sampler")


def _image_prompts(config) -> list[str]:
  """--prompt, then the reference's prompt around each --class_name."""
  return list(_PROMPT.value) + [inference.class_name_prompt(c, config) for c in _CLASS_NAME.value]


def _images(run: Loaded):
  """`--num_samples` images of each --prompt, then each --class_name."""
  prompts = _image_prompts(run.config)
  per_sample = [p for p in prompts for _ in range(_NUM_SAMPLES.value)]
  batches = -(-len(per_sample) // run.batch_size)
  logging.info(
    "%d images in %d batch(es) of up to %d: %s, %d steps, guidance %s, prompt cache %s",
    len(per_sample),
    batches,
    run.batch_size,
    _sampler(run.config),
    run.num_steps,
    run.cfg_scale or "off",
    "on" if _CACHE.value else "off",
  )
  with tqdm.tqdm(total=run.num_steps * batches, desc=f"{_sampler(run.config)} steps") as bar:
    x0 = inference.generate_images(
      run.model,
      run.tokenizer,
      per_sample,
      config=run.config,
      num_steps=run.num_steps,
      sampler=_sampler(run.config),
      eta=_ETA.value,
      cfg_scale=run.cfg_scale or None,
      guided_channels=_guided_channels(),
      seed=_SEED.value,
      use_cache=_CACHE.value,
      batch_size=run.batch_size,
      progress=lambda _: bar.update(1),
    )
    x0 = (
      jax.device_get(x0)
      if jax.process_count() == 1
      # all hosts' shards
      else multihost_utils.process_allgather(x0, tiled=True)
    )
  images = inference.to_pixels(x0, run.config, run.vae)
  if run.out_dir is None:
    return
  with whole_file(os.path.join(run.out_dir, "images.npz")) as f:
    np.savez(f, images=images, prompts=np.array(per_sample))
  grid = inference.image_grid(images, rows=len(prompts), scale=_grid_scale(images.shape[1]))
  with whole_file(os.path.join(run.out_dir, "images.png")) as f:
    grid.save(f, format="PNG")
  logging.info("wrote %d images to %s (images.png, images.npz)", len(images), run.out_dir)


def _grid_scale(size: int) -> int:
  """How much images.png and edits.png enlarge each pixel: small images to ~64 px."""
  return max(1, 64 // size)


def _text(run: Loaded):
  """Each --text_prompt continued."""
  completions = inference.complete_text(
    run.model,
    run.tokenizer,
    _TEXT_PROMPT.value,
    config=run.config,
    **_writing(),
    seed=_SEED.value,
    use_cache=_CACHE.value,
  )
  _write_text([f"{p!r} -> {c!r}" for p, c in zip(_TEXT_PROMPT.value, completions)], run.out_dir)


def _questions() -> list[str]:
  """read: each --image's question (one for all, or one each)."""
  return list(_TEXT_PROMPT.value) * (len(_IMAGE.value) // len(_TEXT_PROMPT.value))


def _read(run: Loaded):
  """Each --image read and --text_prompt (its own, or the one for all) answered."""
  questions = _questions()
  answers = inference.describe_images(
    run.model,
    run.tokenizer,
    run.sources,
    questions,
    config=run.config,
    vae=run.vae,
    **_writing(),
    seed=_SEED.value,
    use_cache=_CACHE.value,
  )
  _write_text(
    [f"{i} {q!r} -> {a!r}" for i, q, a in zip(_IMAGE.value, questions, answers)], run.out_dir
  )


def _write_text(lines: list[str], out_dir: str | None):
  if out_dir is None:
    return
  with whole_file(os.path.join(out_dir, "text.txt")) as f:
    f.write(("\n".join(lines) + "\n").encode())
  print("\n".join(lines))


def _interleaved(run: Loaded):
  """`--num_samples` answers per --text_prompt, text and images (interleaved.html)."""
  n = _NUM_SAMPLES.value
  prompts = [p for p in _TEXT_PROMPT.value for _ in range(n)]
  reads = [x for x in run.sources for _ in range(n)] if run.sources else None
  answers = inference.generate_interleaved(
    run.model,
    run.tokenizer,
    prompts,
    config=run.config,
    images=reads,
    vae=run.vae,
    **_writing(),
    num_steps=run.num_steps,
    sampler=_sampler(run.config),
    eta=_ETA.value,
    cfg_scale=run.cfg_scale or None,
    guided_channels=_guided_channels(),
    seed=_SEED.value,
    batch_size=run.batch_size,
    progress=logging.info,
  )
  if run.out_dir is None:
    return
  page = inference.write_interleaved_page(
    answers, prompts, run.out_dir, scale=max(1, 64 // run.config.model.image_size)
  )
  logging.info(
    "wrote %s (%d answers, %d images)",
    page,
    len(answers),
    sum(k == "image" for a in answers for k, _ in a.pieces),
  )


def _instructions() -> list[str]:
  """edit: each --image's instruction (one for all, or one each)."""
  return list(_PROMPT.value) * (len(_IMAGE.value) // len(_PROMPT.value))


def _edit(run: Loaded):
  """`--num_samples` edits of each --image (edits.png: a row per image, the
  image first; edits.npz)."""
  n, sources = _NUM_SAMPLES.value, run.sources
  instructions = _instructions()
  guidance = _EDIT_GUIDANCE.value
  scale = (run.cfg_scale, _IMAGE_CFG_SCALE.value) if guidance == "two_scale" else run.cfg_scale
  batches = -(-len(sources) * n // run.batch_size)
  logging.info(
    "%d edits in %d batch(es): %s guidance %s", len(sources) * n, batches, guidance, scale
  )
  with tqdm.tqdm(total=run.num_steps * batches, desc=f"{_sampler(run.config)} steps") as bar:
    x0 = inference.edit_images(
      run.model,
      run.tokenizer,
      [s for s in sources for _ in range(n)],
      [i for i in instructions for _ in range(n)],
      config=run.config,
      vae=run.vae,
      guidance=guidance,
      cfg_scale=scale,
      num_steps=run.num_steps,
      sampler=_sampler(run.config),
      eta=_ETA.value,
      guided_channels=_guided_channels(),
      seed=_SEED.value,
      batch_size=run.batch_size,
      progress=lambda _: bar.update(1),
    )
  edits = inference.to_pixels(jax.device_get(x0), run.config, run.vae)
  if run.out_dir is None:
    return
  size = edits.shape[1]
  shown = [
    np.asarray(
      s.convert("L" if edits.shape[-1] == 1 else "RGB").resize((size, size)), np.float32
    ).reshape(size, size, -1)
    / 255.0
    for s in sources
  ]
  grid = np.concatenate(
    [np.concatenate([shown[i][None], edits[i * n : (i + 1) * n]]) for i in range(len(sources))]
  )
  with whole_file(os.path.join(run.out_dir, "edits.png")) as f:
    inference.image_grid(grid, rows=len(sources), scale=_grid_scale(size)).save(f, format="PNG")
  with whole_file(os.path.join(run.out_dir, "edits.npz")) as f:
    np.savez(
      f,
      images=edits,
      instructions=np.array([i for i in instructions for _ in range(n)]),
      sources=np.array([p for p in _IMAGE.value for _ in range(n)]),
    )
  logging.info("wrote %d edits to %s (edits.png, edits.npz)", len(edits), run.out_dir)


def _writing() -> dict:
  """The WRITING flags, as inference's keyword arguments."""
  return dict(
    max_new_tokens=_MAX_NEW_TOKENS.value,
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
  )


def _guided_channels() -> int | None:
  return 3 if _GUIDE_EPS_0_TO_2.value else None


class Command(NamedTuple):
  flags: tuple[str, ...]  # the flags it takes besides SHARED
  outputs: tuple[str, ...]  # the files it writes into the output folder
  run: Callable[[Loaded], None]


COMMANDS = {
  "images": Command(
    ("prompt", "class_name", "cache", *DRAWING), ("images.png", "images.npz"), _images
  ),
  "text": Command(("text_prompt", "cache", *WRITING), ("text.txt",), _text),
  "read": Command(("image", "text_prompt", "cache", "vae", *WRITING), ("text.txt",), _read),
  "interleaved": Command(
    ("text_prompt", "image", *DRAWING, *WRITING),
    ("interleaved.html", "interleaved.json"),
    _interleaved,
  ),
  "edit": Command(
    ("image", "prompt", "edit_guidance", "image_cfg_scale", *DRAWING),
    ("edits.png", "edits.npz"),
    _edit,
  ),
}
# Every flag this module defines (tests/test_sample_cli.py checks that none is left out).
ALL_FLAGS = tuple(dict.fromkeys(SHARED + sum((c.flags for c in COMMANDS.values()), ())))


def _check_flags(command: str):
  """The command line, before anything is read or loaded: no flag of another
  command, the flags this one needs, and --image matched by its prompts."""
  takes = SHARED + COMMANDS[command].flags
  for name in ALL_FLAGS:
    if flags.FLAGS[name].present and name not in takes:
      owners = [f"`{c}`" for c, spec in COMMANDS.items() if name in spec.flags]
      takers = f"{', '.join(owners[:-1])} and {owners[-1]}" if len(owners) > 1 else owners[0]
      raise ConfigError(
        f"--{name} is not a flag of `{command}`: {takers} take{'s' if len(owners) == 1 else ''} it"
      )
  if flags.FLAGS["output_dir"].present and not _OUTPUT_DIR.value:
    raise ConfigError(
      "--output_dir is empty; pass a folder for the outputs, or leave the flag out for a new "
      "folder beside the checkpoint"
    )
  if not _CHECKPOINT.value:
    raise ConfigError(
      f"`{command}` needs --checkpoint: a training workdir, one of its step "
      "folders, or a converted model"
    )
  images, prompts, questions = len(_IMAGE.value), len(_PROMPT.value), len(_TEXT_PROMPT.value)
  if command == "images" and not (prompts or _CLASS_NAME.value):
    raise ConfigError("nothing to draw: give --prompt or --class_name (repeatable)")
  if command in ("read", "edit") and not images:
    raise ConfigError(f"`{command}` needs --image: a PNG or JPEG file (repeatable)")
  if command in ("text", "interleaved") and not questions:
    raise ConfigError(f"`{command}` continues --text_prompt: give at least one")
  if command == "read" and questions not in (1, images):
    raise ConfigError(
      f"{images} --image but {questions} --text_prompt: give one question for "
      "all the images, or one each"
    )
  if command == "edit" and prompts not in (1, images):
    raise ConfigError(
      f"{images} --image but {prompts} --prompt: give one instruction for all "
      "the images, or one each"
    )
  if (
    command == "edit"
    and flags.FLAGS["image_cfg_scale"].present
    and (_EDIT_GUIDANCE.value != "two_scale")
  ):
    raise ConfigError(
      f"--image_cfg_scale is the image's scale of --edit_guidance=two_scale, "
      f"not of {_EDIT_GUIDANCE.value!r}: pass --edit_guidance=two_scale or "
      "leave it out"
    )
  if command == "interleaved" and images and images != questions:
    raise ConfigError(
      f"interleaved with {images} --image and {questions} --text_prompt: give one image per prompt"
    )
  for name in ("prompt", "class_name", "text_prompt"):
    if name in takes and flags.FLAGS[name].value:
      check_prompts(flags.FLAGS[name].value, f"--{name}")
  if "max_new_tokens" in takes:
    check_text_sampling(**_writing(), prefix="--")


def _check_rows(command: str, config, tokenizer, batch_size: int):
  """Each prompt and what the command writes after it against the rows the
  model was trained on (inference.check_budget, as the sampler will check it)."""
  budget = dict(max_new_tokens=_MAX_NEW_TOKENS.value, prefix="--")
  if command == "images":
    inference.check_budget(config, tokenizer, "images", _image_prompts(config), prefix="--")
  elif command == "edit":
    inference.check_budget(config, tokenizer, "edit", _instructions(), prefix="--")
  elif command == "text":
    inference.check_budget(config, tokenizer, "text", _TEXT_PROMPT.value, **budget)
  elif command == "read":
    inference.check_budget(config, tokenizer, "read", _questions(), **budget)
  else:
    n = _NUM_SAMPLES.value
    inference.interleaved_budgets(
      config,
      tokenizer,
      [p for p in _TEXT_PROMPT.value for _ in range(n)],
      reads=[bool(_IMAGE.value)] * len(_TEXT_PROMPT.value) * n,
      batch_size=batch_size,
      **budget,
    )


def _free_memory() -> int | None:
  """Bytes of memory this machine can give a process now (Linux's MemAvailable)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _check_room(command: str, config, vae, out_dir: str):
  """Refuses, before anything is drawn, a --num_samples whose images would not
  fit this machine's free memory (they are gathered to write images.npz and
  the grid) or the free space where they are written, in one line with the
  bytes. Interleaved answers count as many images as their rows can hold."""
  if command not in ("images", "edit", "interleaved"):
    return
  m, n = config.model, _NUM_SAMPLES.value
  if vae is None:
    size, channels = m.image_size, m.in_channels
  else:
    size, channels = m.image_size * vae.config.downsample_factor, vae.config.out_channels
  pixels = size * size * channels * 4  # float32, as images.npz holds them
  latents = m.image_size**2 * m.in_channels * 4
  shown = inference.grid_bytes(1, 1, size, channels, _grid_scale(size))  # in the PNG, uint8
  if command == "images":
    per_sample = len(_PROMPT.value) + len(_CLASS_NAME.value)
  elif command == "edit":
    per_sample = len(_IMAGE.value)
  else:
    per_image = tokens_per_image(m) + 2 + int(m.conditioning == CONDITIONING_TOKEN_MODE)
    per_sample = len(_TEXT_PROMPT.value) * max(1, config.data.seq_len // per_image)
  count = n * per_sample
  wants = (
    ("memory", count * (latents + 3 * pixels + shown), _free_memory()),
    (f"disk space in {out_dir}", count * (pixels + shown), free_bytes(out_dir)),
  )
  for where, need, free in wants:
    if free is not None and need > free:
      raise ConfigError(
        f"--num_samples={n}: {count:,} images of {size}x{size}x{channels} need about "
        f"{need:,} bytes of {where} (the float32 images and the PNGs), more than the "
        f"{free:,} free; lower --num_samples to at most {free * n // need:,}"
      )


def _output_path(checkpoint: str, step: int) -> str:
  """Where the files go: --output_dir, else a new folder beside the checkpoint."""
  if _OUTPUT_DIR.value:
    return _OUTPUT_DIR.value
  return new_folder_beside(beside(checkpoint, step, "samples"))


def _output_dir(path: str, outputs: tuple[str, ...]) -> str:
  """`path` made, checked writable and (--output_dir) free of `outputs`."""
  if _OUTPUT_DIR.value:
    return fresh_output_dir(path, outputs, "--output_dir", _OVERWRITE.value)
  return writable_dir(path, "samples (or pass --output_dir)", "the default --output_dir")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(
      f"usage: python -m monoformer_jax.sample {{{'|'.join(COMMANDS)}}} "
      f"--checkpoint=CKPT --flags (got {argv[1:]})"
    )
  name, command = argv[1], COMMANDS[argv[1]]
  _check_flags(name)
  sources = [load_image(p) for p in _IMAGE.value]  # a bad file fails here, named
  config, step = load_config(_CHECKPOINT.value)
  if sources and not config.model.vision_encoder:
    raise ConfigError(
      f"{_CHECKPOINT.value} was trained without a vision encoder "
      "(model.vision_encoder is ''), so it cannot read --image; use a "
      "model trained with model.vision_encoder=vae or clip (the digits "
      "default reads digits)"
    )
  num_steps = cfg_scale = None
  if "num_steps" in command.flags:
    num_steps = config.sample.num_steps if _NUM_STEPS.value is None else _NUM_STEPS.value
    cfg_scale = config.sample.cfg_scale if _CFG_SCALE.value is None else _CFG_SCALE.value
    check_image_sampling(
      num_steps=num_steps,
      cfg_scale=cfg_scale,
      eta=_ETA.value,
      sampler=_sampler(config),
      num_samples=_NUM_SAMPLES.value,
      guided_channels=_guided_channels(),
      channels=config.model.in_channels,
      num_timesteps=max_sampling_steps(config.diffusion),
      prefix="--",
    )
  tokenizer = inference.tokenizer_of(config, _TOKENIZER.value)
  for class_name in _CLASS_NAME.value:  # an unknown class fails here, before the model loads
    inference.class_name_prompt(class_name, config)
  vae = inference.load_vae_of(config, _VAE.value, flag="--vae") if "vae" in command.flags else None
  path = _output_path(_CHECKPOINT.value, step)
  _check_room(name, config, vae, path)  # first: the rows below are listed per sample
  # Prompts drawn at a time: the rows of one training micro-batch, which this mesh fit.
  batch_size = max(1, config.data.batch_size // config.optim.grad_accum_steps)
  _check_rows(name, config, tokenizer, batch_size)
  # Every process of a multi-host run samples (sharded); process 0 writes.
  writer = jax.process_index() == 0
  out_dir = _output_dir(path, command.outputs) if writer else None

  with model_on_mesh(_CHECKPOINT.value, weights=_WEIGHTS.value, config=config, step=step) as (
    model,
    config,
  ):
    logging.info("writing to %s", out_dir)
    loaded = Loaded(
      model, tokenizer, config, vae, sources, num_steps, cfg_scale, batch_size, out_dir
    )
    command.run(loaded)


if __name__ == "__main__":
  cli.run(main)
