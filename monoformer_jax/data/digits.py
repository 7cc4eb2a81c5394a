"""The embedded default: scikit-learn's 8x8 digits and true sentences about numbers.

Nothing is downloaded: `sklearn.datasets.load_digits` ships its 1797 images.
Images are pixel-space "latents" [8, 8, 1] float32, scaled from 0..16 to
[-1, 1] (images.py). The dataset supplies its class names ("zero".."nine"),
the images and the sentences; the rows are the reference's (prompts.py): an
image under a random template filled with its class name, the prompt dropped
with probability `data.cfg_drop_prob`, and text-only examples that are true
statements about the numbers zero..twenty ("three plus four is seven."), a
share `data.text_fraction` of the stream.

The images are prepared once into array_record by their TFDS builder
(data/builders.py `digits_dir`) and read back through the same Grain pipeline
as ImageNet (data/pipeline.py): example i of the stream is a pure function of
(seed, i), so a batch iterator resumes from one integer. Every digit appears
once per image epoch, in a fresh order each epoch.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import numpy as np

from monoformer_jax.errors import ConfigError
from monoformer_jax.data import builders, pipeline, prompts
from monoformer_jax.data.images import from_unit_range
from monoformer_jax.data.packing import Example
from monoformer_jax.validate import real

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine")
NUMBER_WORDS = CLASS_NAMES + ("ten", "eleven", "twelve", "thirteen", "fourteen",
                              "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                              "twenty")

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


def cache_dir(config, directory: str | None = None) -> str:
  """Where the digits' TFDS copy lives: `directory`, data.dir, else
  $MONOFORMER_DATA_DIR, else ~/.cache/monoformer_jax."""
  return (directory or config.data.get("dir", "") or os.environ.get("MONOFORMER_DATA_DIR")
          or os.path.join(os.path.expanduser("~"), ".cache", "monoformer_jax"))


def digits_example_stream(config, tokenizer, seed: int,
                          directory: str | None = None) -> Callable[[int], Example]:
  """example_at(i): the infinite mixed stream of digit and sentence examples.

  The digits are read from their TFDS copy (prepared into `cache_dir` on
  first use: `image` [8, 8, 1] in [-1, 1], `label`). Uses data.text_fraction,
  data.cfg_drop_prob and model.image_size / model.in_channels (which must
  describe 8x8x1 digits).
  """
  records = builders.data_source(builders.digits_dir(cache_dir(config, directory)), "train",
                                 kind="digits")
  m = config.model
  shape = tuple(np.asarray(records[0]["image"]).shape)
  if (m.image_size, m.image_size, m.in_channels) != shape:
    raise ConfigError(f"digits are {shape} images but the config asks for "
                      f"model.image_size={m.image_size}, model.in_channels="
                      f"{m.in_channels}; use image_size=8, in_channels=1")
  text_fraction = real("data.text_fraction", config.data.text_fraction, low=0, high=1)
  drop_prob = real("data.cfg_drop_prob", config.data.cfg_drop_prob, low=0, high=1)
  image_seed, text_seed, mix_seed = (
      int(s) for s in np.random.SeedSequence(seed).generate_state(3))

  def image_example(record, rng: np.random.Generator) -> Example:
    prompt = prompts.training_prompt(CLASS_NAMES[int(record["label"])], rng, drop_prob)
    return prompts.image_example(prompt, np.asarray(record["image"], np.float32), tokenizer)

  def text_example(rng: np.random.Generator) -> Example:
    return Example(prompts.text_ids(number_sentence(rng), tokenizer), (), train_text=True)

  images = pipeline.record_stream(records, image_example, image_seed)
  texts = pipeline.generated_stream(text_example, text_seed)
  return pipeline.mix([texts, images], [text_fraction, 1.0 - text_fraction], mix_seed)
