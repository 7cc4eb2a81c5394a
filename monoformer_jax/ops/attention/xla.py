"""Dense masked attention in plain XLA: the reference every kernel is tested against."""

import jax
import jax.numpy as jnp

from monoformer_jax.ops.attention.mask import MASKED_SCORE, mixed_mask


def xla_attention(q_BxLqxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids, image_ids,
                  *, q_offset=None):
  """Grouped-query attention under the mixed mask; float32 softmax.

  Query rows with no allowed key (padding) return zeros rather than NaN or an
  average of masked values, so they are inert in every sum downstream. With
  fewer queries than keys the queries are the row's tokens from `q_offset`
  (default: the last Lq), see mask.py.
  """
  b, lq, h, d = q_BxLqxHxD.shape
  kv = k_BxLxKxD.shape[2]
  if h % kv:
    raise ValueError(f"{h} query heads are not a multiple of {kv} kv heads")
  q_BxLqxKxGxD = q_BxLqxHxD.reshape(b, lq, kv, h // kv, d)
  logits_BxKxGxLqxL = jnp.einsum(
      "bqkgd,bskd->bkgqs", q_BxLqxKxGxD, k_BxLxKxD,
      preferred_element_type=jnp.float32) * (d ** -0.5)
  mask_Bx1x1xLqxL = mixed_mask(segment_ids, image_ids, q_len=lq,
                               q_offset=q_offset)[:, None, None]
  logits_BxKxGxLqxL = jnp.where(mask_Bx1x1xLqxL, logits_BxKxGxLqxL, MASKED_SCORE)
  # Where a query has an allowed key the masked ones get exactly 0; a query
  # with none (padding) got a uniform row, which the factor zeroes. (One
  # select fewer than masking the probabilities too: the backward is ~2x faster.)
  probs = (jax.nn.softmax(logits_BxKxGxLqxL, axis=-1)
           * mask_Bx1x1xLqxL.any(axis=-1, keepdims=True)).astype(v_BxLxKxD.dtype)
  out_BxLqxKxGxD = jnp.einsum("bkgqs,bskd->bqkgd", probs, v_BxLxKxD)
  return out_BxLqxKxGxD.reshape(b, lq, h, d)
