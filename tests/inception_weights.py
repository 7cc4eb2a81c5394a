"""Seeded random weights for the FID Inception, shared by the fixture script
(tests/fixtures/make_inception_fixture.py, which runs pytorch-fid on them) and
tests/test_inception.py (which rebuilds the same arrays instead of storing 95 MB).

Scaled so activations stay O(1) through the ~50 layers: conv weights
N(0, 2 / fan_in) (He, for the ReLUs), BatchNorm weight 1 + N(0, 0.1^2), bias
and running_mean N(0, 0.1^2), running_var uniform in [0.5, 1.5) (so eps 0.001
changes each layer by ~1e-3 and a wrong eps shows), fc N(0, 1 / fan_in).
"""

import math

import numpy as np


def random_state_dict(keys_and_shapes: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """key -> array for every (key, shape) in `keys_and_shapes`, in its order:
  float32, but int64 counters for `*.num_batches_tracked`."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, dims in keys_and_shapes.items():
    shape = tuple(dims)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
      out[key] = np.array(rng.integers(0, 1000), np.int64)
      continue
    if len(shape) >= 2:  # conv OIHW, fc [out, in]
      fan_in = math.prod(shape[1:])
      std = math.sqrt((1.0 if len(shape) == 2 else 2.0) / fan_in)
      value = std * rng.standard_normal(shape)
    elif leaf == "weight":
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif leaf in ("bias", "running_mean"):
      value = 0.1 * rng.standard_normal(shape)
    elif leaf == "running_var":
      value = rng.uniform(0.5, 1.5, shape)
    else:
      raise ValueError(f"no random rule for {key!r} {shape}")
    out[key] = value.astype(np.float32)
  return out


def fingerprint(state: dict) -> list[float]:
  """[sum, sum of squares] over all float tensors: tells whether numpy still
  draws the numbers the fixture was made with."""
  values = [
    np.asarray(v, np.float64).ravel() for v in state.values() if np.asarray(v).dtype.kind == "f"
  ]
  return [float(sum(v.sum() for v in values)), float(sum((v * v).sum() for v in values))]
