"""The mixed attention mask: MonoFormer's one switch between its two jobs.

Token i may attend to token j of the same row iff

    same_example = segment_ids[i] == segment_ids[j] != 0
    allowed      = same_example and (j <= i or image_ids[i] == image_ids[j] != 0)

Text is causal; the tokens of one image see each other bidirectionally and the
whole prefix of their example; nothing before an image sees it. This is the
reference's rule inside each packed example (see DESIGN.md).
"""

import jax.numpy as jnp


def mixed_mask(segment_ids, image_ids):
  """bool [B, Lq, Lk] (query, key) from per-token ids [B, L] of one row layout."""
  seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
  img_q, img_k = image_ids[:, :, None], image_ids[:, None, :]
  length = segment_ids.shape[1]
  idx = jnp.arange(length)
  causal_LxL = idx[:, None] >= idx[None, :]
  same_example = (seg_q == seg_k) & (seg_q != 0)
  same_image = (img_q == img_k) & (img_q != 0)
  return same_example & (causal_LxL[None] | same_image)
