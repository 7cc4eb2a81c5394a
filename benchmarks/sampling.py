"""Sampling speed: images/s with and without the prompt cache, tokens/s with and
without the KV cache.

    python benchmarks/sampling.py                         # CPU-sized defaults
    python benchmarks/sampling.py --paper_model=full      # the 1.1B model (GPU/TPU)

Layouts:
- `digits`: the embedded default's model (configs/digits.py) drawing
  `--digits_images` guided digits with its 50 DDPM steps, as the training run
  does at its end;
- `paper`: the reference's sampling row, a prompt of `--prompt_lengths` tokens
  (16: a class prompt) then 256 image tokens (32x32x4 latents, patch 2), 20
  DDPM steps with guidance (a doubled batch). `--paper_model=full` is
  MonoFormer-1.1B (TinyLlama shape, bfloat16 compute); `small` keeps the
  layout with a 4-layer, 256-wide model so that it runs on a CPU;
- text: greedy decoding of `--new_tokens` tokens after a 32-token prompt, for
  each model above.
Weights are random (speed does not depend on them). Each figure is the median
of `--iters` calls after a compile and a warm-up; results go to stdout and
into a section of `--output`.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import report
from absl import flags
from flax import nnx

from monoformer_jax.config import base, config_file
from monoformer_jax.data.prompts import image_rows, text_prompt_ids
from monoformer_jax.diffusion.gaussian import from_config
from monoformer_jax.diffusion.sample_images import sample_images
from monoformer_jax.text.generate import generate
from monoformer_jax.text.tokenizer import ByteTokenizer

_LAYOUTS = flags.DEFINE_list("layouts", ["digits", "paper"], "digits and/or paper")
_PAPER_MODEL = flags.DEFINE_enum(
  "paper_model", "small", ["small", "full"], "the paper layout's model: 4x256 (CPU) or the 1.1B"
)
_PROMPT_LENGTHS = flags.DEFINE_list(
  "prompt_lengths", ["16", "128"], "prompt tokens before the image (paper layout)"
)
_PAPER_IMAGES = flags.DEFINE_integer("paper_images", 4, "images per call (paper layout)")
_DIGITS_IMAGES = flags.DEFINE_integer("digits_images", 200, "images per call (digits)")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "tokens generated per text row")
_TEXT_ROWS = flags.DEFINE_integer("text_rows", 8, "text rows per call")
_ITERS = flags.DEFINE_integer("iters", 3, "timed calls per figure")
_OUTPUT = flags.DEFINE_string("output", "docs/benchmarks.md", "markdown file ('' for none)")

TOK = ByteTokenizer()


def paper_model_config():
  if _PAPER_MODEL.value == "full":
    return config_file("imagenet256").model
  return report.paper_layout_cpu_model()


def image_rate(
  model, prompt_len: int, images: int, steps: int, cfg_scale: float, use_cache: bool
) -> float:
  rows = image_rows(
    ["x" * (prompt_len - 2)] * images, TOK, model.tokens_per_image, guidance=True
  )  # <s>, the prompt, <|im_start|>: prompt_len tokens
  # Both layouts' configs (digits, imagenet256) keep the schema's process.
  diffusion = from_config(base().diffusion, respacing=str(steps))
  key = jax.random.PRNGKey(0)
  t = report.median_seconds(
    lambda: sample_images(model, rows, diffusion, key, cfg_scale=cfg_scale, use_cache=use_cache),
    iters=_ITERS.value,
  )
  return images / t


def token_rate(model, use_cache: bool) -> float:
  prompts = [text_prompt_ids("y" * 31, TOK)] * _TEXT_ROWS.value
  run = lambda: generate(
    model,
    prompts,
    max_new_tokens=_NEW_TOKENS.value,
    pad_id=TOK.pad_id,
    stop_ids=[],
    use_cache=use_cache,
  )
  return _TEXT_ROWS.value * _NEW_TOKENS.value / report.median_seconds(run, iters=_ITERS.value)


def main(argv):
  del argv
  results = []  # (model, what, batch, uncached rate, cached rate, unit)
  models = {}
  if "digits" in _LAYOUTS.value:
    models["digits"] = report.random_model(config_file("digits").model)
  if "paper" in _LAYOUTS.value:
    models[f"paper-layout, {_PAPER_MODEL.value}"] = report.random_model(paper_model_config())
  for name, model in list(models.items()):
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    print(f"{name}: {n_params:,} parameters", flush=True)
    if name.startswith("digits"):
      cases = [
        (
          f"{_DIGITS_IMAGES.value} digits, 24-token prompts, 50 DDPM steps, CFG",
          24,
          _DIGITS_IMAGES.value,
          50,
        )
      ]
    else:
      cases = [
        (
          f"{int(p)}-token prompt + 256 image tokens, 20 steps, CFG",
          int(p),
          _PAPER_IMAGES.value,
          20,
        )
        for p in _PROMPT_LENGTHS.value
      ]
    label = f"{name} ({n_params / 1e6:.3g}M)"
    for what, prompt_len, images, steps in cases:
      rates = [image_rate(model, prompt_len, images, steps, 2.0, c) for c in (False, True)]
      results.append((label, what, images, *rates, "images/s"))
      print(f"  {what}: {rates[0]:.3g} -> {rates[1]:.3g} images/s", flush=True)
    rates = [token_rate(model, c) for c in (False, True)]
    what = f"greedy text, 32-token prompt + {_NEW_TOKENS.value} new"
    results.append((label, what, _TEXT_ROWS.value, *rates, "tokens/s"))
    print(f"  {what}: {rates[0]:.3g} -> {rates[1]:.3g} tokens/s", flush=True)

  if _OUTPUT.value:
    lines = [
      f"Command: `python {' '.join(sys.argv)}`",
      "",
      f"Hardware: {report.hardware()}. Median of {_ITERS.value} calls, random "
      "weights, float32 unless the model's config says otherwise.",
      "",
      "| model | work | batch | no cache | cache | speed-up |",
      "|---|---|---|---|---|---|",
    ]
    for name, what, batch, slow, fast, unit in results:
      lines.append(
        f"| {name} | {what} | {batch} | {slow:.3g} {unit} | {fast:.3g} {unit} | "
        f"{fast / slow:.2f}x |"
      )
    report.write_section(pathlib.Path(_OUTPUT.value), "Sampling", lines)


if __name__ == "__main__":
  report.run(main)
