"""Inference in a few calls: images from prompts or class names, text completions.

What `python -m monoformer_jax.sample` (each of its commands: images, text,
read, interleaved, edit), the notebooks and the training run's end-of-run
samples call. Prompts are strings; `data.prompts` turns them into
the reference's rows (`<s> prompt <|im_start|>` then the image's P slots);
samples come back in the model's space (SD-VAE latents, or [-1, 1] pixels for
a pixel model) and `to_pixels` makes [0, 1] images of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np
from PIL import Image

from monoformer_jax.config.fields import check_image_sampling, check_prompts, check_text_sampling
from monoformer_jax.data import prompts as prompt_format
from monoformer_jax.data.datasets import class_by_name, draws_pixels
from monoformer_jax.diffusion.gaussian import SAMPLERS, from_config
from monoformer_jax.diffusion.sample_images import sample_images
from monoformer_jax.errors import ConfigError
from monoformer_jax.layout import row_spec
from monoformer_jax.text.generate import generate
from monoformer_jax.text.interleaved import TokenIds
from monoformer_jax.text.interleaved import generate_interleaved as interleave
from monoformer_jax.text.tokenizer import tokenizer_of  # noqa: F401 (for notebooks)
from monoformer_jax.vae import decode_latents, load_vae
from monoformer_jax.vision.inputs import read_inputs
from monoformer_jax.vision.pixels import to_unit_range


def class_name_prompt(name: str, config=None) -> str:
  """The reference's first template for a class name ("Please generate an
  image of {name}."); a class of the config's dataset may also be given by
  its index ("7" for "seven")."""
  return prompt_format.class_prompt(name if config is None else class_by_name(name, config))


def generate_images(
  model,
  tokenizer,
  prompts: Sequence[str | None],
  *,
  diffusion,
  num_steps: int = 20,
  sampler: str = "ddpm",
  eta: float = 0.0,
  cfg_scale: float | None = 1.5,
  guided_channels: int | None = None,
  seed: int = 0,
  use_cache: bool = True,
  progress: Callable | None = None,
):
  """x_0 [B, h, w, C] in the model's space (latents, or [-1, 1] pixels) for B
  prompts (a list: None is the empty prompt); guidance unless `cfg_scale` is
  None or 0; `num_steps` respaced steps of the schedule of `diffusion`, the
  model's config section (`config.diffusion`)."""
  prompts = check_prompts(prompts)
  check_image_sampling(
    num_steps=num_steps, cfg_scale=cfg_scale, eta=eta, num_timesteps=diffusion.num_timesteps
  )
  if sampler not in SAMPLERS:
    raise ConfigError(f"sampler={sampler!r}: choose one of {SAMPLERS}")
  cfg_scale = cfg_scale or None  # 0 is no guidance
  process = from_config(diffusion, respacing=str(num_steps))
  rows = prompt_format.image_rows(
    prompts,
    tokenizer,
    model.tokens_per_image,
    guidance=cfg_scale is not None,
    cond_token=model.cond_token,
  )
  return sample_images(
    model,
    rows,
    process,
    jax.random.PRNGKey(seed),
    cfg_scale=cfg_scale,
    guided_channels=guided_channels,
    sampler=sampler,
    eta=eta,
    use_cache=use_cache,
    progress=progress,
  )


def complete_text(
  model,
  tokenizer,
  prompts: Sequence[str],
  *,
  max_new_tokens: int = 256,
  temperature: float = 0.7,
  top_k: int = 50,
  top_p: float = 0.95,
  seed: int = 0,
  use_cache: bool = True,
) -> list[str]:
  """Completions of `prompts`, a list of strings (bos is prepended; generation
  stops at eos)."""
  prompts = check_prompts(prompts)
  if None in prompts:
    raise ConfigError("text prompts must be strings; None (the empty prompt) is for images")
  check_text_sampling(
    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
  )
  ids = generate(
    model,
    [prompt_format.text_prompt_ids(p, tokenizer) for p in prompts],
    max_new_tokens=max_new_tokens,
    pad_id=tokenizer.pad_id,
    stop_ids=[tokenizer.eos_id],
    key=jax.random.PRNGKey(seed),
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    use_cache=use_cache,
  )
  return [tokenizer.decode(t) for t in ids]


def describe_images(
  model,
  tokenizer,
  images,
  prompt: str | Sequence[str] = "Describe the image.",
  *,
  config,
  vae=None,
  max_new_tokens: int = 128,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  use_cache: bool = True,
) -> list[str]:
  """The model's answers about `images` (a list: paths, PIL images or arrays),
  one per image, to `prompt` (one string, or one per image). The image is
  read by the model's vision encoder (a latent model's `vae` encodes it) and
  cached with the prompt; greedy by default, stopping at eos."""
  if isinstance(images, (str, os.PathLike)) or not len(images):
    raise ConfigError("images must be a non-empty list (paths, PIL images or arrays)")
  questions = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
  if len(questions) != len(images):
    raise ConfigError(
      f"{len(questions)} prompts for {len(images)} images; give one prompt, or one per image"
    )
  check_text_sampling(
    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
  )
  inputs = _read_inputs(images, config, vae)
  spec = row_spec(config, tokenizer)
  examples = [prompt_format.read_prompt_example(q, x, tokenizer) for q, x in zip(questions, inputs)]
  ids = generate(
    model,
    examples,
    max_new_tokens=max_new_tokens,
    pad_id=tokenizer.pad_id,
    stop_ids=[tokenizer.eos_id],
    key=jax.random.PRNGKey(seed),
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    spec=spec,
    use_cache=use_cache,
  )
  return [tokenizer.decode(t) for t in ids]


class Answer(NamedTuple):
  """An interleaved answer: `pieces` in order, each ("text", str) or ("image",
  float32 [h, w, C] in [0, 1]); `stop` "stop" (eos) or "budget" (the row was full)."""

  pieces: list
  stop: str


def generate_interleaved(
  model,
  tokenizer,
  prompts: Sequence[str],
  *,
  config,
  images: Sequence | None = None,
  vae=None,
  max_new_tokens: int = 256,
  num_steps: int = 20,
  sampler: str = "ddpm",
  eta: float = 0.0,
  cfg_scale: float | None = 1.5,
  guided_channels: int | None = None,
  temperature: float = 0.7,
  top_k: int = 50,
  top_p: float = 0.95,
  seed: int = 0,
  max_wait: int | None = None,
  progress: Callable | None = None,
) -> list[Answer]:
  """Text with images inline for each prompt: the model writes text and,
  where it writes <|im_start|>, draws an image (text/interleaved.py; `max_wait`:
  the columns a row waits for other rows to ask for an image too, so that
  they draw in one pass; None: the columns an image takes, 0: none).

  `images`: None, or one image per prompt (a path, PIL image or array; None
  for none) that the prompt reads first. `max_new_tokens` counts the columns
  after the prompt, images included (an image takes P + 2 of them, one more
  with add_before_image_tokens). Images come back as pixels in [0, 1].
  """
  prompts = check_prompts(prompts)
  if None in prompts:
    raise ConfigError('interleaved prompts must be strings ("" for none)')
  check_text_sampling(
    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
  )
  check_image_sampling(
    num_steps=num_steps, cfg_scale=cfg_scale, eta=eta, num_timesteps=config.diffusion.num_timesteps
  )
  if sampler not in SAMPLERS:
    raise ConfigError(f"sampler={sampler!r}: choose one of {SAMPLERS}")
  spec = row_spec(config, tokenizer)
  rows = [prompt_format.text_prompt_ids(p, tokenizer) for p in prompts]
  if images is not None:
    if len(images) != len(prompts):
      raise ConfigError(
        f"{len(images)} images for {len(prompts)} prompts; give one per "
        "prompt (None for a prompt that reads none)"
      )
    given = [i for i, x in enumerate(images) if x is not None]
    read = _read_inputs([images[i] for i in given], config, vae) if given else []
    for i, x in zip(given, read):
      rows[i] = prompt_format.read_prompt_example(prompts[i], x, tokenizer)
  process = from_config(config.diffusion, respacing=str(num_steps))
  outs = interleave(
    model,
    rows,
    ids=TokenIds.of(tokenizer),
    max_new_tokens=max_new_tokens,
    diffusion=process,
    key=jax.random.PRNGKey(seed),
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    cfg_scale=cfg_scale or None,
    guided_channels=guided_channels,
    sampler=sampler,
    eta=eta,
    spec=spec,
    max_positions=config.data.seq_len,
    max_wait=max_wait,
    progress=progress,
  )
  answers = []
  for out in outs:
    pixels = iter(to_pixels(np.stack(out.images), config, vae) if out.images else ())
    answers.append(Answer(_pieces(out.ids, pixels, tokenizer), out.stop))
  return answers


def _pieces(ids: Sequence[int], images, tokenizer) -> list:
  """("text", str) and ("image", array) pieces of new ids in the reference's
  format (<|im_start|> <image> <|im_end|> per image; a stop token last)."""
  t = tokenizer
  ids = list(ids)
  if ids and ids[-1] == t.eos_id:
    ids = ids[:-1]
  pieces, text = [], []
  i = 0
  while i < len(ids):
    if ids[i : i + 3] == [t.im_start_id, t.image_id, t.im_end_id]:
      if text:
        pieces.append(("text", t.decode(text)))
      pieces.append(("image", next(images)))
      text, i = [], i + 3
    else:
      text.append(ids[i])
      i += 1
  if text:
    pieces.append(("text", t.decode(text)))
  return pieces


def interleaved_html(
  answers: Sequence[Answer],
  prompts: Sequence[str],
  *,
  scale: int = 8,
  labels: Sequence[Sequence[str]] | None = None,
  image_src: Callable | None = None,
) -> tuple[str, list[dict]]:
  """(an HTML page of each prompt, then its answer with the images inline; the
  pieces in order as JSON-ready dicts, {"text": ...} or {"image": src}).
  `image_src(row, k, PIL image)` names each image (default: a data: URI, for
  notebooks); `labels`, per answer one per image, go under the images."""
  import base64
  import html
  import io

  def inline(r, k, picture):
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

  image_src = image_src or inline
  rows, body = [], []
  for r, (answer, prompt) in enumerate(zip(answers, prompts)):
    pieces, cells, k = [], [], 0
    for kind, value in answer.pieces:
      if kind == "text":
        pieces.append({"text": value})
        cells.append(f"<span>{html.escape(value)}</span>")
        continue
      src = image_src(r, k, image_grid(value[None], rows=1, scale=scale, pad=0))
      label = "" if labels is None else f"<figcaption>{html.escape(labels[r][k])}</figcaption>"
      pieces.append({"image": src})
      cells.append(f'<figure><img src="{src}" alt="image {k} of answer {r}">{label}</figure>')
      k += 1
    rows.append({"prompt": prompt, "stop": answer.stop, "pieces": pieces})
    body.append(
      f"<div class=answer><b>{html.escape(prompt)}</b>{''.join(cells)}"
      + ("" if answer.stop == "stop" else " <i>(out of tokens)</i>")
      + "</div>"
    )
  page = (
    "<!doctype html><meta charset=utf-8><title>interleaved samples</title><style>"
    "body{font-family:sans-serif} .answer{margin:8px 0;display:flex;"
    "align-items:center;gap:4px;flex-wrap:wrap} figure{margin:0;text-align:center}"
    "img{image-rendering:pixelated;border:1px solid #ccc} figcaption{font-size:70%}"
    "</style>\n" + "\n".join(body) + "\n"
  )
  return page, rows


def write_interleaved_page(
  answers: Sequence[Answer],
  prompts: Sequence[str],
  out_dir: str,
  *,
  name: str = "interleaved",
  scale: int = 8,
  labels: Sequence[Sequence[str]] | None = None,
) -> str:
  """out_dir/{name}.html (`interleaved_html`), its images as
  out_dir/{name}/{row}_{k}.png and out_dir/{name}.json (the pieces in order:
  {"text": ...} or {"image": path}). Returns the page's path."""
  import json

  os.makedirs(os.path.join(out_dir, name), exist_ok=True)

  def save(r, k, picture):
    path = f"{name}/{r}_{k}.png"
    picture.save(os.path.join(out_dir, path))
    return path

  page, rows = interleaved_html(answers, prompts, scale=scale, labels=labels, image_src=save)
  path = os.path.join(out_dir, f"{name}.html")
  with open(path, "w") as f:
    f.write(page)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(rows, f, indent=1)
  return path


def edit_images(
  model,
  tokenizer,
  images,
  instructions: str | Sequence[str],
  *,
  config,
  vae=None,
  guidance: str | None = "both",
  cfg_scale=1.5,
  num_steps: int = 20,
  sampler: str = "ddpm",
  eta: float = 0.0,
  guided_channels: int | None = None,
  seed: int = 0,
  progress: Callable | None = None,
):
  """x_0 [B, h, w, C] in the model's space: each image (path, PIL image or
  array) READ and redrawn by its instruction (one string, or one per image).

  `guidance` drops, for the guided rows, "both" (the null prompt), "text"
  (the instruction: guides toward following it), "image" (the source), or
  "two_scale": InstructPix2Pix's guidance, `cfg_scale` = (text scale, image
  scale); None or a cfg_scale of 0 turns guidance off.
  """
  if isinstance(images, (str, os.PathLike)) or not len(images):
    raise ConfigError("images must be a non-empty list (paths, PIL images or arrays)")
  instructions = (
    [instructions] * len(images) if isinstance(instructions, str) else list(instructions)
  )
  if len(instructions) != len(images):
    raise ConfigError(
      f"{len(instructions)} instructions for {len(images)} images; give one, or one per image"
    )
  if guidance == "two_scale":
    if not isinstance(cfg_scale, (tuple, list)) or len(cfg_scale) != 2:
      raise ConfigError(
        f"guidance='two_scale' takes cfg_scale=(text scale, image scale), got {cfg_scale!r}"
      )
    for s in cfg_scale:
      check_image_sampling(
        num_steps=num_steps, cfg_scale=s, eta=eta, num_timesteps=config.diffusion.num_timesteps
      )
  else:
    check_image_sampling(
      num_steps=num_steps,
      cfg_scale=cfg_scale,
      eta=eta,
      num_timesteps=config.diffusion.num_timesteps,
    )
    if not cfg_scale:
      guidance = cfg_scale = None
  if guidance is None:
    cfg_scale = None
  if sampler not in SAMPLERS:
    raise ConfigError(f"sampler={sampler!r}: choose one of {SAMPLERS}")
  if guidance not in (None,) + prompt_format.EDIT_GUIDANCE:
    raise ConfigError(f"guidance={guidance!r}: choose None or one of {prompt_format.EDIT_GUIDANCE}")
  spec = row_spec(config, tokenizer)
  sources = _read_inputs(images, config, vae)
  rows = prompt_format.edit_rows(sources, instructions, tokenizer, spec, guidance=guidance)
  process = from_config(config.diffusion, respacing=str(num_steps))
  return sample_images(
    model,
    rows,
    process,
    jax.random.PRNGKey(seed),
    cfg_scale=cfg_scale,
    guided_channels=guided_channels,
    sampler=sampler,
    eta=eta,
    progress=progress,
  )


def _read_inputs(images, config, vae):
  """`images` as the model's vision encoder takes them (vision/inputs.py), in
  pixels or through the VAE as the config's dataset says."""
  return read_inputs(images, config, vae, pixels=draws_pixels(config))


def _needs_a_vae(config) -> ConfigError:
  return ConfigError(
    f"this model draws {config.model.in_channels}-channel latents; decode them with "
    "the SD-VAE: pass --vae=DIR (a diffusers AutoencoderKL folder such as "
    "sd-vae-ft-mse) or set config.vae.path"
  )


def load_vae_of(config, path: str | None = None):
  """The SD-VAE that decodes a latent model's samples (`path`, else the
  config's `vae.path`); None for a pixel model. Raises, naming the fix, for a
  latent model without one."""
  path = path or config.vae.path
  if path:
    return load_vae(path)
  if not draws_pixels(config):
    raise _needs_a_vae(config)
  return None


def to_pixels(x0, config, vae=None) -> np.ndarray:
  """Samples as float32 [B, h, w, C] images in [0, 1]: latents decoded by
  `vae` (see `load_vae_of`), or the pixels of a pixel model."""
  if vae is not None:
    x0 = decode_latents(vae, np.asarray(x0, np.float32))
  elif not draws_pixels(config):
    raise _needs_a_vae(config)
  return to_unit_range(x0)


def image_grid(images_BxhxwxC, rows: int, scale: int = 1, pad: int = 1):
  """A PIL image of `rows` rows of samples on a white background."""
  n, h, w, c = images_BxhxwxC.shape
  cols = -(-n // rows)
  images = np.kron(images_BxhxwxC, np.ones((1, scale, scale, 1), np.float32))
  h, w = h * scale, w * scale
  grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
  for i in range(n):
    r, col = divmod(i, cols)
    grid[
      pad + r * (h + pad) : pad + r * (h + pad) + h,
      pad + col * (w + pad) : pad + col * (w + pad) + w,
    ] = images[i]
  pixels = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
  return Image.fromarray(pixels[..., 0] if c == 1 else pixels)
