"""Dense masked attention in plain XLA: the reference every kernel is tested against."""

import jax
import jax.numpy as jnp

from monoformer_jax.ops.attention.mask import mixed_mask


def xla_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids, image_ids):
  """Grouped-query attention under the mixed mask; float32 softmax.

  Query rows with no allowed key (padding) return zeros rather than NaN or an
  average of masked values, so they are inert in every sum downstream.
  """
  b, l, h, d = q_BxLxHxD.shape
  kv = k_BxLxKxD.shape[2]
  if h % kv:
    raise ValueError(f"{h} query heads are not a multiple of {kv} kv heads")
  q_BxLxKxGxD = q_BxLxHxD.reshape(b, l, kv, h // kv, d)
  logits_BxKxGxLxL = jnp.einsum(
      "bqkgd,bskd->bkgqs", q_BxLxKxGxD, k_BxLxKxD,
      preferred_element_type=jnp.float32) * (d ** -0.5)
  mask_Bx1x1xLxL = mixed_mask(segment_ids, image_ids)[:, None, None]
  logits_BxKxGxLxL = jnp.where(mask_Bx1x1xLxL, logits_BxKxGxLxL,
                               jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits_BxKxGxLxL, axis=-1)
  probs = jnp.where(mask_Bx1x1xLxL, probs, 0.0).astype(v_BxLxKxD.dtype)
  out_BxLxKxGxD = jnp.einsum("bkgqs,bskd->bqkgd", probs, v_BxLxKxD)
  return out_BxLxKxGxD.reshape(b, l, h, d)
