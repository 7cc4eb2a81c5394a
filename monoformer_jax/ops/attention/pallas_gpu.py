"""The mixed-mask flash attention kernels for GPU (Pallas Triton).

Layout: the model's own [B, L, heads, D] (Triton loads strided tiles, so no
transposes), token ids [B, L]. One program per (batch, head, query block)
loops over exactly its live key blocks in three runs (block_map.py): partial,
full (no mask arithmetic), partial. Empty blocks are never loaded. The dk/dv
program of a kv head loops over its G query heads, so repeated K/V never exist
in HBM. Accumulation in float32; float32 inputs multiply in full precision.
The mask of a partial block is `mask.allowed` on the block's ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from monoformer_jax.ops.attention.block_map import BlockMap
from monoformer_jax.ops.attention.mask import MASKED_SCORE, allowed


def _dot(a, b, *, trans_a=False, trans_b=False):
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=a.dtype != jnp.float32)


def _mask(q_seg, q_img, k_seg, k_img, q_first, k_first):
  """bool [bq, bk]: `allowed` for one block (ids [bq] and [bk])."""
  q_index = q_first + lax.broadcasted_iota(jnp.int32, (q_seg.shape[0], k_seg.shape[0]), 0)
  k_index = k_first + lax.broadcasted_iota(jnp.int32, (q_seg.shape[0], k_seg.shape[0]), 1)
  return allowed(q_seg[:, None], q_img[:, None], q_index, k_seg[None, :], k_img[None, :], k_index)


def _walk(runs, body, carry):
  """Folds body(block, carry, masked) over partial, full, partial runs."""
  start, fstart, fstop, stop = runs
  carry = lax.fori_loop(start, fstart, lambda blk, c: body(blk, c, True), carry)
  carry = lax.fori_loop(fstart, fstop, lambda blk, c: body(blk, c, False), carry)
  return lax.fori_loop(fstop, stop, lambda blk, c: body(blk, c, True), carry)


def _read_runs(refs):
  return tuple(r[...] for r in refs)


def _scalar_spec(index_map):
  return pl.BlockSpec((None, None), index_map)


def _params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def forward(
  q,
  k,
  v,
  segment_ids,
  image_ids,
  q_ids,
  q_offset,
  bmap: BlockMap,
  *,
  block_q,
  block_k,
  interpret,
  num_warps=4,
  num_stages=2,
):
  """(out [B, Lq, H, D], lse [B, H, Lq] float32) from q [B, Lq, H, D], k, v [B, L, K, D]."""
  b, lq, h, d = q.shape
  lk, kvh = k.shape[1], k.shape[2]
  group, nq = h // kvh, lq // block_q
  scale = d**-0.5

  def kernel(
    start,
    fstart,
    fstop,
    stop,
    off_ref,
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    qimg_ref,
    kseg_ref,
    kimg_ref,
    o_ref,
    lse_ref,
  ):
    i = pl.program_id(2)
    q_first = off_ref[0] + i * block_q
    q_ = q_ref[...]
    q_seg, q_img = qseg_ref[...], qimg_ref[...]

    def body(kblk, carry, masked):
      acc, m, l_sum = carry
      keys = pl.ds(pl.multiple_of(kblk * block_k, block_k), block_k)
      s = _dot(q_, k_ref[keys, :], trans_b=True) * scale
      if masked:
        mask = _mask(q_seg, q_img, kseg_ref[keys], kimg_ref[keys], q_first, kblk * block_k)
        s = jnp.where(mask, s, MASKED_SCORE)
      m_next = jnp.maximum(m, s.max(axis=1))
      alpha = jnp.exp(m - m_next)
      p = jnp.exp(s - m_next[:, None])  # all-masked rows: wiped or zeroed later
      v_ = v_ref[keys, :]
      acc = acc * alpha[:, None] + _dot(p.astype(v_.dtype), v_)
      return acc, m_next, alpha * l_sum + p.sum(axis=1)

    acc, m, l_sum = _walk(
      _read_runs((start, fstart, fstop, stop)),
      body,
      (
        jnp.zeros((block_q, d), jnp.float32),
        jnp.full((block_q,), MASKED_SCORE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
      ),
    )
    dead = m == MASKED_SCORE
    l_safe = jnp.where(dead, 1.0, l_sum)
    o_ref[...] = jnp.where(dead[:, None], 0.0, acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(dead, 0.0, m + jnp.log(l_safe))

  runs_spec = _scalar_spec(lambda b_, h_, i: (b_, i))
  out, lse = pl.pallas_call(
    kernel,
    grid=(b, h, nq),
    in_specs=[runs_spec] * 4
    + [
      pl.BlockSpec((1,), lambda *_: (0,)),
      pl.BlockSpec((None, block_q, None, d), lambda b_, h_, i: (b_, i, h_, 0)),
      pl.BlockSpec((None, lk, None, d), lambda b_, h_, i: (b_, 0, h_ // group, 0)),
      pl.BlockSpec((None, lk, None, d), lambda b_, h_, i: (b_, 0, h_ // group, 0)),
      pl.BlockSpec((None, block_q), lambda b_, h_, i: (b_, i)),
      pl.BlockSpec((None, block_q), lambda b_, h_, i: (b_, i)),
      pl.BlockSpec((None, lk), lambda b_, h_, i: (b_, 0)),
      pl.BlockSpec((None, lk), lambda b_, h_, i: (b_, 0)),
    ],
    out_specs=[
      pl.BlockSpec((None, block_q, None, d), lambda b_, h_, i: (b_, i, h_, 0)),
      pl.BlockSpec((None, None, block_q), lambda b_, h_, i: (b_, h_, i)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((b, h, lq), jnp.float32),
    ],
    compiler_params=_params(num_warps, num_stages),
    interpret=interpret,
    name="mixed_flash_fwd",
  )(
    *bmap.kv, jnp.reshape(q_offset, (1,)).astype(jnp.int32), q, k, v, *q_ids, segment_ids, image_ids
  )
  return out, lse


def backward(
  q,
  k,
  v,
  segment_ids,
  image_ids,
  q_ids,
  q_offset,
  bmap: BlockMap,
  out,
  lse,
  dout,
  *,
  block_q,
  block_k,
  interpret,
  num_warps=4,
  num_stages=2,
):
  """(dq, dk, dv) in the forward's layouts."""
  b, lq, h, d = q.shape
  lk, kvh = k.shape[1], k.shape[2]
  group, nq, nk = h // kvh, lq // block_q, lk // block_k
  scale = d**-0.5
  delta = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32), dout.astype(jnp.float32))
  offset = jnp.reshape(q_offset, (1,)).astype(jnp.int32)

  def dlogits(q_, k_, v_, do_, lse_, delta_, mask):
    s = _dot(q_, k_, trans_b=True) * scale
    if mask is not None:
      s = jnp.where(mask, s, MASKED_SCORE)
    p = jnp.exp(s - lse_[:, None])
    dp = _dot(do_, v_, trans_b=True)
    return p, p * (dp - delta_[:, None])

  def dq_kernel(
    start,
    fstart,
    fstop,
    stop,
    off_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qseg_ref,
    qimg_ref,
    kseg_ref,
    kimg_ref,
    dq_ref,
  ):
    i = pl.program_id(2)
    q_first = off_ref[0] + i * block_q
    q_, do_, lse_, delta_ = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg, q_img = qseg_ref[...], qimg_ref[...]

    def body(kblk, dq, masked):
      keys = pl.ds(pl.multiple_of(kblk * block_k, block_k), block_k)
      k_ = k_ref[keys, :]
      mask = (
        _mask(q_seg, q_img, kseg_ref[keys], kimg_ref[keys], q_first, kblk * block_k)
        if masked
        else None
      )
      _, ds = dlogits(q_, k_, v_ref[keys, :], do_, lse_, delta_, mask)
      return dq + _dot(ds.astype(k_.dtype), k_)

    dq = _walk(_read_runs((start, fstart, fstop, stop)), body, jnp.zeros((block_q, d), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)

  runs_q = _scalar_spec(lambda b_, h_, i: (b_, i))
  qblock = pl.BlockSpec((None, block_q, None, d), lambda b_, h_, i: (b_, i, h_, 0))
  kvfull = pl.BlockSpec((None, lk, None, d), lambda b_, h_, i: (b_, 0, h_ // group, 0))
  rowblock = pl.BlockSpec((None, None, block_q), lambda b_, h_, i: (b_, h_, i))
  qid = pl.BlockSpec((None, block_q), lambda b_, h_, i: (b_, i))
  kid = pl.BlockSpec((None, lk), lambda b_, h_, i: (b_, 0))
  dq = pl.pallas_call(
    dq_kernel,
    grid=(b, h, nq),
    in_specs=[runs_q] * 4
    + [
      pl.BlockSpec((1,), lambda *_: (0,)),
      qblock,
      kvfull,
      kvfull,
      qblock,
      rowblock,
      rowblock,
      qid,
      qid,
      kid,
      kid,
    ],
    out_specs=qblock,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_params(num_warps, num_stages),
    interpret=interpret,
    name="mixed_flash_dq",
  )(*bmap.kv, offset, q, k, v, dout, lse, delta, *q_ids, segment_ids, image_ids)

  def dkv_kernel(
    start,
    fstart,
    fstop,
    stop,
    off_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qseg_ref,
    qimg_ref,
    kseg_ref,
    kimg_ref,
    dk_ref,
    dv_ref,
  ):
    j = pl.program_id(2)
    k_, v_ = k_ref[...], v_ref[...]
    k_seg, k_img = kseg_ref[...], kimg_ref[...]
    runs = _read_runs((start, fstart, fstop, stop))

    def member(g, carry):
      def body(qblk, carry, masked):
        dk, dv = carry
        rows = pl.ds(pl.multiple_of(qblk * block_q, block_q), block_q)
        q_, do_ = q_ref[rows, g, :], do_ref[rows, g, :]
        mask = (
          _mask(
            qseg_ref[rows], qimg_ref[rows], k_seg, k_img, off_ref[0] + qblk * block_q, j * block_k
          )
          if masked
          else None
        )
        p, ds = dlogits(q_, k_, v_, do_, lse_ref[g, rows], delta_ref[g, rows], mask)
        return (
          dk + _dot(ds.astype(q_.dtype), q_, trans_a=True),
          dv + _dot(p.astype(do_.dtype), do_, trans_a=True),
        )

      return _walk(runs, body, carry)

    zeros = jnp.zeros((block_k, d), jnp.float32)
    dk, dv = lax.fori_loop(0, group, member, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)

  kblock = pl.BlockSpec((None, block_k, None, d), lambda b_, kh, j: (b_, j, kh, 0))
  qgroup = pl.BlockSpec((None, lq, group, d), lambda b_, kh, j: (b_, 0, kh, 0))
  rowgroup = pl.BlockSpec((None, group, lq), lambda b_, kh, j: (b_, kh, 0))
  qid_all = pl.BlockSpec((None, lq), lambda b_, kh, j: (b_, 0))
  kid_block = pl.BlockSpec((None, block_k), lambda b_, kh, j: (b_, j))
  dk, dv = pl.pallas_call(
    dkv_kernel,
    grid=(b, kvh, nk),
    in_specs=[_scalar_spec(lambda b_, kh, j: (b_, j))] * 4
    + [
      pl.BlockSpec((1,), lambda *_: (0,)),
      qgroup,
      kblock,
      kblock,
      qgroup,
      rowgroup,
      rowgroup,
      qid_all,
      qid_all,
      kid_block,
      kid_block,
    ],
    out_specs=[kblock, kblock],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=_params(num_warps, num_stages),
    interpret=interpret,
    name="mixed_flash_dkv",
  )(*bmap.q, offset, q, k, v, dout, lse, delta, *q_ids, segment_ids, image_ids)
  return dq, dk, dv
