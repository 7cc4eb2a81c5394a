"""The embedded default: scikit-learn's 8x8 digits and true sentences about numbers.

Nothing is downloaded: `sklearn.datasets.load_digits` ships its 1797 images.
Images are pixel-space "latents" [8, 8, 1] float32, scaled from 0..16 to
[-1, 1] (images.py). The dataset supplies its class names ("zero".."nine"),
the images and the sentences; the rows are the reference's (prompts.py): an
image under a random template filled with its class name, the prompt dropped
with probability `data.cfg_drop_prob`, and text-only examples that are true
statements about the numbers zero..twenty ("three plus four is seven."), a
share `data.text_fraction` of the stream. A model that reads images
(model.vision_encoder) also gets reading examples, a share `data.read_fraction`:
a real digit as a read image, the question "which digit is this?" and the
answer "it is seven." (cross-entropy on the answer). Every tenth prepared
digit is held out of them, for `eval/digits.reading_accuracy`.

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

READ_PROMPT = "which digit is this?"
HELD_OUT_EVERY = 10   # prepared digit i is held out of the reading examples iff i % 10 == 0

__all__ = ["CLASS_NAMES", "NUMBER_WORDS", "READ_PROMPT", "load_digit_images", "number_sentence",
           "digits_example_stream", "reading_answer", "answer_label", "reading_split"]


def reading_answer(label: int) -> str:
  """What a reading example answers about a digit of class `label`: "it is seven."."""
  return f"it is {CLASS_NAMES[int(label)]}."


def answer_label(text: str) -> int:
  """The class an answer names ("it is seven." -> 7), or -1 when it names none."""
  words = text.strip().rstrip(".").split()
  return CLASS_NAMES.index(words[2]) if (len(words) == 3 and words[:2] == ["it", "is"]
                                         and words[2] in CLASS_NAMES) else -1


class _Subset:
  """Records at `indices` of a random-access record source."""

  def __init__(self, records, indices):
    self.records, self.indices = records, np.asarray(indices)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.records[int(self.indices[i])]


def reading_split(records) -> tuple[_Subset, _Subset]:
  """(records the reading examples use, the held-out ones: every tenth)."""
  index = np.arange(len(records))
  held = index % HELD_OUT_EVERY == 0
  return _Subset(records, index[~held]), _Subset(records, index[held])


def digit_records(config, directory: str | None = None):
  """The prepared digits (their TFDS copy, made on first use)."""
  return builders.data_source(builders.digits_dir(cache_dir(config, directory)), "train",
                              kind="digits")


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
  records = digit_records(config, directory)
  m = config.model
  shape = tuple(np.asarray(records[0]["image"]).shape)
  if (m.image_size, m.image_size, m.in_channels) != shape:
    raise ConfigError(f"digits are {shape} images but the config asks for "
                      f"model.image_size={m.image_size}, model.in_channels="
                      f"{m.in_channels}; use image_size=8, in_channels=1")
  text_fraction = real("data.text_fraction", config.data.text_fraction, low=0, high=1)
  drop_prob = real("data.cfg_drop_prob", config.data.cfg_drop_prob, low=0, high=1)
  reads = bool(m.get("vision_encoder", ""))
  read_fraction = real("data.read_fraction", config.data.get("read_fraction", 0.0), low=0,
                       high=1 - text_fraction) if reads else 0.0
  image_seed, text_seed, mix_seed, read_seed = (
      int(s) for s in np.random.SeedSequence(seed).generate_state(4))

  def image_example(record, rng: np.random.Generator) -> Example:
    prompt = prompts.training_prompt(CLASS_NAMES[int(record["label"])], rng, drop_prob)
    return prompts.image_example(prompt, np.asarray(record["image"], np.float32), tokenizer)

  def text_example(rng: np.random.Generator) -> Example:
    return Example(prompts.text_ids(number_sentence(rng), tokenizer), (), train_text=True)

  def reading_example(record, rng: np.random.Generator) -> Example:
    del rng
    return prompts.reading_example(READ_PROMPT, reading_answer(int(record["label"])),
                                   np.asarray(record["image"], np.float32), tokenizer)

  images = pipeline.record_stream(records, image_example, image_seed)
  texts = pipeline.generated_stream(text_example, text_seed)
  if not read_fraction:
    return pipeline.mix([texts, images], [text_fraction, 1.0 - text_fraction], mix_seed)
  readings = pipeline.record_stream(reading_split(records)[0], reading_example, read_seed)
  return pipeline.mix([texts, images, readings],
                      [text_fraction, 1.0 - text_fraction - read_fraction, read_fraction],
                      mix_seed)
