"""Mixed-mask flash attention in Pallas: the public entry, padding and autodiff.

`pallas_attention` pads the row to whole blocks (keys and queries appended as
padding, segment id 0, and cut off again after), builds the block map from the
ids (block_map.py) and calls the forward kernel of the backend under a
`jax.custom_vjp` whose only saved activation besides the inputs and output is
the float32 log-sum-exp. Backends: 'tpu' (Mosaic, pallas_tpu.py) and 'gpu'
(Triton, pallas_gpu.py); on CPU either runs in interpret mode (the tests).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from monoformer_jax.ops.attention import pallas_gpu, pallas_tpu
from monoformer_jax.ops.attention.block_map import block_map
from monoformer_jax.ops.attention.mask import query_ids, query_offset

BACKENDS = {"tpu": pallas_tpu, "gpu": pallas_gpu}
HEADS_MAJOR = {"tpu": True, "gpu": False}  # kernel layout [B, H, L, D] or [B, L, H, D]
DEFAULT_BLOCKS = {"tpu": (128, 128), "gpu": (64, 64)}


class KernelConfig(NamedTuple):
  backend: str
  block_q: int
  block_k: int
  interpret: bool


def default_backend() -> str:
  """'tpu' or 'gpu' for the running platform; 'tpu' (interpreted) on CPU."""
  platform = jax.default_backend()
  return "gpu" if platform in ("gpu", "cuda", "rocm") else "tpu"


def kernel_config(backend=None, block_q=None, block_k=None, interpret=None) -> KernelConfig:
  backend = backend or default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"pallas backend {backend!r}: choose one of {sorted(BACKENDS)}")
  default_q, default_k = DEFAULT_BLOCKS[backend]
  block_q, block_k = block_q or default_q, block_k or default_k
  interpret = jax.default_backend() == "cpu" if interpret is None else interpret
  if backend == "tpu" and not interpret and (block_q % 128 or block_k % 128):
    raise ValueError(f"TPU blocks ({block_q}, {block_k}) must be multiples of 128")
  if backend == "tpu" and interpret and block_k > 128 and block_k % 128:
    raise ValueError(f"block_k {block_k}: below 128 or a multiple of it")
  if backend == "gpu" and any(x & (x - 1) or x < 16 for x in (block_q, block_k)):
    raise ValueError(f"GPU blocks ({block_q}, {block_k}) must be powers of two >= 16")
  return KernelConfig(backend, block_q, block_k, interpret)


def _to_kernel(cfg, x_BxLxNxD):
  return x_BxLxNxD.transpose(0, 2, 1, 3) if HEADS_MAJOR[cfg.backend] else x_BxLxNxD


_from_kernel = _to_kernel  # the transpose is its own inverse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, segment_ids, image_ids, q_offset):
  return _flash_fwd(cfg, q, k, v, segment_ids, image_ids, q_offset)[0]


def _prepare(cfg, q, segment_ids, image_ids, q_offset):
  lq = q.shape[2] if HEADS_MAJOR[cfg.backend] else q.shape[1]
  q_ids = tuple(query_ids(x, lq, q_offset) for x in (segment_ids, image_ids))
  bmap = block_map(segment_ids, image_ids, q_len=lq, q_offset=q_offset,
                   block_q=cfg.block_q, block_k=cfg.block_k)
  return q_ids, bmap


def _flash_fwd(cfg, q, k, v, segment_ids, image_ids, q_offset):
  q_ids, bmap = _prepare(cfg, q, segment_ids, image_ids, q_offset)
  out, lse = BACKENDS[cfg.backend].forward(
      q, k, v, segment_ids, image_ids, q_ids, q_offset, bmap,
      block_q=cfg.block_q, block_k=cfg.block_k, interpret=cfg.interpret)
  return out, (q, k, v, segment_ids, image_ids, q_offset, out, lse)


def _flash_bwd(cfg, residuals, dout):
  q, k, v, segment_ids, image_ids, q_offset, out, lse = residuals
  q_ids, bmap = _prepare(cfg, q, segment_ids, image_ids, q_offset)
  dq, dk, dv = BACKENDS[cfg.backend].backward(
      q, k, v, segment_ids, image_ids, q_ids, q_offset, bmap, out, lse, dout,
      block_q=cfg.block_q, block_k=cfg.block_k, interpret=cfg.interpret)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_attention(q_BxLqxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids, image_ids, *,
                     q_offset=None, backend=None, block_q=None, block_k=None,
                     interpret=None):
  """Flash attention under the mixed mask, equal to `xla_attention`.

  q [B, Lq, H, D]; k, v [B, Lk, K, D] with H a multiple of K (grouped-query
  heads, never repeated in memory); ids [B, Lk] for the whole row. With Lq < Lk
  the queries are the row's tokens from `q_offset` (default the last Lq), for
  decoding against a cache. Any lengths: the row is padded with segment id 0 to
  whole blocks (block_k for keys, block_q for queries) and the padding cut off,
  so lengths that are multiples of the blocks avoid a copy. float32 or
  bfloat16 inputs; softmax and accumulation in float32.
  """
  b, lq, h, d = q_BxLqxHxD.shape
  lk, kvh = k_BxLxKxD.shape[1], k_BxLxKxD.shape[2]
  if h % kvh:
    raise ValueError(f"{h} query heads are not a multiple of {kvh} kv heads")
  if segment_ids.shape != (b, lk) or image_ids.shape != (b, lk):
    raise ValueError(f"segment_ids {segment_ids.shape} and image_ids "
                     f"{image_ids.shape} must be [B, Lk] = {(b, lk)}")
  cfg = kernel_config(backend, block_q, block_k, interpret)
  q_offset = jnp.asarray(query_offset(lq, lk, q_offset), jnp.int32)
  lq_pad = -(-lq // cfg.block_q) * cfg.block_q
  # Keys padded to whole blocks, and far enough that the padded queries (which
  # follow the last query) are still tokens of the row.
  lk_pad = -(-(lk + lq_pad - lq) // cfg.block_k) * cfg.block_k
  pad_row = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
  seg, img = pad_row(segment_ids, lk_pad), pad_row(image_ids, lk_pad)
  q_p = pad_row(q_BxLqxHxD, lq_pad)
  k_p, v_p = pad_row(k_BxLxKxD, lk_pad), pad_row(v_BxLxKxD, lk_pad)
  out = _flash(cfg, *(_to_kernel(cfg, x) for x in (q_p, k_p, v_p)), seg, img, q_offset)
  return _from_kernel(cfg, out)[:, :lq]
