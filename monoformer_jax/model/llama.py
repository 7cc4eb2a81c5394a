"""The Llama decoder MonoFormer shares between its two jobs (Flax NNX).

RMSNorm computed in float32, RoPE in the `rotate_half` layout (first half /
second half of the head dim), grouped-query attention, SwiGLU MLP, no biases.
The layers are built stacked (a leading `layers` axis on every parameter) and
applied with `jax.lax.scan`: one compiled layer body whatever the depth
(`model.scan_unroll` layers per iteration: a small model runs faster with all
of them unrolled, at the price of compiling each).

Kernels are stored [in, out] with heads split out (wq [E, H, D], wo [H, D, E]);
each parameter names its logical axes (model/layers.py's `param`; the stacked
layers' leading axis is `layers`, added by `logical_axes_of`).

Decoding and cached sampling pass a `KVCache`: per layer, keys and values of a
whole row of L tokens [N, B, L, K, D] (N layers). A call then embeds only the
Lq new tokens at row columns offset .. offset + Lq - 1, writes their keys and
values there and attends over the whole row, whose `segment_ids` and
`image_ids` [B, L] the caller gives (the mask hides what is not written yet:
it lies ahead of every query, or in another example).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from monoformer_jax.model.layers import dense, param
from monoformer_jax.ops.attention import attention
from monoformer_jax.parallel.sharding import constrain


class RMSNorm(nnx.Module):
  """x / rms(x) * w, the statistics in float32 whatever the compute dtype."""

  def __init__(self, dim: int, eps: float, *, rngs=None):
    del rngs
    self.scale = param(None, (dim,), ("embed",), init="ones")
    self.eps = eps

  def __call__(self, x_BxLxE):
    x = x_BxLxE.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x_BxLxE.dtype) * x.astype(x_BxLxE.dtype)


def rope_tables(positions_BxL, head_dim: int, theta: float):
  """cos, sin [B, L, D] for `rotate_half` RoPE, computed in float32."""
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  freqs_BxLxD2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs_BxLxD2, freqs_BxLxD2], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxLxHxD, cos_BxLxD, sin_BxLxD):
  half = x_BxLxHxD.shape[-1] // 2
  rotated = jnp.concatenate([-x_BxLxHxD[..., half:], x_BxLxHxD[..., :half]], axis=-1)
  cos = cos_BxLxD[:, :, None].astype(x_BxLxHxD.dtype)
  sin = sin_BxLxD[:, :, None].astype(x_BxLxHxD.dtype)
  return x_BxLxHxD * cos + rotated * sin


class KVCache(NamedTuple):
  """Keys and values of every layer for a row of L tokens: [N, B, L, K, D] each."""

  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, cfg, batch: int, length: int, dtype) -> KVCache:
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    zeros = constrain(jnp.zeros(shape, dtype), CACHE_AXES)
    return cls(zeros, zeros)


CACHE_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")


class Attention(nnx.Module):
  """Grouped-query self-attention under the mixed mask."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if h % k:
      raise ValueError(f"config.model.num_heads={h} must be a multiple of num_kv_heads={k}")
    self.wq = param(rngs, (e, h, d), ("embed", "heads", "head_dim"))
    self.wk = param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"))
    self.wv = param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"))
    self.wo = param(rngs, (h, d, e), ("heads", "head_dim", "embed"))
    self.impl = cfg.attention_impl

  def __call__(self, x_BxLxE, rope, segment_ids, image_ids, cache=None, offset=None):
    """(output [B, Lq, E], cache): with `cache` ((k, v) [B, L, K, D] of one
    layer) this call's keys and values are written into it at `offset`;
    without, the cache returned is None (and Lq = L)."""
    q_BxLxHxD = dense(x_BxLxE, self.wq[...])
    k_BxLxKxD = dense(x_BxLxE, self.wk[...])
    v_BxLxKxD = dense(x_BxLxE, self.wv[...])
    q_BxLxHxD = apply_rope(q_BxLxHxD, *rope)
    k_BxLxKxD = apply_rope(k_BxLxKxD, *rope)
    q_BxLxHxD = constrain(q_BxLxHxD, ("batch", "length", "heads", "head_dim"))
    if cache is not None:
      k_BxLxKxD, v_BxLxKxD = (
        jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), offset, axis=1)
        for c, new in zip(cache, (k_BxLxKxD, v_BxLxKxD))
      )
      cache = (k_BxLxKxD, v_BxLxKxD)
    out_BxLxHxD = attention(
      q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids, image_ids, impl=self.impl, q_offset=offset
    )
    out_BxLxE = dense(out_BxLxHxD, self.wo[...], n_in=2)
    return out_BxLxE, cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    e, f = cfg.hidden_size, cfg.mlp_dim
    self.w_gate = param(rngs, (e, f), ("embed", "mlp"))
    self.w_up = param(rngs, (e, f), ("embed", "mlp"))
    self.w_down = param(rngs, (f, e), ("mlp", "embed"))

  def __call__(self, x_BxLxE):
    gate_BxLxF = dense(x_BxLxE, self.w_gate[...])
    up_BxLxF = dense(x_BxLxE, self.w_up[...])
    h_BxLxF = constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, ("batch", "length", "mlp"))
    return dense(h_BxLxF, self.w_down[...])


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BxLxE, rope, segment_ids, image_ids, cache=None, offset=None):
    attn_BxLxE, cache = self.attn(
      self.input_norm(x_BxLxE), rope, segment_ids, image_ids, cache, offset
    )
    x_BxLxE = x_BxLxE + attn_BxLxE
    x_BxLxE = x_BxLxE + self.mlp(self.post_attention_norm(x_BxLxE))
    return constrain(x_BxLxE, ("batch", "length", None)), cache


class Decoder(nnx.Module):
  """`num_layers` DecoderLayers stacked on a leading axis, then the final RMSNorm."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.num_layers)
    def make_layers(rngs):
      return DecoderLayer(cfg, rngs=rngs)

    self.layers = make_layers(rngs)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.head_dim = cfg.head_dim
    self.rope_theta = cfg.rope_theta
    self.remat = cfg.remat
    self.unroll = int(cfg.scan_unroll)

  def __call__(
    self,
    x_BxLxE,
    positions,
    segment_ids,
    image_ids,
    *,
    cache=None,
    offset=None,
    return_layer_inputs=False,
  ):
    """Final-normed hidden states [B, L, E] of the tokens x at `positions` [B, L].

    With `cache` (a KVCache of a row of L tokens) x holds the Lq new tokens at
    row columns offset.., the ids are the whole row's [B, L], and the result
    is (hidden states, the updated cache). `return_layer_inputs` also returns
    each layer's input [N, B, L, E] (for comparisons with the reference).
    """
    rope = rope_tables(positions, self.head_dim, self.rope_theta)
    if cache is not None:
      offset = jnp.asarray(offset, jnp.int32)

    # A plain lax.scan over the stacked layer state, merged per step: it works
    # under any outer transform (jit, the samplers' scans and loops).
    layer_def, layer_state = nnx.split(self.layers)

    def body(x, layer):
      state, kv = layer
      y, kv = nnx.merge(layer_def, state)(x, rope, segment_ids, image_ids, kv, offset)
      return y, (x if return_layer_inputs else None, kv)

    if self.remat:
      body = jax.checkpoint(body)
    kv = None if cache is None else tuple(cache)
    n = jax.tree.leaves(layer_state)[0].shape[0]
    if self.unroll >= n and cache is None:
      # Training, fully unrolled: a Python loop over the layers' slices. Unlike
      # a scan (even an unrolled one) it stacks no residuals for the backward.
      # Split, not indexed: the gradient of a split is one concatenation, that
      # of n slices n zero-padded copies summed. (With a cache the scan stays:
      # it updates the cache's layers in place, a split would copy it whole.)
      per_layer = jax.tree.map(lambda a: [s[0] for s in jnp.split(a, n)], layer_state)
      ys = []
      for i in range(n):
        state_i = jax.tree.map(
          lambda a, i=i: a[i], per_layer, is_leaf=lambda a: isinstance(a, list)
        )
        x_BxLxE, y = body(x_BxLxE, (state_i, None))
        ys.append(y[0])
      layer_inputs = jnp.stack(ys) if return_layer_inputs else None
    else:
      x_BxLxE, (layer_inputs, kv) = jax.lax.scan(
        body, x_BxLxE, (layer_state, kv), unroll=self.unroll
      )
    out = self.norm(x_BxLxE)
    if cache is not None:
      out = (out, KVCache(*(constrain(c, CACHE_AXES) for c in kv)))
    return (out, layer_inputs) if return_layer_inputs else out
