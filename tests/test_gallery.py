"""The README gallery's drawing (monoformer_jax/digits/gallery.py), without a
model: pieces of text and images laid out in one line, lines stacked, and a
model that cannot fill the gallery refused before anything is drawn."""

import numpy as np
import pytest
from helpers import digits_config

from monoformer_jax.digits import gallery
from monoformer_jax.errors import ConfigError


def test_a_strip_pastes_each_image_scaled_where_it_stands():
  rng = np.random.default_rng(0)
  first, second = rng.uniform(0, 1, (2, 8, 8, 1)).astype(np.float32)
  line = gallery.strip([("image", first), ("text", "seven"), ("image", second), ("text", " ")])
  pixels = np.asarray(line)
  gap, side = gallery._GAP, 8 * gallery.SCALE
  word = gallery.strip([("text", "seven")])  # the word alone, its margins (2 gaps) around it
  # image, word and image with a gap after each and one before; " " draws nothing
  assert line.size == (side + word.width + side + 2 * gap, side + 2 * gap)
  for x, image in ((gap, first), (line.width - gap - side, second)):
    want = (np.clip(image[..., 0], 0, 1) * 255).round().astype(np.uint8)
    want = want.repeat(gallery.SCALE, 0).repeat(gallery.SCALE, 1)
    for channel in range(3):  # grey in RGB
      np.testing.assert_array_equal(pixels[gap : gap + side, x : x + side, channel], want)
  text = pixels[:, gap + side + gap : line.width - gap - side - gap]
  assert (text < 128).any() and (text == 255).mean() > 0.5  # ink on paper
  assert (pixels[:gap] == 255).all() and (pixels[-gap:] == 255).all()  # the margins


def test_stack_puts_lines_under_one_another():
  a = gallery.strip([("text", "one")])
  b = gallery.strip([("image", np.zeros((8, 8, 1), np.float32))])
  page = gallery.stack([a, b])
  assert page.size == (max(a.width, b.width), a.height + b.height)
  np.testing.assert_array_equal(np.asarray(page)[: a.height, : a.width], np.asarray(a))
  np.testing.assert_array_equal(np.asarray(page)[a.height :, : b.width], np.asarray(b))


def test_a_model_that_reads_no_images_is_refused_first(tmp_path):
  config = digits_config()  # :tiny reads no images
  with pytest.raises(ConfigError, match=r"model.vision_encoder='': train one with"):
    gallery.make_gallery(None, None, config, str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
