"""The embedded default: scikit-learn's 8x8 digits and sentences about numbers.

Nothing is downloaded: `sklearn.datasets.load_digits` ships its 1797 images.
Images are pixel-space "latents" [8, 8, 1] scaled from 0..16 to [-1, 1]. An
image example is the reference's training row

    <s> prompt <|im_start|> <image> <|im_end|> \\n </s>

with a random one of the reference's prompt templates filled with the class
name ("zero".."nine"), the prompt dropped (empty) with probability
`data.cfg_drop_prob` for classifier-free guidance. Text-only examples are true
sentences about small numbers ("three plus four is seven."), a fraction
`data.text_fraction` of the stream. Example i is a pure function of (seed, i),
read through a Grain MapDataset, so any position can be resumed.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from monoformer_jax.data.packing import Example, PackedBatches, RowSpec, host_stream

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
               "nine")
NUMBER_WORDS = CLASS_NAMES + ("ten", "eleven", "twelve", "thirteen", "fourteen",
                              "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                              "twenty")
# The reference's ImageNet prompt templates, its "an photo" included.
TEMPLATES = ("Please generate an image of {}.", "{}", "an image of {}.", "an photo of {}.")


@functools.lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
  """(images [1797, 8, 8, 1] float32 in [-1, 1], labels [1797] int)."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]
  return images, digits.target.astype(np.int64)


def to_unit_range(x):
  """Model-space pixels [-1, 1] -> [0, 1], clipped."""
  return np.clip((np.asarray(x) + 1.0) / 2.0, 0.0, 1.0)


def class_prompt(digit: int) -> str:
  return TEMPLATES[0].format(CLASS_NAMES[digit])


def number_sentence(rng: np.random.Generator) -> str:
  """A true statement about numbers up to twenty, in words."""
  kind = rng.integers(6)
  a, b = (int(x) for x in rng.integers(0, 10, size=2))
  w = NUMBER_WORDS
  if kind == 0:
    return f"{w[a]} plus {w[b]} is {w[a + b]}."
  if kind == 1:
    a, b = max(a, b), min(a, b)
    return f"{w[a]} minus {w[b]} is {w[a - b]}."
  if kind == 2:
    a, b = a % 5, b % 5  # products stay within twenty
    return f"{w[a]} times {w[b]} is {w[a * b]}."
  if kind == 3:
    return f"the number after {w[a]} is {w[a + 1]}."
  if kind == 4:
    a = max(a, 1)
    return f"the number before {w[a]} is {w[a - 1]}."
  return f"{w[a]} is an {'even' if a % 2 == 0 else 'odd'} number."


def image_example_ids(prompt: str | None, tokenizer) -> list[int]:
  t = tokenizer
  return ([t.bos_id] + t.encode(prompt or "") + [t.im_start_id, t.image_id, t.im_end_id]
          + t.encode("\n") + [t.eos_id])


def image_prompt_example(prompt: str | None, tokenizer, image_shape) -> Example:
  """The row of an image to generate (None or "": the guidance-null prompt)."""
  return Example(image_example_ids(prompt, tokenizer),
                 [np.zeros(image_shape, np.float32)], train_text=False)


def digits_example_stream(config, tokenizer, seed: int):
  """example_at(i) for the mixed digits + sentences stream (infinite)."""
  images, labels = load_digit_images()
  n = len(images)
  text_on_images = config.loss.text_on_image_examples

  def make(i: int) -> Example:
    rng = np.random.default_rng([seed, i])
    if rng.random() < config.data.text_fraction:
      ids = [tokenizer.bos_id] + tokenizer.encode(number_sentence(rng)) + [tokenizer.eos_id]
      return Example(ids, (), train_text=True)
    epoch, j = divmod(i, n)
    k = int(np.random.default_rng([seed, epoch, 1]).permutation(n)[j])
    prompt = None
    if rng.random() >= config.data.cfg_drop_prob:
      prompt = TEMPLATES[rng.integers(len(TEMPLATES))].format(CLASS_NAMES[labels[k]])
    return Example(image_example_ids(prompt, tokenizer), [images[k]],
                   train_text=text_on_images)

  # Grain gives random access by index (and the same API as TFDS data sources).
  dataset = grain.MapDataset.range(2 ** 62).map(make)
  return lambda i: dataset[i]


def row_spec(config, tokenizer) -> RowSpec:
  m = config.model
  return RowSpec(seq_len=config.data.seq_len, max_images=config.data.max_images_per_row,
                 image_shape=(m.image_size, m.image_size, m.in_channels),
                 tokens_per_image=(m.image_size // m.patch_size) ** 2,
                 image_id=tokenizer.image_id, pad_id=tokenizer.pad_id,
                 text_on_image_examples=config.loss.text_on_image_examples)


def make_digits_batches(config, tokenizer, *, process_index: int = 0,
                        process_count: int = 1, state: dict | None = None) -> PackedBatches:
  """This host's batches of `data.batch_size / process_count` rows."""
  if config.data.batch_size % process_count:
    raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by "
                     f"{process_count} processes")
  stream = host_stream(digits_example_stream(config, tokenizer, config.seed),
                       process_index, process_count)
  batches = PackedBatches(stream, row_spec(config, tokenizer),
                          rows=config.data.batch_size // process_count)
  if state is not None:
    batches.set_state(state)
  return batches
