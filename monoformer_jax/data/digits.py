"""The embedded default: scikit-learn's 8x8 digits and true sentences about numbers.

Nothing is downloaded: `sklearn.datasets.load_digits` ships its 1797 images.
Images are pixel-space "latents" [8, 8, 1] float32, scaled from 0..16 to
[-1, 1] (x / 8 - 1; `to_unit_range` maps back to [0, 1]). An image example is
the reference's training row

    <s> prompt <|im_start|> <image> <|im_end|> \\n </s>

with a random one of the reference's prompt templates filled with the class
name ("zero".."nine"), the prompt dropped (empty) with probability
`data.cfg_drop_prob` for classifier-free guidance. Text-only examples,
`<s> sentence </s>`, are true statements about the numbers zero..twenty
("three plus four is seven."), a share `data.text_fraction` of the stream.

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

from monoformer_jax.data.packing import Example, PackedBatches, host_stream, row_spec

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine")
NUMBER_WORDS = CLASS_NAMES + ("ten", "eleven", "twelve", "thirteen", "fourteen",
                              "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                              "twenty")
# The reference's ImageNet prompt templates, its "an photo" included.
TEMPLATES = ("Please generate an image of {}.", "{}", "an image of {}.", "an photo of {}.")

# Text/image choices are drawn per block of this many examples, with exactly
# the configured share of text in each block at random places: the mix is
# random but the image stream index stays computable from i alone.
_MIX_BLOCK = 128

__all__ = ["CLASS_NAMES", "NUMBER_WORDS", "TEMPLATES", "load_digit_images",
           "to_unit_range", "class_prompt", "number_sentence", "image_prefix_ids",
           "image_example_ids", "image_prompt_example", "digits_example_stream",
           "make_digits_batches", "row_spec"]


@functools.lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
  """(images [1797, 8, 8, 1] float32 in [-1, 1], labels [1797] int64 in 0..9)."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]
  images.setflags(write=False)   # shared by every example; nobody may edit it
  labels = digits.target.astype(np.int64)
  labels.setflags(write=False)
  return images, labels


def to_unit_range(x) -> np.ndarray:
  """Model-space pixels [-1, 1] -> [0, 1] (clipped), for writing samples."""
  return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def class_prompt(digit: int) -> str:
  """The first template for a digit: "Please generate an image of seven."."""
  return TEMPLATES[0].format(CLASS_NAMES[digit])


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


def image_prefix_ids(prompt: str | None, tokenizer) -> list[int]:
  """<s> prompt <|im_start|>: what an image to generate sees; None/"": no prompt."""
  return [tokenizer.bos_id] + tokenizer.encode(prompt or "") + [tokenizer.im_start_id]


def image_example_ids(prompt: str | None, tokenizer) -> list[int]:
  """<s> prompt <|im_start|> <image> <|im_end|> \\n </s>; no prompt for None/""."""
  t = tokenizer
  return (image_prefix_ids(prompt, t) + [t.image_id, t.im_end_id] + t.encode("\n")
          + [t.eos_id])


def image_prompt_example(prompt: str | None, tokenizer, image_shape) -> Example:
  """The row of an image to generate, with a zero image in its slot (None or
  "": the guidance-null prompt). Its text trains nothing."""
  return Example(image_example_ids(prompt, tokenizer),
                 [np.zeros(tuple(image_shape), np.float32)], train_text=False)


def _check_probability(name: str, p: float):
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"{name}={p} is not a probability in [0, 1]")


def digits_example_stream(config, tokenizer, seed: int) -> Callable[[int], Example]:
  """example_at(i): the infinite mixed stream of digit and sentence examples.

  Uses data.text_fraction, data.cfg_drop_prob and model.image_size /
  model.in_channels (which must describe 8x8x1 digits).
  """
  images, labels = load_digit_images()
  m = config.model
  if (m.image_size, m.image_size, m.in_channels) != images.shape[1:]:
    raise ValueError(f"digits are {images.shape[1:]} images but the config asks for "
                     f"model.image_size={m.image_size}, model.in_channels="
                     f"{m.in_channels}; use image_size=8, in_channels=1")
  text_fraction = float(config.data.text_fraction)
  drop_prob = float(config.data.cfg_drop_prob)
  _check_probability("data.text_fraction", text_fraction)
  _check_probability("data.cfg_drop_prob", drop_prob)
  shuffle_seed, image_seed, text_seed, mix_seed = (
      int(s) for s in np.random.SeedSequence(seed).generate_state(4))

  def image_example(k: int, rng: np.random.Generator) -> Example:
    prompt = None
    if rng.random() >= drop_prob:
      template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
      prompt = template.format(CLASS_NAMES[labels[k]])
    # train_text=True: whether image prompts train CE is the packer's switch
    # (loss.text_on_image_examples), not the dataset's.
    return Example(image_example_ids(prompt, tokenizer), [images[k]], train_text=True)

  def text_example(_, rng: np.random.Generator) -> Example:
    ids = [tokenizer.bos_id] + tokenizer.encode(number_sentence(rng)) + [tokenizer.eos_id]
    return Example(ids, (), train_text=True)

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


def make_digits_batches(config, tokenizer, *, process_index: int = 0,
                        process_count: int = 1, state: dict | None = None) -> PackedBatches:
  """This host's batches: `data.batch_size // process_count` rows each, packed
  from its share of the stream seeded by `config.seed`; `state` resumes."""
  if config.data.name != "digits":
    raise ValueError(f"make_digits_batches got data.name={config.data.name!r}; "
                     "it only serves 'digits'")
  if config.data.batch_size % process_count:
    raise ValueError(f"data.batch_size={config.data.batch_size} (global rows) is not "
                     f"divisible by {process_count} processes")
  spec = row_spec(config, tokenizer)
  stream = host_stream(digits_example_stream(config, tokenizer, config.seed),
                       process_index, process_count)
  batches = PackedBatches(stream, rows=config.data.batch_size // process_count,
                          seq_len=spec.seq_len, max_images=spec.max_images,
                          image_shape=spec.image_shape,
                          tokens_per_image=spec.tokens_per_image, tokenizer=tokenizer,
                          text_on_image_examples=spec.text_on_image_examples)
  if state is not None:
    batches.set_state(state)
  return batches
