"""Image-side embeddings: patchify/unpatchify, the 2-D sin-cos table, timesteps.

Latents are channels-last [..., h, w, C]. The reference orders a patch token's
INPUT features (c, ph, pw) (channel slowest) but reads its OUTPUT features as
(ph, pw, c) (channel fastest); both orders are kept here so that official
weights load unchanged.
"""

import math

import jax.numpy as jnp
import numpy as np


def patchify(x_NxHxWxC, p: int):
  """[N, h, w, C] -> [N, (h/p)*(w/p), C*p*p], tokens row-major, features (c, ph, pw)."""
  n, h, w, c = x_NxHxWxC.shape
  x = x_NxHxWxC.reshape(n, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)  # n, gh, gw, c, ph, pw
  return x.reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(x_NxTxF, p: int, h: int, w: int):
  """[N, (h/p)*(w/p), p*p*C] with features (ph, pw, c) -> [N, h, w, C]."""
  n, _, f = x_NxTxF.shape
  c = f // (p * p)
  x = x_NxTxF.reshape(n, h // p, w // p, p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # n, gh, ph, gw, pw, c
  return x.reshape(n, h, w, c)


def _sincos_1d(width: int, pos):
  omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
  out = np.outer(pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(width: int, grid: int) -> np.ndarray:
  """Fixed [grid*grid, width] table (DiT/MAE), tokens row-major over (h, w).

  The first half of the width encodes the column (w) and the second the row
  (h): MAE builds its grid with meshgrid(w, h), and the checkpoints expect it.
  """
  if width % 4:
    raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {width}")
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64),
                           np.arange(grid, dtype=np.float64), indexing="ij")
  emb = np.concatenate([_sincos_1d(width // 2, cols), _sincos_1d(width // 2, rows)], axis=1)
  return emb.astype(np.float32)


def timestep_features(t, dim: int = 256, max_period: float = 10000.0):
  """DiT sinusoidal features [..., dim] of integer timesteps t, order [cos, sin]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
