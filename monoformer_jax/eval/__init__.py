"""Evaluation: metrics of generated samples, named in configs (`sample.metrics`).

    digits.py   digits_classifier: does a classifier fitted on the real 8x8
                digits recognise each sample as the digit it was prompted with?

A sample metric takes (images float32 [B, h, w, C] in [0, 1], labels int [B])
and returns a dict of JSON-able numbers.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

from monoformer_jax.errors import ConfigError
from monoformer_jax.eval import digits

SAMPLE_METRICS: dict[str, Callable] = {
    "digits_classifier": digits.sample_metrics,
}


def sample_metric(name: str) -> Callable:
  if name not in SAMPLE_METRICS:
    raise ConfigError(f"sample metric {name!r} is not known; config.sample.metrics may name "
                      f"{tuple(SAMPLE_METRICS)}")
  return SAMPLE_METRICS[name]


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
