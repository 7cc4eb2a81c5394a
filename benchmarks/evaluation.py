"""Evaluation speed: Inception features, the metrics' linear algebra, commonsense scoring.

    python benchmarks/evaluation.py

- Inception: `--images` uint8 images of `--resolution` (ADM's 256) through the
  FID Inception-v3 (resized to 299), `--batch` per call, on every device;
- Fréchet distance of 2048-d statistics (the FID's matrix square root, scipy),
  once; precision and recall of `--pr_features` samples against as many
  references (2048-d, k = 3), once;
- commonsense: `--requests` (context, continuation) pairs of ~`--request_len`
  byte tokens scored by the paper-layout CPU model of benchmarks/sampling.py
  (4 layers, 256 wide).
Weights and inputs are random (speed does not depend on them). Results go to
stdout and into a section of `--output`.
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import numpy as np
import report
from absl import flags
from flax import nnx

from monoformer_jax.eval import commonsense, fid
from monoformer_jax.eval.inception import InceptionV3, inception_features
from monoformer_jax.text.tokenizer import ByteTokenizer

_IMAGES = flags.DEFINE_integer("images", 200, "images through the Inception")
_RESOLUTION = flags.DEFINE_integer("resolution", 256, "their side")
_BATCH = flags.DEFINE_integer("batch", 50, "images per Inception call")
_PR_FEATURES = flags.DEFINE_integer("pr_features", 5000, "features per set for precision/recall")
_REQUESTS = flags.DEFINE_integer("requests", 256, "commonsense requests")
_REQUEST_LEN = flags.DEFINE_integer("request_len", 96, "their length in tokens")
_OUTPUT = flags.DEFINE_string("output", "docs/benchmarks.md", "markdown file ('' for none)")


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def main(argv):
  del argv
  rows = []  # (what, figure)
  rng = np.random.default_rng(0)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))

  model = InceptionV3(rngs=nnx.Rngs(0))
  images = rng.integers(
    0, 256, (_IMAGES.value, _RESOLUTION.value, _RESOLUTION.value, 3), dtype=np.uint8
  )
  inception_features(model, images[: _BATCH.value], batch_size=_BATCH.value, mesh=mesh)  # compile
  _, seconds = timed(lambda: inception_features(model, images, batch_size=_BATCH.value, mesh=mesh))
  rate = _IMAGES.value / seconds
  rows.append(
    (
      f"Inception features, {_RESOLUTION.value}x{_RESOLUTION.value} uint8 -> 299, "
      f"batch {_BATCH.value}",
      f"{rate:,.1f} images/s (50,000 in {50_000 / rate / 3600:.2f} h)",
    )
  )
  print(rows[-1], flush=True)

  a = fid.statistics(rng.standard_normal((3000, 2048)))
  b = fid.statistics(rng.standard_normal((3000, 2048)) * 1.1 + 0.1)
  _, seconds = timed(lambda: fid.frechet_distance(a, b))
  rows.append(
    ("Fréchet distance, 2048-d (scipy sqrtm; FID and sFID take one each)", f"{seconds:.1f} s")
  )
  print(rows[-1], flush=True)

  n = _PR_FEATURES.value
  real = rng.standard_normal((n, 2048)).astype(np.float32)
  fake = (rng.standard_normal((n, 2048)) * 1.05).astype(np.float32)
  _, seconds = timed(lambda: fid.precision_recall(real, fake, k=3))
  rows.append(
    (
      f"precision/recall, {n:,} x {n:,} features of 2048, k = 3",
      f"{seconds:.1f} s (10,000 x 50,000, ADM's: ~{seconds * 20:.0f} s by the pair count)",
    )
  )
  print(rows[-1], flush=True)

  lm = report.random_model(report.paper_layout_cpu_model())
  tok = ByteTokenizer()
  words = "the quick brown fox jumps over a lazy dog while seven birds sing".split()
  requests = []
  for i in range(_REQUESTS.value):
    context = " ".join(words[(i + j) % len(words)] for j in range(_REQUEST_LEN.value // 5))
    requests.append((context[: _REQUEST_LEN.value - 8], " answer"))
  commonsense.loglikelihoods(lm, tok, requests[:32], progress=False)  # compile
  _, seconds = timed(lambda: commonsense.loglikelihoods(lm, tok, requests, progress=False))
  rows.append(
    (
      f"commonsense scoring, {_REQUEST_LEN.value}-token requests, 4x256 model",
      f"{_REQUESTS.value / seconds:,.0f} requests/s",
    )
  )
  print(rows[-1], flush=True)

  if _OUTPUT.value:
    lines = [
      f"Command: `python {' '.join(sys.argv)}`",
      "",
      f"Hardware: {report.hardware()}. One timed run after a compile; random weights and inputs.",
      "",
      "| work | speed |",
      "|---|---|",
    ]
    lines += [f"| {what} | {figure} |" for what, figure in rows]
    report.write_section(pathlib.Path(_OUTPUT.value), "Evaluation", lines)


if __name__ == "__main__":
  report.run(main)
