"""Pixel conventions: the model sees pixels (and the SD-VAE reads and writes them) in [-1, 1]."""

import numpy as np


def to_unit_range(x) -> np.ndarray:
  """Model-space pixels [-1, 1] -> [0, 1] (clipped), for writing and showing samples."""
  return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def from_unit_range(x) -> np.ndarray:
  """Pixels in [0, 1] -> model space [-1, 1]."""
  return np.asarray(x, np.float32) * 2.0 - 1.0
