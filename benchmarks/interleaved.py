"""Interleaved sampling speed: rows that wait to draw together, against rows
that draw as soon as they ask.

    python -m monoformer_jax.train --config=configs/digits.py --workdir=/tmp/digits
    python benchmarks/interleaved.py --checkpoint=/tmp/digits/checkpoints

The work is the digits evaluator's (digits/evaluators.interleaved_accuracy): 20
answers to "here is a" sampled at temperature 1, each image by 50 guided DDPM
steps, from a trained checkpoint's EMA weights (random weights never ask for
an image). For `max_wait` 0 (every row draws as soon as it asks: the sampler
before rows waited) and the default (up to an image's columns), the median of
`--iters` runs after a compile and a warm-up, the passes of denoising steps
(each runs the whole batch), the images drawn, and whether both settings wrote
the same text.
"""

from __future__ import annotations

import functools
import pathlib
import statistics
import sys
import time

import report
from absl import flags

from monoformer_jax.checkpoints import load_model
from monoformer_jax.digits.evaluators import interleaved_accuracy
from monoformer_jax.errors import ConfigError
from monoformer_jax.text.tokenizer import tokenizer_of

_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "a digits run's checkpoints folder")
_PROMPTS = flags.DEFINE_integer("prompts", 20, "answers per batch (the evaluator's 20)")
_ITERS = flags.DEFINE_integer("iters", 3, "timed runs per setting (median)")
_OUTPUT = flags.DEFINE_string("output", "docs/benchmarks.md", "markdown file ('' for none)")


def run(model, tokenizer, config, max_wait, prompts: int = 20, num_steps: int = 50):
  """(seconds, passes, images, texts) of the evaluator's answers at `max_wait`."""
  passes = []
  t0 = time.perf_counter()
  metrics, answers, _ = interleaved_accuracy(
    model,
    tokenizer,
    config,
    num_prompts=prompts,
    num_steps=num_steps,
    seed=0,
    max_wait=max_wait,
    progress=lambda m: passes.append(m) if m.startswith("drawing") else None,
  )
  seconds = time.perf_counter() - t0
  texts = ["".join(v for kind, v in a.pieces if kind == "text") for a in answers]
  return seconds, len(passes), metrics["interleaved_images"], texts


def main(argv):
  del argv
  if not _CHECKPOINT.value:
    raise ConfigError(
      "--checkpoint: give a digits run's checkpoints folder, e.g. "
      "--checkpoint=/tmp/digits/checkpoints (the README's main job)"
    )
  model, config = load_model(_CHECKPOINT.value)
  tokenizer = tokenizer_of(config)
  rows = []
  for label, max_wait in (
    ("0 (each row draws when it asks)", 0),
    ("default (an image's columns)", None),
  ):
    timed = functools.partial(run, model, tokenizer, config, max_wait, _PROMPTS.value)
    timed()  # compile
    results = [timed() for _ in range(1 + _ITERS.value)][1:]
    seconds = statistics.median(r[0] for r in results)
    _, passes, images, texts = results[0]
    rows.append((label, seconds, passes, images, texts))
    print(f"max_wait {label}: {seconds:.2f} s, {images} images in {passes} passes", flush=True)
  same = rows[0][4] == rows[1][4]
  print("the same text:", same)
  if _OUTPUT.value:
    lines = [
      f"Command: `python {' '.join(sys.argv)}`",
      "",
      f"Hardware: {report.hardware()}. The digits evaluator's interleaved answers "
      f'({_PROMPTS.value} x "here is a", temperature 1, 50 guided DDPM steps per '
      f"image) from the checkpoint's EMA weights; the median of {_ITERS.value} runs "
      "after a compile and a warm-up.",
      "",
      "| max_wait | seconds | passes of the denoising steps | images |",
      "|---|---|---|---|",
    ]
    for label, seconds, passes, images, _ in rows:
      lines.append(f"| {label} | {seconds:.2f} | {passes} | {images} |")
    lines += [
      "",
      f"Both settings wrote the same text: {'yes' if same else 'no'} "
      f"({rows[0][1] / rows[1][1]:.1f}x faster waiting).",
    ]
    report.write_section(pathlib.Path(_OUTPUT.value), "Interleaved sampling", lines)


if __name__ == "__main__":
  report.run(main)
