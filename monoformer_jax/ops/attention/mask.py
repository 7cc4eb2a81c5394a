"""The mixed attention mask: MonoFormer's one switch between its two jobs.

Token i may attend to token j of the same row iff

    same_example = segment_ids[i] == segment_ids[j] != 0
    allowed      = same_example and (j <= i or image_ids[i] == image_ids[j] != 0)

Text is causal; the tokens of one image see each other bidirectionally and the
whole prefix of their example; nothing before an image sees it. This is the
reference's rule inside each packed example (see DESIGN.md).

Queries may be fewer than keys (decoding against a cache): `segment_ids` and
`image_ids` always describe the whole row of keys [B, Lk], and the queries are
the row's tokens q_offset .. q_offset + Lq - 1 (by default the last Lq).
"""

import jax
import jax.numpy as jnp


def query_offset(q_len: int, kv_len: int, q_offset=None):
  """The row index of the first query: `q_offset`, or kv_len - q_len by default."""
  if q_len > kv_len:
    raise ValueError(f"{q_len} queries but only {kv_len} keys; queries must be "
                     "tokens of the key row (pass the whole row's ids)")
  return kv_len - q_len if q_offset is None else q_offset


def query_ids(ids_BxLk, q_len: int, q_offset):
  """The ids of the queries' tokens, [B, Lq], cut from the row's ids [B, Lk]."""
  if q_len == ids_BxLk.shape[1]:
    return ids_BxLk
  return jax.lax.dynamic_slice_in_dim(ids_BxLk, q_offset, q_len, axis=1)


def mixed_mask(segment_ids, image_ids, *, q_len=None, q_offset=None):
  """bool [B, Lq, Lk] (query, key) from the row's per-token ids [B, Lk]."""
  kv_len = segment_ids.shape[1]
  q_len = kv_len if q_len is None else q_len
  q_offset = query_offset(q_len, kv_len, q_offset)
  seg_q = query_ids(segment_ids, q_len, q_offset)[:, :, None]
  img_q = query_ids(image_ids, q_len, q_offset)[:, :, None]
  seg_k, img_k = segment_ids[:, None, :], image_ids[:, None, :]
  q_index = q_offset + jnp.arange(q_len)
  causal_LqxLk = q_index[:, None] >= jnp.arange(kv_len)[None, :]
  same_example = (seg_q == seg_k) & (seg_q != 0)
  same_image = (img_q == img_k) & (img_q != 0)
  return same_example & (causal_LqxLk[None] | same_image)
