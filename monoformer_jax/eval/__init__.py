"""Evaluation: `python -m monoformer_jax.evaluate`, the evaluators inside
training (`config.evals`) and the end-of-run sample scores (`sample.metrics`).

    score.py        the metrics by name (fid, sfid, is, precision_recall, digits,
                    commonsense) and the evaluators inside training
    sampling.py     50,000 class-conditional samples in resumable chunks, ADM's npz
    inception.py    the FID Inception-v3 in Flax NNX, from pytorch-fid's weights file
    pth.py          PyTorch state-dict files read without torch
    fid.py          FID, sFID, IS, precision/recall as ADM's evaluator; reference batches
    digits.py       the embedded default: classifier accuracy and Fréchet distance
    commonsense.py  zero-shot multiple choice by log-likelihood (HellaSwag, PIQA, ...)
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
