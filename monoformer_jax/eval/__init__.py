"""Evaluation: metrics of generated samples, named in configs (`sample.metrics`).

    digits.py   digits_classifier: does a classifier fitted on the real 8x8
                digits recognise each sample as the digit it was prompted with?

A sample metric takes (images float32 [B, h, w, C] in [0, 1], labels int [B])
and returns a dict of JSON-able numbers.
"""

from __future__ import annotations

from typing import Callable

from monoformer_jax.eval import digits

SAMPLE_METRICS: dict[str, Callable] = {
    "digits_classifier": digits.sample_metrics,
}


def sample_metric(name: str) -> Callable:
  if name not in SAMPLE_METRICS:
    raise ValueError(f"sample metric {name!r} is not known; config.sample.metrics may name "
                     f"{tuple(SAMPLE_METRICS)}")
  return SAMPLE_METRICS[name]
