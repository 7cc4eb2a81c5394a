"""The mixed attention mask: MonoFormer's one switch between its two jobs.

Token i may attend to token j of the same row iff

    same_example = segment_ids[i] == segment_ids[j] != 0
    allowed      = same_example and (j <= i or image_ids[i] == image_ids[j] != 0)

Text is causal; the tokens of one image see each other bidirectionally and the
whole prefix of their example; nothing before an image sees it. This is the
reference's rule inside each packed example (see DESIGN.md). `allowed` is the
rule's only statement: the dense mask here and both kernels' per-block masks
call it; block_map.py only reasons about the intervals it implies.

Queries may be fewer than keys (decoding against a cache): `segment_ids` and
`image_ids` always describe the whole row of keys [B, L], and the queries are
the row's tokens q_offset .. q_offset + Lq - 1 (by default the last Lq).
"""

import jax
import jax.numpy as jnp

# The score of a masked (query, key) pair. Finite, not -inf: a query that has
# seen only masked keys so far has running max MASKED_SCORE, and s - max is
# then 0 rather than -inf - -inf = NaN; exp(MASKED_SCORE - m) still underflows
# to exactly 0 once a real key sets m, and a max still equal to it marks a row
# with no allowed key. Far below any real logit, and representable in bfloat16.
MASKED_SCORE = -1e30


def allowed(q_segment, q_image, q_index, k_segment, k_image, k_index):
  """bool: may the query token (q_*) attend to the key token (k_*)?

  Elementwise on broadcastable arrays of segment ids, image ids and row
  positions; plain jnp, so it runs in XLA and inside Pallas kernel bodies
  (Mosaic and Triton) alike.
  """
  same_example = (q_segment == k_segment) & (q_segment != 0)
  same_image = (q_image == k_image) & (q_image != 0)
  return same_example & ((k_index <= q_index) | same_image)


def query_offset(q_len: int, kv_len: int, q_offset=None):
  """The row index of the first query: `q_offset`, or kv_len - q_len by default."""
  if q_len > kv_len:
    raise ValueError(
      f"{q_len} queries but only {kv_len} keys; queries must be "
      "tokens of the key row (pass the whole row's ids)"
    )
  return kv_len - q_len if q_offset is None else q_offset


def query_ids(ids_BxL, q_len: int, q_offset):
  """The ids of the queries' tokens, [B, Lq], cut from the row's ids [B, L]."""
  if q_len == ids_BxL.shape[1]:
    return ids_BxL
  return jax.lax.dynamic_slice_in_dim(ids_BxL, q_offset, q_len, axis=1)


def mixed_mask(segment_ids, image_ids, *, q_len=None, q_offset=None):
  """bool [B, Lq, L] (query, key) from the row's per-token ids [B, L]."""
  kv_len = segment_ids.shape[1]
  q_len = kv_len if q_len is None else q_len
  q_offset = query_offset(q_len, kv_len, q_offset)
  q_index_Lq = q_offset + jnp.arange(q_len)
  return allowed(
    query_ids(segment_ids, q_len, q_offset)[:, :, None],
    query_ids(image_ids, q_len, q_offset)[:, :, None],
    q_index_Lq[None, :, None],
    segment_ids[:, None, :],
    image_ids[:, None, :],
    jnp.arange(kv_len)[None, None, :],
  )
