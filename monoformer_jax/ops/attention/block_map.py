"""Block sparsity of the mixed mask, from the per-token ids alone.

The rule itself is `mask.allowed`; this module only uses what it implies for
contiguous layouts. In a packed row, examples and images are contiguous runs
of tokens. A query i of the example occupying [s0, s1), inside image [m0, m1)
(or text: m1 = i + 1), may see exactly the keys

    [s0, max(i, m1 - 1)]        (padding queries: none)

one interval, written [lo_i, hi_i] below (`key_intervals`). Cut the queries
into I blocks of `block_q` and the keys into J blocks of `block_k`. With
per-query-block statistics of those intervals, a block pair (query block,
key block [ks, ke)) is

    empty    if min lo > ke - 1 or max hi < ks     (no query sees the block)
    full     if max lo <= ks and min hi >= ke - 1  (every query sees all of it)
    partial  otherwise                             (the mask is computed)

`empty` is conservative (a block in a padding gap may be called partial: it is
then computed with its mask, correct but wasted); `full` is exact. Both assume
the contiguity that the row layout (`monoformer_jax/layout.py`) guarantees.

The kernels walk, for each query block, the key blocks [start, stop) in three
runs: partial [start, full_start), full [full_start, full_stop), partial
[full_stop, stop); and for each key block the query blocks the same way. The
live blocks of a query block are contiguous by construction; for key blocks the
map takes the hull of the live query blocks, and a full run only where every
block in it is full.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from monoformer_jax.ops.attention.mask import query_ids

EMPTY, PARTIAL, FULL = 0, 1, 2


class Runs(NamedTuple):
  """Block ranges along one axis, int32 [B, I] or [B, J] (per block of the other axis)."""

  start: jax.Array
  full_start: jax.Array
  full_stop: jax.Array
  stop: jax.Array


class BlockMap(NamedTuple):
  """`kv`: per query block its key blocks; `q`: per key block its query blocks."""

  kv: Runs
  q: Runs
  kinds: jax.Array  # int8 [B, I, J]: EMPTY, PARTIAL or FULL


def key_intervals(segment_ids, image_ids):
  """[lo, hi] (inclusive) of the keys each token of the row may see; int32 [B, L].

  Padding tokens get the empty interval lo = L, hi = -1.
  """
  _, length = segment_ids.shape
  index_L = jnp.arange(length, dtype=jnp.int32)
  first_in_run = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  lo = jax.lax.cummax(jnp.where(first_in_run, index_L, 0), axis=1)
  last_in_image = jnp.concatenate(
    [image_ids[:, :-1] != image_ids[:, 1:], jnp.ones_like(image_ids[:, :1], bool)], axis=1
  )
  image_end = jax.lax.cummin(jnp.where(last_in_image, index_L, length), axis=1, reverse=True)
  hi = jnp.where(image_ids != 0, image_end, index_L)
  padding = segment_ids == 0
  return (
    jnp.where(padding, length, lo).astype(jnp.int32),
    jnp.where(padding, -1, hi).astype(jnp.int32),
  )


def _runs(live, full):
  """Runs over the last axis of bool [..., n] tables (full implies live)."""
  n = live.shape[-1]
  index = jnp.arange(n, dtype=jnp.int32)
  any_live = live.any(-1)
  start = jnp.where(any_live, jnp.argmax(live, -1), 0).astype(jnp.int32)
  stop = jnp.where(any_live, jnp.max(jnp.where(live, index + 1, 0), -1), 0)
  full_start = jnp.argmax(full, -1).astype(jnp.int32)
  full_stop = jnp.max(jnp.where(full, index + 1, 0), -1)
  one_run = full.any(-1) & (full.sum(-1) == full_stop - full_start)
  full_start = jnp.where(one_run, full_start, stop)
  full_stop = jnp.where(one_run, full_stop, stop)
  return Runs(
    start, full_start.astype(jnp.int32), full_stop.astype(jnp.int32), stop.astype(jnp.int32)
  )


def block_map(
  segment_ids, image_ids, *, q_len: int, q_offset, block_q: int, block_k: int
) -> BlockMap:
  """The block map of a row [B, L] whose q_len queries are tokens q_offset.. of it.

  L must be a multiple of block_k (pad the row with segment id 0); the
  queries are padded to whole blocks here; q_offset may be traced.
  """
  b, kv_len = segment_ids.shape
  if kv_len % block_k:
    raise ValueError(
      f"{kv_len} keys are not a multiple of block_k {block_k}; pad the row with segment id 0"
    )
  nq = -(-q_len // block_q)
  lo, hi = key_intervals(segment_ids, image_ids)
  pad = ((0, 0), (0, nq * block_q - q_len))
  lo_q = jnp.pad(query_ids(lo, q_len, q_offset), pad, constant_values=kv_len)
  hi_q = jnp.pad(query_ids(hi, q_len, q_offset), pad, constant_values=-1)
  lo_q, hi_q = lo_q.reshape(b, nq, block_q), hi_q.reshape(b, nq, block_q)
  key_start_J = jnp.arange(0, kv_len, block_k, dtype=jnp.int32)
  key_last_J = key_start_J + block_k - 1
  min_lo, max_lo = lo_q.min(-1)[..., None], lo_q.max(-1)[..., None]
  min_hi, max_hi = hi_q.min(-1)[..., None], hi_q.max(-1)[..., None]
  live_BxIxJ = (min_lo <= key_last_J) & (max_hi >= key_start_J)
  full_BxIxJ = (max_lo <= key_start_J) & (min_hi >= key_last_J)
  kinds = jnp.where(full_BxIxJ, FULL, jnp.where(live_BxIxJ, PARTIAL, EMPTY))
  return BlockMap(
    kv=_runs(live_BxIxJ, full_BxIxJ),
    q=_runs(jnp.swapaxes(live_BxIxJ, 1, 2), jnp.swapaxes(full_BxIxJ, 1, 2)),
    kinds=kinds.astype(jnp.int8),
  )


def live_fraction(bmap: BlockMap) -> jax.Array:
  """Fraction of block pairs the kernels compute (the live ranges' total)."""
  computed = (bmap.kv.stop - bmap.kv.start).sum()
  return computed / bmap.kinds.size
