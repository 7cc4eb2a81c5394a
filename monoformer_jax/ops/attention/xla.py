"""Dense masked attention in plain XLA: the reference every kernel is tested against."""

import jax
import jax.numpy as jnp

from monoformer_jax.ops.attention.mask import MASKED_SCORE, mixed_mask, query_ids, query_offset


def xla_attention(q_BxLqxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids, image_ids, *, q_offset=None):
  """Grouped-query attention under the mixed mask; float32 softmax.

  Query rows with no allowed key (padding) return zeros rather than NaN or an
  average of masked values, so they are inert in every sum downstream. With
  fewer queries than keys the queries are the row's tokens from `q_offset`
  (default: the last Lq), see mask.py.
  """
  _b, lq, h, d = q_BxLqxHxD.shape
  kv = k_BxLxKxD.shape[2]
  if h % kv:
    raise ValueError(f"{h} query heads are not a multiple of {kv} kv heads")
  # Each kv head repeated for its query group: on XLA:CPU this 4-D form's
  # gradient is ~1.25x faster than grouping the queries ([B, K, G, Lq, L]).
  k_BxLxHxD = jnp.repeat(k_BxLxKxD, h // kv, axis=2)
  v_BxLxHxD = jnp.repeat(v_BxLxKxD, h // kv, axis=2)
  logits_BxHxLqxL = jnp.einsum(
    "bqhd,bshd->bhqs", q_BxLqxHxD, k_BxLxHxD, preferred_element_type=jnp.float32
  ) * (d**-0.5)
  q_offset = query_offset(lq, k_BxLxKxD.shape[1], q_offset)
  mask_Bx1xLqxL = mixed_mask(segment_ids, image_ids, q_len=lq, q_offset=q_offset)[:, None]
  logits_BxHxLqxL = jnp.where(mask_Bx1xLqxL, logits_BxHxLqxL, MASKED_SCORE)
  probs_BxHxLqxL = jax.nn.softmax(logits_BxHxLqxL, axis=-1).astype(v_BxLxKxD.dtype)
  out_BxLqxHxD = jnp.einsum("bhqs,bshd->bqhd", probs_BxHxLqxL, v_BxLxHxD)
  # The queries with no allowed key are exactly the padding (segment 0): any
  # other token may see itself. Their softmax was uniform; zeroing their
  # output keeps them inert, backward too. (Zeroing their probabilities
  # instead costs a [B, H, Lq, L] product each way: a ~1.4x slower gradient.)
  real_BxLq = query_ids(segment_ids, lq, q_offset) != 0
  return out_BxLqxHxD * real_BxLq[:, :, None, None].astype(out_BxLqxHxD.dtype)
