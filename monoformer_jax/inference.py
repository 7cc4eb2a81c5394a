"""Inference in a few calls: images from prompts or class names, text completions.

What `python -m monoformer_jax.sample` (each of its commands: images, text,
read, interleaved, edit), the notebooks and the training run's end-of-run
samples call. Prompts are strings; `data.prompts` turns them into
the reference's rows (`<s> prompt <|im_start|>` then the image's P slots);
samples come back in the model's space (SD-VAE latents, or [-1, 1] pixels for
a pixel model) and `to_pixels` makes [0, 1] images of them.

Every function checks its arguments before anything is compiled: their types
and ranges (config/fields.py; `seed` an int, None refused), and the rows it
would lay out against the rows the model was trained on (`check_budget`: a
prompt and what is written after it within data.seq_len), so `config`, the
model's own (`load_model` returns it), is an argument of each.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from monoformer_jax.config.fields import (
  boolean,
  check_image_sampling,
  check_prompts,
  check_seed,
  check_text_sampling,
  flag_of,
  integer,
)
from monoformer_jax.config.schema import max_sampling_steps, sampler_for
from monoformer_jax.data import prompts as prompt_format
from monoformer_jax.data.datasets import class_by_name, draws_pixels
from monoformer_jax.diffusion.gaussian import SAMPLERS, from_config
from monoformer_jax.diffusion.sample_images import sample_images
from monoformer_jax.errors import ConfigError
from monoformer_jax.layout import Example, check_trained_length, prompt_lengths, row_spec
from monoformer_jax.text.generate import generate
from monoformer_jax.text.interleaved import TokenIds, interleaved_budget
from monoformer_jax.text.interleaved import generate_interleaved as interleave
from monoformer_jax.text.tokenizer import tokenizer_of  # noqa: F401 (for notebooks)
from monoformer_jax.vae import decode_latents, load_vae
from monoformer_jax.vision.inputs import read_inputs
from monoformer_jax.vision.pixels import to_unit_range


def class_name_prompt(name: str | int, config=None) -> str:
  """The reference's first template for a class name ("Please generate an
  image of {name}."); a class of the config's dataset may also be given by
  its index (7 or "7" for "seven")."""
  if isinstance(name, numbers.Integral) and not isinstance(name, bool) and config is not None:
    name = str(int(name))  # an index: class_by_name takes it, or names the range
  if not isinstance(name, str) or not name.strip():
    raise ConfigError(
      f"class name {name!r}: give a class's name, e.g. 'seven' (or, with the config of a "
      "dataset with classes, its index)"
    )
  return prompt_format.class_prompt(name if config is None else class_by_name(name, config))


# What each sampler writes after its prompts (`check_budget`).
SAMPLERS_OF_ROWS = ("images", "text", "read", "interleaved", "edit")


def check_budget(
  config,
  tokenizer,
  sampler: str,
  prompts: Sequence[str | None],
  *,
  reads: Sequence[bool] | None = None,
  max_new_tokens: int | None = None,
  prefix: str = "",
  label: str = "prompt {}",
) -> int | None:
  """Refuses, before anything is compiled, prompts whose rows would pass the
  positions the model was trained on (data.seq_len; layout.check_trained_length):
  each prompt as `sampler` lays it out (its read image expanded) and what it
  writes after it, an image's tokens ("images", "edit": `prompts` are the
  instructions, each reading its image), `max_new_tokens` ("text", "read":
  `prompts` are the questions), or an image and the batch's columns
  ("interleaved": `reads[i]` says whether prompt i reads an image first).
  Returns the text budget, `max_new_tokens` or for None as many tokens as the
  rows hold (None for images). `prefix`: '--' names the CLI's flags,
  'sample.' config fields; `label` names prompt i in messages."""
  if sampler not in SAMPLERS_OF_ROWS:
    raise ValueError(f"sampler={sampler!r}: one of {SAMPLERS_OF_ROWS}")
  prompts = check_prompts(prompts)
  spec = row_spec(config, tokenizer)
  seq_len, budget = spec.seq_len, f"{prefix}max_new_tokens"
  if prefix.endswith("."):  # a config field
    budget = flag_of(budget)
  t, image = tokenizer, np.zeros(0)  # only the ids and the read flags count: any image will do
  if sampler == "images":
    ids = [prompt_format.image_prefix_ids(p, t) for p in prompts]
  elif sampler == "edit":
    ids = [prompt_format.edit_prefix(p, image, t) for p in prompts]
  elif sampler == "text":
    ids = [prompt_format.text_prompt_ids(p, t) for p in prompts]
  elif sampler == "read":
    ids = [prompt_format.read_prompt_example(p, image, t) for p in prompts]
  else:
    reads = [False] * len(prompts) if reads is None else list(reads)
    ids = [
      prompt_format.read_prompt_example(p, image, t) if r else prompt_format.text_prompt_ids(p, t)
      for p, r in zip(prompts, reads)
    ]
  if not spec.read_tokens and any(isinstance(p, Example) for p in ids):
    raise ConfigError(
      f"this model has no vision encoder (model.vision_encoder is {config.model.vision_encoder!r}),"
      " so it cannot read an image; use a model trained with model.vision_encoder=vae or clip"
    )
  lengths = prompt_lengths(ids, spec)
  if sampler in ("images", "edit"):
    image = spec.tokens_per_image + int(spec.cond_token)
    check_trained_length(lengths, image, seq_len, new_what="its image takes", label=label)
    return None
  if sampler == "interleaved":
    need = int(spec.cond_token) + spec.tokens_per_image + 1
    return interleaved_budget(lengths, max_new_tokens, seq_len, need, budget)
  if max_new_tokens is None:
    room = seq_len - max(lengths)
    check_trained_length(
      lengths, max(room, 1), seq_len, new_what="its answer needs at least", label=label
    )
    return room
  check_trained_length(
    lengths, max_new_tokens, seq_len, new_what=f"{budget} asks for", budget=budget, label=label
  )
  return max_new_tokens


def interleaved_budgets(
  config,
  tokenizer,
  prompts: Sequence[str],
  *,
  reads: Sequence[bool] | None = None,
  max_new_tokens: int | None = None,
  batch_size: int | None = None,
  prefix: str = "",
) -> list[int]:
  """`check_budget` of each batch of `generate_interleaved`'s prompts (its
  budget: the columns of the batch's rows), every batch before the first runs."""
  reads = [False] * len(prompts) if reads is None else list(reads)
  return [
    check_budget(
      config,
      tokenizer,
      "interleaved",
      prompts[b],
      reads=reads[b],
      max_new_tokens=max_new_tokens,
      prefix=prefix,
    )
    for b in _batches(len(prompts), batch_size)
  ]


def _check_drawing(config, *, num_steps, cfg_scale, eta, sampler, guided_channels, prefix=""):
  """The image sampling arguments against the model's config (`sampler` None:
  the default of the model's diffusion.objective, as the samplers take it)."""
  if sampler is not None and sampler not in SAMPLERS:
    raise ConfigError(f"{prefix}sampler={sampler!r}: choose one of {SAMPLERS}")
  check_image_sampling(
    num_steps=num_steps,
    cfg_scale=cfg_scale,
    eta=eta,
    sampler=sampler_for(config.diffusion.objective, sampler, f"{prefix}sampler"),
    guided_channels=guided_channels,
    channels=config.model.in_channels,
    num_timesteps=max_sampling_steps(config.diffusion),
    prefix=prefix,
  )


def _batches(n: int, batch_size: int | None) -> list[slice]:
  """[0, n) in batches of `batch_size` (None: one)."""
  if batch_size is None:
    return [slice(0, n)]
  size = integer("batch_size", batch_size, low=1, fix="e.g. batch_size=64, or None for one batch")
  return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _batch_key(seed: int, index: int):
  """Batch `index`'s key: PRNGKey(seed) for the first (so one batch is what
  the samplers give that key), fold_in(PRNGKey(seed), index) for the others."""
  key = jax.random.PRNGKey(seed)
  return key if index == 0 else jax.random.fold_in(key, index)


def _joined(parts):
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def generate_images(
  model,
  tokenizer,
  prompts: Sequence[str | None],
  *,
  config,
  num_steps: int = 20,
  sampler: str | None = None,
  eta: float = 0.0,
  cfg_scale: float | None = 1.5,
  guided_channels: int | None = None,
  seed: int = 0,
  use_cache: bool = True,
  batch_size: int | None = None,
  progress: Callable | None = None,
):
  """x_0 [B, h, w, C] in the model's space (latents, or [-1, 1] pixels) for B
  prompts (a list: None is the empty prompt); guidance unless `cfg_scale` is
  None or 0; `num_steps` respaced steps of the schedule of `config.diffusion`
  (`config`: the model's, as `load_model` returns it). `batch_size` prompts
  are drawn at a time (None: all at once; batch k > 0 draws its noise from
  fold_in(PRNGKey(seed), k)); `progress(step)` runs after every step of every batch."""
  prompts = check_prompts(prompts)
  _check_drawing(
    config,
    num_steps=num_steps,
    cfg_scale=cfg_scale,
    eta=eta,
    sampler=sampler,
    guided_channels=guided_channels,
  )
  seed, use_cache = check_seed(seed), boolean("use_cache", use_cache)
  check_budget(config, tokenizer, "images", prompts)
  batches = _batches(len(prompts), batch_size)
  cfg_scale = cfg_scale or None  # 0 is no guidance
  process = from_config(config.diffusion, respacing=str(num_steps))
  rows_of = lambda batch: prompt_format.image_rows(
    prompts[batch],
    tokenizer,
    model.tokens_per_image,
    guidance=cfg_scale is not None,
    cond_token=model.cond_token,
  )
  return _draw(
    model,
    process,
    batches,
    rows_of,
    seed,
    cfg_scale=cfg_scale,
    guided_channels=guided_channels,
    sampler=sampler,
    eta=eta,
    use_cache=use_cache,
    progress=progress,
  )


def _draw(model, process, batches: list[slice], rows_of, seed: int, **sampling) -> jax.Array:
  """sample_images over `batches`, joined: `rows_of(batch)` builds a batch's
  rows, and batch k draws from `_batch_key(seed, k)` (batch 0 from the seed's
  own key, so one batch gives what an unbatched call gives)."""
  return _joined(
    [
      sample_images(model, rows_of(batch), process, _batch_key(seed, k), **sampling)
      for k, batch in enumerate(batches)
    ]
  )


def complete_text(
  model,
  tokenizer,
  prompts: Sequence[str],
  *,
  config,
  max_new_tokens: int | None = None,
  temperature: float = 0.7,
  top_k: int = 50,
  top_p: float = 0.95,
  seed: int = 0,
  use_cache: bool = True,
) -> list[str]:
  """Completions of `prompts`, a list of strings (bos is prepended; generation
  stops at eos), of at most `max_new_tokens` tokens (None: as many as the
  rows the model was trained on hold after the longest prompt, data.seq_len
  of `config`; a prompt and its tokens past that are refused)."""
  prompts = check_prompts(prompts)
  if None in prompts:
    raise ConfigError("text prompts must be strings; None (the empty prompt) is for images")
  check_text_sampling(
    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
  )
  seed, use_cache = check_seed(seed), boolean("use_cache", use_cache)
  max_new_tokens = check_budget(config, tokenizer, "text", prompts, max_new_tokens=max_new_tokens)
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


def _image_list(images):
  """`images` as a non-empty list: never one path (whose letters would be
  taken) or one image (whose rows would), an array only as a batch [B, h, w, C]."""
  one = isinstance(images, (str, os.PathLike, Image.Image))
  one |= isinstance(images, np.ndarray) and images.ndim != 4
  if one or not len(images):
    raise ConfigError(
      f"images must be a non-empty list (paths, PIL images or arrays) or a 4-D array "
      f"[B, h, w, C], got {type(images).__name__}"
      + (f" of shape {images.shape}" if isinstance(images, np.ndarray) else "")
      + "; for one image pass [image]"
    )
  return list(images)


def _one_each(texts, images: list, what: str, per: str) -> list[str]:
  """One string for every image, or one per image, as a list of strings."""
  texts = check_prompts([texts] * len(images) if isinstance(texts, str) else texts, what)
  if None in texts:
    raise ConfigError(f"{what} must be strings, got None at {texts.index(None)}")
  if len(texts) != len(images):
    raise ConfigError(
      f"{len(texts)} {what} for {len(images)} images; give one string, or one {per} image"
    )
  return texts


def describe_images(
  model,
  tokenizer,
  images,
  prompt: str | Sequence[str] = "Describe the image.",
  *,
  config,
  vae=None,
  max_new_tokens: int | None = None,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  use_cache: bool = True,
) -> list[str]:
  """The model's answers about `images` (a list: paths, PIL images or arrays),
  one per image, to `prompt` (one string, or one per image). The image is
  read by the model's vision encoder (a latent model's `vae` encodes it) and
  cached with the prompt; greedy by default, stopping at eos; `max_new_tokens`
  None: as many as the trained rows (data.seq_len) hold after the question."""
  images = _image_list(images)
  questions = _one_each(prompt, images, "prompts", "per")
  check_text_sampling(
    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
  )
  seed, use_cache = check_seed(seed), boolean("use_cache", use_cache)
  max_new_tokens = check_budget(config, tokenizer, "read", questions, max_new_tokens=max_new_tokens)
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
  max_new_tokens: int | None = None,
  num_steps: int = 20,
  sampler: str | None = None,
  eta: float = 0.0,
  cfg_scale: float | None = 1.5,
  guided_channels: int | None = None,
  temperature: float = 0.7,
  top_k: int = 50,
  top_p: float = 0.95,
  seed: int = 0,
  max_wait: int | None = None,
  batch_size: int | None = None,
  progress: Callable | None = None,
) -> list[Answer]:
  """Text with images inline for each prompt: the model writes text and,
  where it writes <|im_start|>, draws an image (text/interleaved.py; `max_wait`:
  the columns a row waits for other rows to ask for an image too, so that
  they draw in one pass; None: the columns an image takes, 0: none).

  `images`: None, or one image per prompt (a path, PIL image or array; None
  for none) that the prompt reads first. `max_new_tokens` counts the columns
  after the prompt, images included (an image takes P + 2 of them, one more
  with add_before_image_tokens); None: as many as the rows can write before
  each reaches data.seq_len. `batch_size` prompts are answered at a time
  (None: all together; batch k > 0 draws from fold_in(PRNGKey(seed), k)).
  Images come back as pixels in [0, 1].
  """
  prompts = check_prompts(prompts)
  if None in prompts:
    raise ConfigError('interleaved prompts must be strings ("" for none)')
  check_text_sampling(
    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
  )
  _check_drawing(
    config,
    num_steps=num_steps,
    cfg_scale=cfg_scale,
    eta=eta,
    sampler=sampler,
    guided_channels=guided_channels,
  )
  seed = check_seed(seed)
  if images is not None:
    if isinstance(images, (str, os.PathLike)) or len(images) != len(prompts):
      raise ConfigError(
        f"images={images!r:.80}: give a list of one image per prompt ({len(prompts)}; None for "
        "a prompt that reads none)"
      )
    _check_vae(config, vae)
  reads = [False] * len(prompts) if images is None else [x is not None for x in images]
  batches = _batches(len(prompts), batch_size)
  budgets = interleaved_budgets(
    config, tokenizer, prompts, reads=reads, max_new_tokens=max_new_tokens, batch_size=batch_size
  )
  spec = row_spec(config, tokenizer)
  rows = [prompt_format.text_prompt_ids(p, tokenizer) for p in prompts]
  given = [i for i, r in enumerate(reads) if r]
  read = _read_inputs([images[i] for i in given], config, vae) if given else []
  for i, x in zip(given, read):
    rows[i] = prompt_format.read_prompt_example(prompts[i], x, tokenizer)
  process = from_config(config.diffusion, respacing=str(num_steps))
  outs = []
  for k, (batch, budget) in enumerate(zip(batches, budgets)):
    outs += interleave(
      model,
      rows[batch],
      ids=TokenIds.of(tokenizer),
      max_new_tokens=budget,
      diffusion=process,
      key=_batch_key(seed, k),
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
  {"text": ...} or {"image": path}). Returns the page's path. `out_dir` may
  be on a bucket (`gs://...`); each file is written whole."""
  import json

  from etils import epath

  from monoformer_jax.paths import whole_file

  (epath.Path(out_dir) / name).mkdir(parents=True, exist_ok=True)

  def save(r, k, picture):
    path = f"{name}/{r}_{k}.png"
    with whole_file(os.path.join(out_dir, path)) as f:
      picture.save(f, format="PNG")
    return path

  page, rows = interleaved_html(answers, prompts, scale=scale, labels=labels, image_src=save)
  path = os.path.join(out_dir, f"{name}.html")
  with whole_file(path) as f:
    f.write(page.encode())
  with whole_file(os.path.join(out_dir, f"{name}.json")) as f:
    f.write(json.dumps(rows, indent=1).encode())
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
  sampler: str | None = None,
  eta: float = 0.0,
  guided_channels: int | None = None,
  seed: int = 0,
  batch_size: int | None = None,
  progress: Callable | None = None,
):
  """x_0 [B, h, w, C] in the model's space: each image (path, PIL image or
  array) READ and redrawn by its instruction (one string, or one per image).

  `guidance` drops, for the guided rows, "both" (the null prompt), "text"
  (the instruction: guides toward following it), "image" (the source), or
  "two_scale": InstructPix2Pix's guidance, `cfg_scale` = (text scale, image
  scale); None or a cfg_scale of 0 turns guidance off. `batch_size` images
  are edited at a time (None: all at once; batch k > 0 draws its noise from
  fold_in(PRNGKey(seed), k)).
  """
  images = _image_list(images)
  instructions = _one_each(instructions, images, "instructions", "per")
  if guidance not in (None,) + prompt_format.EDIT_GUIDANCE:
    raise ConfigError(f"guidance={guidance!r}: choose None or one of {prompt_format.EDIT_GUIDANCE}")
  drawing = dict(eta=eta, sampler=sampler, guided_channels=guided_channels, num_steps=num_steps)
  if guidance == "two_scale":
    if not isinstance(cfg_scale, (tuple, list)) or len(cfg_scale) != 2:
      raise ConfigError(
        f"guidance='two_scale' takes cfg_scale=(text scale, image scale), got {cfg_scale!r}"
      )
    for scale in cfg_scale:
      _check_drawing(config, cfg_scale=scale, **drawing)
  else:
    _check_drawing(config, cfg_scale=cfg_scale, **drawing)
    if not cfg_scale:
      guidance = None
  if guidance is None:
    cfg_scale = None
  seed = check_seed(seed)
  _check_vae(config, vae)
  check_budget(config, tokenizer, "edit", instructions)
  batches = _batches(len(images), batch_size)
  spec = row_spec(config, tokenizer)
  sources = _read_inputs(images, config, vae)
  process = from_config(config.diffusion, respacing=str(num_steps))
  rows_of = lambda batch: prompt_format.edit_rows(
    sources[batch], instructions[batch], tokenizer, spec, guidance=guidance
  )
  return _draw(
    model,
    process,
    batches,
    rows_of,
    seed,
    cfg_scale=cfg_scale,
    guided_channels=guided_channels,
    sampler=sampler,
    eta=eta,
    progress=progress,
  )


def _read_inputs(images, config, vae):
  """`images` as the model's vision encoder takes them (vision/inputs.py), in
  pixels or through the VAE as the config's dataset says."""
  _check_vae(config, vae)
  return read_inputs(images, config, vae, pixels=draws_pixels(config))


def _needs_a_vae(config) -> ConfigError:
  return ConfigError(
    f"this model draws {config.model.in_channels}-channel latents; decode them with "
    "the SD-VAE: pass --vae=DIR (a diffusers AutoencoderKL folder such as "
    "sd-vae-ft-mse) or set config.vae.path"
  )


def _check_vae(config, vae, name: str = "vae", path: str | None = None):
  """A VAE only for a latent model, and one whose latents are the model's
  (`name`: the argument it came from, `path`: where it was read). Without a
  config (decoding latents alone) there is nothing to check it against."""
  if vae is None or config is None:
    return
  given = name if path is None else f"{name}={path!r}"
  if draws_pixels(config):
    raise ConfigError(
      f"{given} given, but this model works in pixels (data.name={config.data.name!r}): "
      f"there are no latents for an SD-VAE to decode or encode; leave {name} out"
    )
  channels = vae.config.latent_channels
  if channels != config.model.in_channels:
    raise ConfigError(
      f"{given} makes {channels}-channel latents, but this model draws "
      f"{config.model.in_channels}-channel ones (model.in_channels); pass the VAE the "
      "model was trained with"
    )


def load_vae_of(config, path: str | None = None, *, flag: str = "path"):
  """The SD-VAE that decodes a latent model's samples (`path`, else the
  config's `vae.path`); None for a pixel model. Raises, naming the fix, for a
  latent model without one, a `path` given to a pixel model, or a VAE whose
  latents are not the model's (`flag`: how the caller names `path`)."""
  if draws_pixels(config):
    if path:
      _check_vae(config, path, flag, path)  # refused: nothing to decode
    return None  # a pixel model's config.vae.path decodes nothing
  name = flag if path else "config.vae.path"
  path = path or config.vae.path
  if not path:
    raise _needs_a_vae(config)
  vae = load_vae(path)
  _check_vae(config, vae, name, path)
  return vae


def to_pixels(x0, config, vae=None) -> np.ndarray:
  """Samples as float32 [B, h, w, C] images in [0, 1]: latents decoded by
  `vae` (see `load_vae_of`), or the pixels of a pixel model."""
  _check_vae(config, vae)
  if vae is not None:
    x0 = decode_latents(vae, np.asarray(x0, np.float32))
  elif not draws_pixels(config):
    raise _needs_a_vae(config)
  return to_unit_range(x0)


def image_grid(images_BxhxwxC, rows: int, scale: int = 1, pad: int = 1):
  """A PIL image of `rows` rows of samples on a white background, each pixel
  a `scale` x `scale` block (built in uint8, one image at a time: the grid is
  the only copy of that size)."""
  n, h, w, c = images_BxhxwxC.shape
  cols = -(-n // rows)
  hs, ws = h * scale, w * scale
  grid = np.full((rows * (hs + pad) + pad, cols * (ws + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, cols)
    pixels = (np.clip(np.asarray(images_BxhxwxC[i], np.float32), 0, 1) * 255).round()
    grid[
      pad + r * (hs + pad) : pad + r * (hs + pad) + hs,
      pad + col * (ws + pad) : pad + col * (ws + pad) + ws,
    ] = pixels.astype(np.uint8).repeat(scale, axis=0).repeat(scale, axis=1)
  return Image.fromarray(grid[..., 0] if c == 1 else grid)


def grid_bytes(n: int, rows: int, size: int, channels: int, scale: int, pad: int = 1) -> int:
  """The bytes of `image_grid`'s grid of n images of size x size x channels."""
  cols = -(-n // max(rows, 1))
  side = size * scale + pad
  return (rows * side + pad) * (cols * side + pad) * channels
