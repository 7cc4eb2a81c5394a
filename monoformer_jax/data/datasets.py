"""The datasets the project trains on, and the one path from a config to batches.

A dataset is its name (`config.data.name`), its class names, what its images
are (pixels in [-1, 1], or SD-VAE latents) and its example stream: a function
`(config, tokenizer, seed) -> example_at(i)` giving example i of an infinite,
seeded stream. Everything else (the prompt format, packing, per-host shares,
resuming) is shared, so the rest of the package asks this module and never
names a dataset.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from monoformer_jax.data import digits
from monoformer_jax.errors import ConfigError
from monoformer_jax.data.packing import Example, PackedBatches, host_stream, row_spec


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  class_names: tuple[str, ...]   # what class-conditional prompts fill the templates with
  class_noun: str                # "digit": what one class is, for messages
  pixels: bool                   # images are pixels in [-1, 1]; else SD-VAE latents
  example_stream: Callable[..., Callable[[int], Example]]
  # Training steps at the dataset's default config before its samples are
  # recognisable (measured; 0: not known). Shorter runs are warned about.
  steps_for_samples: int = 0


# configs/digits.py, the classifier on its 200 end-of-run samples: 10% (chance)
# after 200 steps, 86.5% after 400, 100% after 800 (the default; README).
STEPS_FOR_DIGITS = 400

DATASETS = {d.name: d for d in (
    Dataset("digits", digits.CLASS_NAMES, "digit", pixels=True,
            example_stream=digits.digits_example_stream, steps_for_samples=STEPS_FOR_DIGITS),
)}


def dataset_of(config) -> Dataset:
  """The Dataset `config.data.name` names; raises, listing those there are."""
  name = config.data.name
  if name not in DATASETS:
    raise ConfigError(f"config.data.name={name!r} has no input pipeline yet; training can "
                      f"use {tuple(DATASETS)}")
  return DATASETS[name]


def class_names(config) -> tuple[str, ...]:
  """The class names of the config's dataset; () when it has none or is not known here
  (e.g. a converted checkpoint's)."""
  known = DATASETS.get(config.data.name)
  return known.class_names if known else ()


def draws_pixels(config) -> bool:
  """Whether a config's model draws pixels (the digits default) rather than
  latents that the SD-VAE must decode (every other model)."""
  known = DATASETS.get(config.data.name)
  return bool(known and known.pixels)


def class_by_name(name: str, config) -> str:
  """A class of the config's dataset by its name or its index ("7" -> "seven").
  A dataset unknown here takes any name as it is."""
  names = class_names(config)
  if not names:
    return name
  if name.isdigit() and int(name) < len(names):
    return names[int(name)]
  if name not in names:
    known = DATASETS[config.data.name]
    listed = names if len(names) <= 20 else names[:20] + ("...",)
    raise ConfigError(f"class name {name!r} is not a {known.class_noun}: use one of {listed} "
                     f"or an index 0..{len(names) - 1}")
  return name


def make_batches(config, tokenizer, *, process_index: int = 0, process_count: int = 1,
                 state: dict | None = None) -> PackedBatches:
  """This host's batches: `data.batch_size // process_count` rows each, packed
  from its share of the config's dataset stream seeded by `config.seed`;
  `state` (from `get_state()`) resumes."""
  dataset = dataset_of(config)
  if config.data.batch_size % process_count:
    raise ConfigError(f"data.batch_size={config.data.batch_size} (global rows) is not "
                      f"divisible by {process_count} processes")
  stream = host_stream(dataset.example_stream(config, tokenizer, config.seed),
                       process_index, process_count)
  batches = PackedBatches(stream, rows=config.data.batch_size // process_count,
                          spec=row_spec(config, tokenizer))
  if state is not None:
    batches.set_state(state)
  return batches
