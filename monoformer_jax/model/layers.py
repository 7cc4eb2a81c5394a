"""The building blocks every network of the package is made of (Flax NNX).

A parameter is float32 and names its logical axes (`embed`, `heads`, `mlp`,
...) in its `logical_axes` metadata; the config's sharding rules map those to
mesh axes (parallel/sharding.py). Kernels are stored [in, out]; `dense`
multiplies by one as ONE 2-D matmul, and `Dense` adds a bias. The decoder
(llama.py), MonoFormer's image heads (monoformer.py), the CLIP tower
(clip.py), the SD-VAE (vae/) and Inception (eval/) build on these.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02  # Llama's initializer_range


def param(
  rngs: nnx.Rngs | None, shape, axes, init: str = "normal", std: float = INIT_STD
) -> nnx.Param:
  """A float32 parameter with logical axis names; init 'normal', 'ones' or 'zeros'."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match shape {shape}")
  if init == "normal":
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  elif init == "zeros":
    value = jnp.zeros(shape, jnp.float32)
  else:
    raise ValueError(f"unknown init {init!r}")
  # Our own metadata key: Flax acts on `out_sharding` by itself (eager sharding,
  # eval_shape under a mesh); the mapping to mesh axes is ours (parallel/).
  return nnx.Param(value, logical_axes=tuple(axes))


def logical_axes_of(var: nnx.Variable) -> tuple:
  """A parameter's logical axes; vmap-stacked layers gain a leading 'layers'."""
  axes = tuple(var.get_metadata()["logical_axes"])
  if len(axes) == len(var.shape) - 1:
    axes = ("layers",) + axes
  if len(axes) != len(var.shape):
    raise ValueError(f"logical axes {axes} do not match shape {var.shape}")
  return axes


def dense(x, w, n_in: int = 1, out_dtype=None):
  """x [..., *in] @ w [*in, *out] -> [..., *out]: the last `n_in` dims of x
  contracted with the first `n_in` of w, as ONE 2-D matmul over the flattened
  leading dims (reshapes of contiguous dims cost nothing). XLA:CPU runs the
  weight gradient of a batched 3-D einsum (two contracted dims) about half as
  fast as the same 2-D matmul, which made the backward cost 5 forwards; on
  TPU and GPU the two are the same program. `out_dtype`: the accumulator's
  and result's dtype (default x's).
  """
  lead, inner = x.shape[: x.ndim - n_in], w.shape[:n_in]
  if x.shape[x.ndim - n_in :] != inner:
    raise ValueError(f"dense: x {x.shape} does not end in w's input dims {inner}")
  out = w.shape[n_in:]
  y = jnp.matmul(
    x.reshape(-1, math.prod(inner)),
    w.reshape(math.prod(inner), -1).astype(x.dtype),
    preferred_element_type=out_dtype,
  )
  return y.reshape(*lead, *out)


class Dense(nnx.Module):
  """y = x @ W + b, kernel [in, out]; the image-side modules all have biases."""

  def __init__(self, din, dout, axes, *, rngs, init="normal", std=INIT_STD):
    self.kernel = param(rngs, (din, dout), axes, init=init, std=std)
    self.bias = param(rngs, (dout,), axes[1:], init="zeros")

  def __call__(self, x):
    return dense(x, self.kernel[...]) + self.bias[...].astype(x.dtype)
