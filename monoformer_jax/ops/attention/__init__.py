"""Mixed-mask attention: the mask rule and one dispatch over implementations."""

import jax

from monoformer_jax.ops.attention.mask import mixed_mask
from monoformer_jax.ops.attention.xla import xla_attention

IMPLS = ("xla", "auto")


def attention(q, k, v, segment_ids, image_ids, *, impl="xla"):
  """Attention of q [B, L, H, D] over k, v [B, L, K, D] under the mixed mask.

  H must be a multiple of K (grouped-query attention). `impl` is 'xla' (dense
  reference) or 'auto' (the fastest available for the backend; today 'xla'
  everywhere until the Pallas kernel lands).
  """
  if impl == "auto":
    impl = "xla"
  if impl == "xla":
    return xla_attention(q, k, v, segment_ids, image_ids)
  raise ValueError(
      f"unknown attention impl {impl!r}; set config.model.attention_impl to one "
      f"of {IMPLS}")


__all__ = ["attention", "mixed_mask", "xla_attention", "IMPLS"]
