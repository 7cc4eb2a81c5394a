"""The mixed-mask flash attention kernels for TPU (Pallas Mosaic).

Layout: [B, heads, L, D] inside (pallas.py transposes), token ids as in
splash attention: query ids lane-broadcast [B, Lq, 128], key ids [B, 1, L].
Grids walk every (query block, step) pair; the scalar-prefetched block map
(block_map.py) turns a step into a live key block, and steps past the live run
re-use the previous block index, so Pallas issues no copy for them and
`pl.when` skips their compute. Full blocks take the unmasked path.

Forward: grid (B, H, I, J), online softmax in float32 VMEM scratch, outputs
the attention and the log-sum-exp (the only residual). Backward: a dq kernel on
the forward's grid and a dk/dv kernel on (B, K, J, G, I) that accumulates the
G query heads of each kv head in scratch, so repeated K/V never exist in HBM.
Block sizes must be multiples of 128 on TPU (smaller ones run in interpret mode).
The mask of a partial block is `mask.allowed` on the block's ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from monoformer_jax.ops.attention.block_map import BlockMap
from monoformer_jax.ops.attention.mask import MASKED_SCORE, allowed

LANES = 128


def _fit(x_rowsx128, width: int):
  """A lane-replicated [rows, 128] array as [rows, width]."""
  if width <= LANES:
    return x_rowsx128[:, :width]
  return jnp.tile(x_rowsx128, (1, width // LANES))


def _mask(qseg_ref, qimg_ref, kseg_ref, kimg_ref, q_first, k_first, bq, bk):
  """bool [bq, bk]: `allowed` for the queries and keys of one block."""
  q_seg, q_img = _fit(qseg_ref[...], bk), _fit(qimg_ref[...], bk)
  k_seg, k_img = kseg_ref[...], kimg_ref[...]  # [1, bk]
  q_index = q_first + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  k_index = k_first + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  return allowed(q_seg, q_img, q_index, k_seg, k_img, k_index)


def _logits(q, k, scale):
  return lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale


def _live_block(runs_start, runs_stop, b, i, step):
  """The block a grid step works on: start + step, held at the run's last block."""
  start, stop = runs_start[b, i], runs_stop[b, i]
  return start + jnp.clip(step, 0, jnp.maximum(stop - start - 1, 0))


def _when_live(runs, b, i, step, body):
  """Runs body(masked) for a live block: unmasked inside the full run."""
  start, fstart, fstop, stop = (r[b, i] for r in runs)
  blk = start + step
  full = (blk >= fstart) & (blk < fstop)
  pl.when((blk < stop) & full)(lambda: body(False))
  pl.when((blk < stop) & ~full)(lambda: body(True))


def _specs(block_q, block_k, head_dim, group):
  """Index maps shared by the forward and dq kernels (grid b, h, i, step)."""

  def kv_block(b, i, s, runs):
    return _live_block(runs[0], runs[3], b, i, s)

  q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, s, *refs: (b, h, i, 0))
  kv_spec = pl.BlockSpec(
    (None, None, block_k, head_dim),
    lambda b, h, i, s, *refs: (b, lax.div(h, group), kv_block(b, i, s, refs[:4]), 0),
  )
  row_spec = pl.BlockSpec((None, None, block_q, LANES), lambda b, h, i, s, *refs: (b, h, i, 0))
  qid_spec = pl.BlockSpec((None, block_q, LANES), lambda b, h, i, s, *refs: (b, i, 0))
  kid_spec = pl.BlockSpec(
    (None, 1, block_k), lambda b, h, i, s, *refs: (b, 0, kv_block(b, i, s, refs[:4]))
  )
  return q_spec, kv_spec, row_spec, qid_spec, kid_spec


def _ids(segment_ids, image_ids, q_ids):
  """Query ids lane-broadcast [B, Lq, 128] and key ids [B, 1, L]."""
  qseg, qimg = q_ids
  lanes = lambda x: jnp.broadcast_to(x[:, :, None], (*x.shape, LANES))
  return lanes(qseg), lanes(qimg), segment_ids[:, None, :], image_ids[:, None, :]


def _compiler_params(semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def forward(
  q, k, v, segment_ids, image_ids, q_ids, q_offset, bmap: BlockMap, *, block_q, block_k, interpret
):
  """(out [B, H, Lq, D], lse [B, H, Lq] float32) from q [B, H, Lq, D], k, v [B, K, L, D]."""
  b, h, lq, d = q.shape
  kvh, lk = k.shape[1], k.shape[2]
  group, nq, nk = h // kvh, lq // block_q, lk // block_k
  scale = d**-0.5

  def kernel(
    start,
    fstart,
    fstop,
    stop,
    offset,
    q_ref,
    k_ref,
    v_ref,
    qseg_ref,
    qimg_ref,
    kseg_ref,
    kimg_ref,
    o_ref,
    lse_ref,
    m_scr,
    l_scr,
    acc_scr,
  ):
    bi, i, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(step == 0)
    def _init():
      m_scr[...] = jnp.full(m_scr.shape, MASKED_SCORE, jnp.float32)
      l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
      acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def body(masked):
      kblk = start[bi, i] + step
      s = _logits(q_ref[...], k_ref[...], scale)
      if masked:
        mask = _mask(
          qseg_ref,
          qimg_ref,
          kseg_ref,
          kimg_ref,
          offset[0] + i * block_q,
          kblk * block_k,
          block_q,
          block_k,
        )
        s = jnp.where(mask, s, MASKED_SCORE)
      m_prev = m_scr[...]
      m_next = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
      alpha = jnp.exp(m_prev - m_next)
      # A row all masked so far sums exp(0) here; the first real key it meets
      # sets alpha = exp(MASKED_SCORE - m) = 0 and wipes that, a dead row is zeroed.
      p = jnp.exp(s - _fit(m_next, block_k))
      l_scr[...] = alpha * l_scr[...] + p.sum(axis=-1, keepdims=True)
      acc_scr[...] = _fit(alpha, d) * acc_scr[...] + lax.dot_general(
        p.astype(v_ref.dtype),
        v_ref[...],
        (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
      )
      m_scr[...] = m_next

    _when_live((start, fstart, fstop, stop), bi, i, step, body)

    @pl.when(step == nk - 1)
    def _finish():
      m, l_sum = m_scr[...], l_scr[...]
      dead = m == MASKED_SCORE
      l_safe = jnp.where(dead, 1.0, l_sum)
      o_ref[...] = jnp.where(_fit(dead, d), 0.0, acc_scr[...] / _fit(l_safe, d)).astype(o_ref.dtype)
      lse_ref[...] = jnp.where(dead, 0.0, m + jnp.log(l_safe))

  q_spec, kv_spec, row_spec, qid_spec, kid_spec = _specs(block_q, block_k, d, group)
  out, lse = pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=5,
      grid=(b, h, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, qid_spec, qid_spec, kid_spec, kid_spec],
      out_specs=[q_spec, row_spec],
      scratch_shapes=[
        pltpu.VMEM((block_q, LANES), jnp.float32),
        pltpu.VMEM((block_q, LANES), jnp.float32),
        pltpu.VMEM((block_q, d), jnp.float32),
      ],
    ),
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((b, h, lq, LANES), jnp.float32),
    ],
    compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
    interpret=interpret,
    name="mixed_flash_fwd",
  )(
    *bmap.kv,
    jnp.reshape(q_offset, (1,)).astype(jnp.int32),
    q,
    k,
    v,
    *_ids(segment_ids, image_ids, q_ids),
  )
  return out, lse[..., 0]


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
):
  """(dq, dk, dv) in the forward's layouts."""
  b, h, lq, d = q.shape
  kvh, lk = k.shape[1], k.shape[2]
  group, nq, nk = h // kvh, lq // block_q, lk // block_k
  scale = d**-0.5
  delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1)
  lanes = lambda x: jnp.broadcast_to(x[..., None], (*x.shape, LANES))
  lse_rows, delta_rows = lanes(lse), lanes(delta)
  offset = jnp.reshape(q_offset, (1,)).astype(jnp.int32)
  ids = _ids(segment_ids, image_ids, q_ids)

  def probs_and_dlogits(q_, k_, v_, do_, lse_, delta_, mask):
    s = _logits(q_, k_, scale)
    if mask is not None:
      s = jnp.where(mask, s, MASKED_SCORE)
    p = jnp.exp(s - lse_)
    dp = lax.dot_general(do_, v_, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return p, p * (dp - delta_)

  # dq: the forward's grid and block walk.
  def dq_kernel(
    start,
    fstart,
    fstop,
    stop,
    off,
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
    dq_scr,
  ):
    bi, i, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(step == 0)
    def _init():
      dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def body(masked):
      kblk = start[bi, i] + step
      mask = (
        _mask(
          qseg_ref,
          qimg_ref,
          kseg_ref,
          kimg_ref,
          off[0] + i * block_q,
          kblk * block_k,
          block_q,
          block_k,
        )
        if masked
        else None
      )
      _, ds = probs_and_dlogits(
        q_ref[...],
        k_ref[...],
        v_ref[...],
        do_ref[...],
        _fit(lse_ref[...], block_k),
        _fit(delta_ref[...], block_k),
        mask,
      )
      dq_scr[...] += lax.dot_general(
        ds.astype(k_ref.dtype),
        k_ref[...],
        (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
      )

    _when_live((start, fstart, fstop, stop), bi, i, step, body)

    @pl.when(step == nk - 1)
    def _finish():
      dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)

  q_spec, kv_spec, row_spec, qid_spec, kid_spec = _specs(block_q, block_k, d, group)
  dq = pl.pallas_call(
    dq_kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=5,
      grid=(b, h, nq, nk),
      in_specs=[
        q_spec,
        kv_spec,
        kv_spec,
        q_spec,
        row_spec,
        row_spec,
        qid_spec,
        qid_spec,
        kid_spec,
        kid_spec,
      ],
      out_specs=q_spec,
      scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)],
    ),
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
    interpret=interpret,
    name="mixed_flash_dq",
  )(*bmap.kv, offset, q, k, v, dout, lse_rows, delta_rows, *ids)

  # dk, dv: grid (b, kv head, key block, group member, step over query blocks).
  def dkv_kernel(
    start,
    fstart,
    fstop,
    stop,
    off,
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
    dk_scr,
    dv_scr,
  ):
    bi, j, g, step = (pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4))

    @pl.when((g == 0) & (step == 0))
    def _init():
      dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
      dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def body(masked):
      qblk = start[bi, j] + step
      mask = (
        _mask(
          qseg_ref,
          qimg_ref,
          kseg_ref,
          kimg_ref,
          off[0] + qblk * block_q,
          j * block_k,
          block_q,
          block_k,
        )
        if masked
        else None
      )
      q_, do_ = q_ref[...], do_ref[...]
      p, ds = probs_and_dlogits(
        q_,
        k_ref[...],
        v_ref[...],
        do_,
        _fit(lse_ref[...], block_k),
        _fit(delta_ref[...], block_k),
        mask,
      )
      dv_scr[...] += lax.dot_general(
        p.astype(do_.dtype), do_, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
      )
      dk_scr[...] += lax.dot_general(
        ds.astype(q_.dtype), q_, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
      )

    _when_live((start, fstart, fstop, stop), bi, j, step, body)

    @pl.when((g == group - 1) & (step == nq - 1))
    def _finish():
      dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
      dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)

  def q_block(b_, j, s, runs):
    return _live_block(runs[0], runs[3], b_, j, s)

  qh_spec = pl.BlockSpec(
    (None, None, block_q, d),
    lambda b_, kh, j, g, s, *r: (b_, kh * group + g, q_block(b_, j, s, r[:4]), 0),
  )
  rowh_spec = pl.BlockSpec(
    (None, None, block_q, LANES),
    lambda b_, kh, j, g, s, *r: (b_, kh * group + g, q_block(b_, j, s, r[:4]), 0),
  )
  kvh_spec = pl.BlockSpec((None, None, block_k, d), lambda b_, kh, j, g, s, *r: (b_, kh, j, 0))
  qidh_spec = pl.BlockSpec(
    (None, block_q, LANES), lambda b_, kh, j, g, s, *r: (b_, q_block(b_, j, s, r[:4]), 0)
  )
  kidh_spec = pl.BlockSpec((None, 1, block_k), lambda b_, kh, j, g, s, *r: (b_, 0, j))
  dk, dv = pl.pallas_call(
    dkv_kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=5,
      grid=(b, kvh, nk, group, nq),
      in_specs=[
        qh_spec,
        kvh_spec,
        kvh_spec,
        qh_spec,
        rowh_spec,
        rowh_spec,
        qidh_spec,
        qidh_spec,
        kidh_spec,
        kidh_spec,
      ],
      out_specs=[kvh_spec, kvh_spec],
      scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32), pltpu.VMEM((block_k, d), jnp.float32)],
    ),
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=_compiler_params(
      ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
    ),
    interpret=interpret,
    name="mixed_flash_dkv",
  )(*bmap.q, offset, q, k, v, dout, lse_rows, delta_rows, *ids)
  return dq, dk, dv
