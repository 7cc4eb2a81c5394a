"""Evaluation: `python -m monoformer_jax.evaluate`, the evaluators inside
training (`config.evals`) and the end-of-run sample scores (`sample.metrics`).

    registry.py        the evaluators by metric name: one line per family module,
                       what each scores, reads, and whether it runs inside training
    score.py           scoring samples and models with them; the evaluators inside
                       training; their eval/ row
    image_metrics.py   the fid family (fid, sfid, is, precision_recall)
    commonsense.py     zero-shot multiple choice by log-likelihood (HellaSwag, PIQA, ...)
    sampling.py        50,000 class-conditional samples in resumable chunks, ADM's npz
    inception.py       the FID Inception-v3 in Flax NNX, from pytorch-fid's weights file
    fid.py             FID, sFID, IS, precision/recall as ADM's evaluator; reference batches
The embedded default's evaluators are its own (monoformer_jax/digits/evaluators.py).
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_json(record: Any, **dumps_kwargs) -> str:
  """`record` as strict JSON (what metrics.jsonl and summary.json hold): a
  non-finite float is written as null, since JSON has no NaN or Infinity."""

  def clean(x):
    if isinstance(x, float) and not math.isfinite(x):
      return None
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    return x

  return json.dumps(clean(record), allow_nan=False, **dumps_kwargs)
