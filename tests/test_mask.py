"""The mixed mask against the reference construction, and packed layouts."""

import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax.ops.attention import attention, mixed_mask


def reference_mask(attention_mask_L, image_L):
  """The official construction for one example per row: causal with key padding
  (HF `_update_causal_mask`), then image tokens unmasked among themselves."""
  n = len(attention_mask_L)
  causal = np.tril(np.ones((n, n), bool)) & attention_mask_L[None, :]
  return causal | (image_L[:, None] & image_L[None, :])


@pytest.mark.parametrize(
  "length,start,size,real",
  [(27, 8, 16, 27), (40, 1, 16, 30), (20, 3, 4, 7), (12, 0, 12, 12), (16, 0, 0, 9)],
)
def test_single_image_rows_match_the_reference_construction(length, start, size, real):
  seg = np.zeros(length, np.int32)
  seg[:real] = 1
  img = np.zeros(length, np.int32)
  img[start : start + size] = 1
  ours = np.asarray(mixed_mask(jnp.asarray(seg[None]), jnp.asarray(img[None])))[0]
  ref = reference_mask(seg != 0, img != 0)
  rows = seg != 0  # the reference lets pad queries see the row; ours: nothing
  np.testing.assert_array_equal(ours[rows], ref[rows])
  assert not ours[~rows].any()


def test_matches_the_mask_the_official_model_used(fixture_dir):
  io = np.load(fixture_dir / "io.npz")
  ours = np.asarray(mixed_mask(jnp.asarray(io["segment_ids"]), jnp.asarray(io["image_ids"])))
  official = io["attn_mask_4d"][:, 0] == 0
  real = io["segment_ids"] != 0
  np.testing.assert_array_equal(ours[real], official[real])


def test_packed_row_with_two_examples_and_two_images():
  #          example 1: t t [i i] t | example 2: t [i i i] t t | pad
  seg = np.array([1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0])
  img = np.array([0, 0, 1, 1, 0, 0, 2, 2, 2, 0, 0, 0])
  m = np.asarray(mixed_mask(jnp.asarray(seg[None]), jnp.asarray(img[None])))[0]
  allowed = {  # query -> allowed keys, written out by hand
    0: [0],
    1: [0, 1],
    2: [0, 1, 2, 3],
    3: [0, 1, 2, 3],
    4: [0, 1, 2, 3, 4],
    5: [5],
    6: [5, 6, 7, 8],
    7: [5, 6, 7, 8],
    8: [5, 6, 7, 8],
    9: [5, 6, 7, 8, 9],
    10: [5, 6, 7, 8, 9, 10],
    11: [],
  }
  expected = np.zeros_like(m)
  for q, keys in allowed.items():
    expected[q, keys] = True
  np.testing.assert_array_equal(m, expected)


def test_adjacent_images_of_one_example_do_not_see_each_other_ahead():
  seg = np.ones(6, np.int32)
  img = np.array([0, 1, 1, 2, 2, 0])
  m = np.asarray(mixed_mask(jnp.asarray(seg[None]), jnp.asarray(img[None])))[0]
  assert m[1, 2] and not m[1, 3] and m[3, 1] and m[3, 4] and m[4, 3]


def test_xla_attention_equals_a_numpy_loop():
  rng = np.random.default_rng(0)
  b, length, h, k, d = 2, 10, 4, 2, 8
  q = rng.normal(size=(b, length, h, d)).astype(np.float32)
  kk = rng.normal(size=(b, length, k, d)).astype(np.float32)
  v = rng.normal(size=(b, length, k, d)).astype(np.float32)
  seg = np.array([[1] * 4 + [2] * 5 + [0], [1] * 10])
  img = np.array([[0, 1, 1, 0, 0, 2, 2, 0, 0, 0], [0] * 10])
  out = np.asarray(attention(q, kk, v, jnp.asarray(seg), jnp.asarray(img), impl="xla"))
  mask = np.asarray(mixed_mask(jnp.asarray(seg), jnp.asarray(img)))
  for bi in range(b):
    for i in range(length):
      for hi in range(h):
        keys = np.flatnonzero(mask[bi, i])
        if len(keys) == 0:
          np.testing.assert_array_equal(out[bi, i, hi], 0.0)
          continue
        kv = hi // (h // k)
        s = kk[bi, keys, kv] @ q[bi, i, hi] / np.sqrt(d)
        p = np.exp(s - s.max())
        p /= p.sum()
        np.testing.assert_allclose(out[bi, i, hi], p @ v[bi, keys, kv], rtol=1e-5, atol=1e-6)


def test_unknown_impl_is_rejected_with_the_config_key():
  x = jnp.zeros((1, 4, 2, 4))
  ids = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="attention_impl"):
    attention(x, x, x, ids, ids, impl="flash")
