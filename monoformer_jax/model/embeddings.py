"""Image-side embeddings: patchify/unpatchify, the 2-D sin-cos table, timesteps.

Latents are channels-last [..., h, w, C]. The reference orders a patch token's
INPUT features (c, ph, pw) (channel slowest) but reads its OUTPUT features as
(ph, pw, c) (channel fastest); the einops patterns below state both, so that
official weights load unchanged.
"""

import math

import einops
import jax.numpy as jnp
import numpy as np


def patchify(x_BxhxwxC, p: int):
  """[B, h, w, C] -> [B, P, Z]: tokens row-major over the (h/p, w/p) grid,
  features Z = C*p*p ordered (c, ph, pw)."""
  return einops.rearrange(x_BxhxwxC, "b (gh ph) (gw pw) c -> b (gh gw) (c ph pw)", ph=p, pw=p)


def unpatchify(x_BxPxZ, p: int, h: int, w: int):
  """[B, P, Z] with features Z = p*p*C ordered (ph, pw, c) -> [B, h, w, C]."""
  return einops.rearrange(
    x_BxPxZ, "b (gh gw) (ph pw c) -> b (gh ph) (gw pw) c", gh=h // p, gw=w // p, ph=p, pw=p
  )


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
  rows, cols = np.meshgrid(
    np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij"
  )
  emb = np.concatenate([_sincos_1d(width // 2, cols), _sincos_1d(width // 2, rows)], axis=1)
  return emb.astype(np.float32)


def timestep_features(t, dim: int = 256, max_period: float = 10000.0):
  """DiT sinusoidal features [..., dim] of integer timesteps t, order [cos, sin]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
