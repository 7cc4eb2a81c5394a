"""The embedded default: scikit-learn's 8x8 digits and true sentences about numbers.

Nothing is downloaded: `sklearn.datasets.load_digits` ships its 1797 images.
Images are pixel-space "latents" [8, 8, 1] float32, scaled from 0..16 to
[-1, 1] (images.py). The dataset supplies its class names ("zero".."nine"),
the images and the sentences; the rows are the reference's (prompts.py): an
image under a random template filled with its class name, the prompt dropped
with probability `data.cfg_drop_prob`, and text-only examples that are true
statements about the numbers zero..twenty ("three plus four is seven."), a
share `data.text_fraction` of the stream.

Example i of the stream is a pure function of (seed, i), read through Grain
MapDatasets, so a batch iterator resumes from one integer. Every digit appears
once per image epoch, in a fresh order each epoch.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

import grain
import numpy as np

from monoformer_jax.errors import ConfigError
from monoformer_jax.data import prompts
from monoformer_jax.data.images import from_unit_range
from monoformer_jax.data.packing import Example

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine")
NUMBER_WORDS = CLASS_NAMES + ("ten", "eleven", "twelve", "thirteen", "fourteen",
                              "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                              "twenty")

# Text/image choices are drawn per block of this many examples, with exactly
# the configured share of text in each block at random places: the mix is
# random but the image stream index stays computable from i alone.
_MIX_BLOCK = 128

__all__ = ["CLASS_NAMES", "NUMBER_WORDS", "load_digit_images", "number_sentence",
           "digits_example_stream"]


@functools.lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
  """(images [1797, 8, 8, 1] float32 in [-1, 1], labels [1797] int64 in 0..9)."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = from_unit_range(digits.images.astype(np.float32) / 16.0)[..., None]
  images.setflags(write=False)   # shared by every example; nobody may edit it
  labels = digits.target.astype(np.int64)
  labels.setflags(write=False)
  return images, labels


def number_sentence(rng: np.random.Generator) -> str:
  """A true statement about whole numbers zero..twenty, in words."""
  w = NUMBER_WORDS
  kind = int(rng.integers(6))
  if kind == 0:
    a, b = (int(x) for x in rng.integers(0, 11, size=2))
    return f"{w[a]} plus {w[b]} is {w[a + b]}."
  if kind == 1:
    a = int(rng.integers(0, 21))
    b = int(rng.integers(0, a + 1))
    return f"{w[a]} minus {w[b]} is {w[a - b]}."
  if kind == 2:
    a = int(rng.integers(0, 11))
    b = int(rng.integers(0, (20 // a if a else 10) + 1))
    return f"{w[a]} times {w[b]} is {w[a * b]}."
  if kind == 3:
    a = int(rng.integers(0, 20))
    return f"the number after {w[a]} is {w[a + 1]}."
  if kind == 4:
    a = int(rng.integers(1, 21))
    return f"the number before {w[a]} is {w[a - 1]}."
  a = int(rng.integers(0, 21))
  return f"{w[a]} is an {'even' if a % 2 == 0 else 'odd'} number."


def _check_probability(name: str, p: float):
  if not 0.0 <= p <= 1.0:
    raise ConfigError(f"{name}={p} is not a probability in [0, 1]")


def digits_example_stream(config, tokenizer, seed: int) -> Callable[[int], Example]:
  """example_at(i): the infinite mixed stream of digit and sentence examples.

  Uses data.text_fraction, data.cfg_drop_prob and model.image_size /
  model.in_channels (which must describe 8x8x1 digits).
  """
  images, labels = load_digit_images()
  m = config.model
  if (m.image_size, m.image_size, m.in_channels) != images.shape[1:]:
    raise ConfigError(f"digits are {images.shape[1:]} images but the config asks for "
                      f"model.image_size={m.image_size}, model.in_channels="
                      f"{m.in_channels}; use image_size=8, in_channels=1")
  text_fraction = float(config.data.text_fraction)
  drop_prob = float(config.data.cfg_drop_prob)
  _check_probability("data.text_fraction", text_fraction)
  _check_probability("data.cfg_drop_prob", drop_prob)
  shuffle_seed, image_seed, text_seed, mix_seed = (
      int(s) for s in np.random.SeedSequence(seed).generate_state(4))

  def image_example(k: int, rng: np.random.Generator) -> Example:
    prompt = prompts.training_prompt(CLASS_NAMES[labels[k]], rng, drop_prob)
    return prompts.image_example(prompt, images[k], tokenizer)

  def text_example(_, rng: np.random.Generator) -> Example:
    return Example(prompts.text_ids(number_sentence(rng), tokenizer), (), train_text=True)

  # `shuffle` reseeds per epoch, so `repeat` gives a new order every epoch.
  image_ds = (grain.MapDataset.range(len(images)).shuffle(seed=shuffle_seed).repeat()
              .random_map(image_example, seed=image_seed))
  text_ds = grain.MapDataset.range(sys.maxsize).random_map(text_example, seed=text_seed)

  def texts_before(block: int) -> int:
    return int(block * _MIX_BLOCK * text_fraction)

  @functools.lru_cache(maxsize=4)
  def block_layout(block: int) -> tuple[np.ndarray, np.ndarray]:
    """(is_text [B], index into the text or image stream [B]) of one block."""
    n_text = texts_before(block + 1) - texts_before(block)
    is_text = np.zeros(_MIX_BLOCK, bool)
    is_text[np.random.default_rng([mix_seed, block]).permutation(_MIX_BLOCK)[:n_text]] = True
    rank = np.where(is_text, np.cumsum(is_text), np.cumsum(~is_text)) - 1
    base = np.where(is_text, texts_before(block), block * _MIX_BLOCK - texts_before(block))
    return is_text, base + rank

  def select(i: int) -> Example:
    block, j = divmod(int(i), _MIX_BLOCK)
    is_text, index = block_layout(block)
    return text_ds[int(index[j])] if is_text[j] else image_ds[int(index[j])]

  examples = grain.MapDataset.range(sys.maxsize).map(select)

  def example_at(i: int) -> Example:
    if i < 0:
      raise IndexError(f"example index {i} < 0")
    return examples[i]

  return example_at
