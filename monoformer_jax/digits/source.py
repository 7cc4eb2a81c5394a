"""The embedded default: scikit-learn's 8x8 digits and true sentences about numbers.

Nothing is downloaded: `sklearn.datasets.load_digits` ships its 1797 images.
Images are pixel-space "latents" [8, 8, 1] float32, scaled from 0..16 to
[-1, 1] (vision/pixels.py). The dataset supplies its class names ("zero".."nine"),
the images and the sentences; the rows are the reference's (data/prompts.py): an
image under a random template filled with its class name, the prompt dropped
with probability `data.cfg_drop_prob`, and text-only examples that are true
statements about the numbers zero..twenty ("three plus four is seven."), a
share `data.text_fraction` of the stream. A model that reads images
(model.vision_encoder) also gets reading examples, a share `data.read_fraction`:
a real digit as a read image, the question "which digit is this?" and the
answer "it is seven." (cross-entropy on the answer). Every tenth prepared
digit is held out of them, for `digits/evaluators.reading_accuracy`.

Two more kinds teach what the reference cannot do (a share each,
`data.interleaved_fraction` and `data.edit_fraction`):
  * interleaved: text that names one to three digits, each followed by a
    drawing of it, "here is a seven: <image>. and a two: <image>." (cross-
    entropy on the text, so the model learns to write `<|im_start|>` after a
    name; the diffusion loss on the drawings);
  * editing (with a vision encoder): a real digit READ, the instruction
    "the next digit:", and a drawing of the next digit (3 -> 4, 9 -> 0). For
    guidance the instruction and the read digit are each dropped with
    probability `data.cfg_drop_prob`. The held-out digits are never sources.

The images are prepared once into array_record (`digits_dir`, on first use:
records of `image` float32 [8, 8, 1] in [-1, 1] and `label`) and read back
through the same Grain pipeline as ImageNet (data/pipeline.py): example i of
the stream is a pure function of (seed, i), so a batch iterator resumes from
one integer. Every digit appears once per image epoch, in a fresh order each
epoch. `SOURCE` is the `digits` dataset of data/datasets.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
from collections.abc import Callable

import numpy as np
from absl import logging
from etils import epath

from monoformer_jax.config.fields import real
from monoformer_jax.data import builders, pipeline, prompts
from monoformer_jax.data.sources import DataSource, PrepareArgs, Prepared
from monoformer_jax.errors import ConfigError, PathError
from monoformer_jax.layout import Example
from monoformer_jax.paths import is_local, writable_dir
from monoformer_jax.vision.pixels import from_unit_range

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMBER_WORDS = CLASS_NAMES + (
  "ten",
  "eleven",
  "twelve",
  "thirteen",
  "fourteen",
  "fifteen",
  "sixteen",
  "seventeen",
  "eighteen",
  "nineteen",
  "twenty",
)

READ_PROMPT = "which digit is this?"
EDIT_PROMPT = "the next digit:"
INTERLEAVED_PROMPT = "here is a"  # what the interleaved examples start with
HELD_OUT_EVERY = 10  # prepared digit i is held out of the reading examples iff i % 10 == 0
# configs/digits.py, the classifier on its 200 end-of-run samples: 10% (chance)
# after 200 steps, 86.5% after 400, 100% after 800 (the default; README).
STEPS_FOR_SAMPLES = 400

__all__ = [
  "CLASS_NAMES",
  "NUMBER_WORDS",
  "READ_PROMPT",
  "EDIT_PROMPT",
  "INTERLEAVED_PROMPT",
  "SOURCE",
  "load_digit_images",
  "number_sentence",
  "digits_example_stream",
  "reading_answer",
  "answer_label",
  "reading_split",
  "interleaved_texts",
  "named_digits",
  "next_digit",
  "digit_records",
  "digits_dir",
]


class Digits(DataSource):
  name = "digits"
  pixels = True
  class_noun = "digit"
  steps_for_samples = STEPS_FOR_SAMPLES
  mixable = False
  needs_input = False

  def class_names(self) -> tuple[str, ...]:
    return CLASS_NAMES

  def features(self, *, latent_shape=None, flip: bool = False) -> dict:
    import tensorflow_datasets as tfds

    f = tfds.features
    return dict(
      image=f.Tensor(shape=(8, 8, 1), dtype=np.float32, encoding=f.Encoding.BYTES),
      label=f.Scalar(dtype=np.int64),
    )

  def prepare(self, args: PrepareArgs, output_dir: str) -> Prepared:
    images, labels = load_digit_images()
    return Prepared(
      {
        "train": lambda: (
          dict(key=f"{i:04d}", image=images[i], label=int(labels[i])) for i in range(len(images))
        )
      },
      description="scikit-learn's 8x8 digits, pixels in [-1, 1]",
    )

  def check(self, config):
    """The folder the digits are prepared into on first use (`cache_dir`)."""
    cache_dir(config)

  def examples(self, config, tokenizer, seed: int, directory: str | None = None):
    return digits_example_stream(config, tokenizer, seed, directory)


SOURCE = Digits()


def reading_answer(label: int) -> str:
  """What a reading example answers about a digit of class `label`: "it is seven."."""
  return f"it is {CLASS_NAMES[int(label)]}."


def answer_label(text: str) -> int:
  """The class an answer names ("it is seven." -> 7), or -1 when it names none."""
  words = text.strip().rstrip(".").split()
  return (
    CLASS_NAMES.index(words[2])
    if (len(words) == 3 and words[:2] == ["it", "is"] and words[2] in CLASS_NAMES)
    else -1
  )


def next_digit(label: int) -> int:
  """What an edit draws from a digit of class `label`: the next one, 9 -> 0."""
  return (int(label) + 1) % 10


def interleaved_texts(labels) -> list[str]:
  """The texts around drawings of `labels`: "here is a seven: ", ". and a two: ", "."."""
  names = [CLASS_NAMES[int(k)] for k in labels]
  return [f"{INTERLEAVED_PROMPT} {names[0]}: "] + [f". and a {n}: " for n in names[1:]] + ["."]


def named_digits(texts: list[str]) -> list[int]:
  """The digit each image is said to be: the last digit name in the text
  before it (texts[k] precedes image k), -1 where the text names none."""
  out = []
  for text in texts:
    words = [w.strip(".,:;!?") for w in text.split()]
    named = [CLASS_NAMES.index(w) for w in words if w in CLASS_NAMES]
    out.append(named[-1] if named else -1)
  return out


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
  return builders.data_source(digits_dir(cache_dir(config, directory)), "train", kind="digits")


def digits_dir(cache_dir: str) -> str:
  """The digits prepared into `cache_dir` on first use (from scikit-learn's
  copy; nothing is downloaded); later calls reuse it. Safe when several
  processes ask at once."""
  folder = builders.prepared_dir(cache_dir, "digits")
  done = epath.Path(folder) / builders.INFO  # written last: the copy is whole
  if done.exists():
    return folder
  if not is_local(cache_dir):
    # A bucket has no lock: hosts that find no copy each write one, the same
    # records, uploaded with the marker last; one that finds the marker
    # written meanwhile (write refuses to overwrite it) reads that copy.
    try:
      _prepare_digits(cache_dir, folder)
    except PathError:
      if not done.exists():
        raise
    return folder
  with _locked(os.path.join(cache_dir, ".digits.lock")):
    if not done.exists():
      _prepare_digits(cache_dir, folder)
  return folder


def _prepare_digits(cache_dir: str, folder: str):
  logging.info("preparing the digits into %s (once)", folder)
  prepared = SOURCE.prepare(PrepareArgs(), cache_dir)
  SOURCE.write(cache_dir, prepared.splits, description=prepared.description)


@contextlib.contextmanager
def _locked(path: str):
  """An exclusive lock on `path` (a file beside the data), across processes."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
  """(images [1797, 8, 8, 1] float32 in [-1, 1], labels [1797] int64 in 0..9)."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  images = from_unit_range(digits.images.astype(np.float32) / 16.0)[..., None]
  images.setflags(write=False)  # shared by every example; nobody may edit it
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


DATA_DIR_VARIABLE = "MONOFORMER_DATA_DIR"


def cache_dir(config, directory: str | None = None) -> str:
  """Where the digits' TFDS copy lives: `directory`, data.dir, else
  $MONOFORMER_DATA_DIR (set but empty counts as unset), else
  ~/.cache/monoformer_jax. Until the copy is there the folder must be one that
  is (or can be made) and can be written to; a PathError names it and where it
  came from otherwise."""
  given = (
    (directory, "the digits' folder"),
    (config.data.dir, "--config.data.dir"),
    (os.environ.get(DATA_DIR_VARIABLE), DATA_DIR_VARIABLE),
  )
  folder, origin = next(
    ((value, origin) for value, origin in given if value),
    (os.path.join(os.path.expanduser("~"), ".cache", "monoformer_jax"), "the data folder"),
  )
  if (epath.Path(builders.prepared_dir(folder, "digits")) / builders.INFO).exists():
    return folder
  return writable_dir(folder, "digits' prepared copy", origin)


def digits_example_stream(
  config, tokenizer, seed: int, directory: str | None = None
) -> Callable[[int], Example]:
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
    raise ConfigError(
      f"digits are {shape} images but the config asks for "
      f"model.image_size={m.image_size}, model.in_channels="
      f"{m.in_channels}; use image_size=8, in_channels=1"
    )
  text_fraction = real("data.text_fraction", config.data.text_fraction, low=0, high=1)
  drop_prob = real("data.cfg_drop_prob", config.data.cfg_drop_prob, low=0, high=1)
  reads = bool(m.vision_encoder)
  read_fraction, edit_fraction = (
    real(f"data.{name}", config.data[name], low=0, high=1) if reads else 0.0
    for name in ("read_fraction", "edit_fraction")
  )
  interleaved_fraction = real(
    "data.interleaved_fraction", config.data.interleaved_fraction, low=0, high=1
  )
  image_fraction = 1.0 - text_fraction - read_fraction - edit_fraction - interleaved_fraction
  if image_fraction < 0:
    raise ConfigError(
      f"data.text_fraction={text_fraction} + read_fraction={read_fraction} + "
      f"edit_fraction={edit_fraction} + interleaved_fraction={interleaved_fraction} "
      "exceed 1; lower them (what is left is the share of image examples)"
    )
  image_seed, text_seed, mix_seed, read_seed, interleaved_seed, edit_seed = (
    int(s) for s in np.random.SeedSequence(seed).generate_state(6)
  )

  def image_example(record, rng: np.random.Generator) -> Example:
    prompt = prompts.training_prompt(CLASS_NAMES[int(record["label"])], rng, drop_prob)
    return prompts.image_example(prompt, np.asarray(record["image"], np.float32), tokenizer)

  def text_example(rng: np.random.Generator) -> Example:
    return Example(prompts.text_ids(number_sentence(rng), tokenizer), (), train_text=True)

  def reading_example(record, rng: np.random.Generator) -> Example:
    del rng
    return prompts.reading_example(
      READ_PROMPT,
      reading_answer(int(record["label"])),
      np.asarray(record["image"], np.float32),
      tokenizer,
    )

  images = pipeline.record_stream(records, image_example, image_seed)
  texts = pipeline.generated_stream(text_example, text_seed)
  streams = [(texts, text_fraction), (images, image_fraction)]
  if read_fraction:
    readings = pipeline.record_stream(reading_split(records)[0], reading_example, read_seed)
    streams.append((readings, read_fraction))
  if interleaved_fraction or edit_fraction:
    by_class = _records_by_class(reading_split(records)[0])
  if interleaved_fraction:

    def interleaved_example(rng: np.random.Generator) -> Example:
      labels = rng.integers(0, 10, size=int(rng.integers(1, 4)))
      drawings = [_a_digit(by_class, k, rng) for k in labels]
      return prompts.interleaved_example(interleaved_texts(labels), drawings, tokenizer)

    streams.append(
      (pipeline.generated_stream(interleaved_example, interleaved_seed), interleaved_fraction)
    )
  if edit_fraction:

    def edit_example(record, rng: np.random.Generator) -> Example:
      target = _a_digit(by_class, next_digit(int(record["label"])), rng)
      keep_text, keep_image = rng.random(2) >= drop_prob
      return prompts.edit_example(
        EDIT_PROMPT if keep_text else None,
        np.asarray(record["image"], np.float32) if keep_image else None,
        target,
        tokenizer,
      )

    streams.append(
      (pipeline.record_stream(reading_split(records)[0], edit_example, edit_seed), edit_fraction)
    )
  return pipeline.mix([x for x, _ in streams], [w for _, w in streams], mix_seed)


def _records_by_class(records) -> list[list]:
  """The images [8, 8, 1] of `records`, per class."""
  out = [[] for _ in CLASS_NAMES]
  for i in range(len(records)):
    out[int(records[i]["label"])].append(np.asarray(records[i]["image"], np.float32))
  return out


def _a_digit(by_class, label: int, rng: np.random.Generator) -> np.ndarray:
  images = by_class[int(label)]
  return images[int(rng.integers(len(images)))]
