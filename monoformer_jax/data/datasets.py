"""The dataset registry, and the one path from a config to batches.

A dataset is a source (data/sources/: its records, its preparation, its
example stream, its class names, pixels or latents), registered here by name
(`config.data.name`, `python -m monoformer_jax.data.prepare NAME`) and
imported only when a config names it. Everything else (the prompt format,
packing, per-host shares, resuming) is shared, so the rest of the package asks
this module and never names a dataset. Adding one: its module (a `DataSource`
made as `SOURCE`) and its line below.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json

import numpy as np
from absl import logging

from monoformer_jax.data import pipeline
from monoformer_jax.data.packing import PackedBatches
from monoformer_jax.data.prompts import TEMPLATES, image_example, training_prompt
from monoformer_jax.data.sharded import ShardedBatches, data_state_of, host_stream
from monoformer_jax.errors import ConfigError
from monoformer_jax.layout import expanded_length, row_spec, useful_work

# name -> the module that makes its source as SOURCE
SOURCES = {
  "digits": "monoformer_jax.digits.source",  # the embedded default (configs/digits.py)
  "imagenet": "monoformer_jax.data.sources.imagenet",
  "text_to_image": "monoformer_jax.data.sources.text_to_image",
  "chat": "monoformer_jax.data.sources.chat",
  "text": "monoformer_jax.data.sources.text",
  "llava": "monoformer_jax.data.sources.llava",
  "mix": "monoformer_jax.data.sources.mix",
}


def source(name: str):
  """The source registered as `name` (a data.sources.DataSource); raises,
  listing those there are."""
  if name not in SOURCES:
    raise ConfigError(
      f"config.data.name={name!r} has no input pipeline yet; training can use {tuple(SOURCES)}"
    )
  return importlib.import_module(SOURCES[name]).SOURCE


def source_of(config):
  """The source `config.data.name` names."""
  return source(config.data.name)


def check_data(config):
  """The data fields that name files, before anything is read (the source's
  prepared folders, a mix's weights)."""
  source_of(config).check(config)


def class_names(config) -> tuple[str, ...]:
  """The class names of the config's dataset; () when it has none or is not known here
  (e.g. a converted checkpoint's)."""
  name = config.data.name
  return source(name).class_names() if name in SOURCES else ()


def draws_pixels(config) -> bool:
  """Whether a config's model draws pixels rather than latents that the SD-VAE
  must decode (every model of a dataset not known here)."""
  name = config.data.name
  return name in SOURCES and source(name).pixels


def class_by_name(name: str, config) -> str:
  """A class of the config's dataset by its name or its index ("7" -> "seven").
  A dataset unknown here takes any name as it is."""
  names = class_names(config)
  if not names:
    return name
  if name.isdigit() and int(name) < len(names):
    return names[int(name)]
  if name not in names:
    listed = names if len(names) <= 20 else names[:20] + ("...",)
    raise ConfigError(
      f"class name {name!r} is not a {source_of(config).class_noun}: use one "
      f"of {listed} or an index 0..{len(names) - 1}"
    )
  return name


@dataclasses.dataclass(frozen=True)
class RowUse:
  """How rows of `seq_len` columns hold a dataset's class-prompted images, as
  the packer lays them out (`class_prompt_rows`): totals over `rows` rows."""

  seq_len: int
  rows: int
  examples: int
  images: int
  tokens: int  # columns holding an example
  attended: int  # query-key pairs inside the examples (layout.useful_work)
  longest: int  # columns of the longest class prompt's example
  longest_prompt: str

  @property
  def padding(self) -> float:
    """The share of the columns that hold no example."""
    return 1.0 - self.tokens / (self.rows * self.seq_len)

  def describe(self) -> str:
    return (
      f"{self.padding:.1%} padding in rows of {self.seq_len} columns "
      f"({self.examples / self.rows:.2f} examples and {self.images / self.rows:.2f} images "
      f"per row; the longest class prompt, {self.longest_prompt!r}, takes {self.longest})"
    )


def class_prompt_rows(config, tokenizer, *, examples: int = 512) -> RowUse | None:
  """How the config's rows hold its dataset's class-prompted images: at least
  `examples` of them (a random class under a random template, or the prompt
  dropped at data.cfg_drop_prob, as training draws them; images of the model's
  shape) packed as training packs them, `data.batch_size` rows at a time. None
  for a dataset without classes. Raises, before any data is read, when the
  longest class prompt under any template does not fit a row."""
  names = class_names(config)
  if not names:
    return None
  spec = row_spec(config, tokenizer)
  zero = np.zeros(spec.image_shape, np.float32)
  prompts = [t.format(name) for name in names for t in TEMPLATES]
  lengths = [expanded_length(image_example(p, zero, tokenizer), spec) for p in prompts]
  longest = int(np.argmax(lengths))
  if lengths[longest] > spec.seq_len:
    raise ConfigError(
      f"data.seq_len={spec.seq_len}: the class prompt {prompts[longest]!r} and its image "
      f"take {lengths[longest]} columns (its tokens with data.tokenizer="
      f"{config.data.tokenizer!r}, the image's {spec.tokens_per_image} and the specials); "
      f"raise data.seq_len to at least {lengths[longest]}"
    )

  def example_at(i: int):
    rng = np.random.default_rng([config.seed, i])
    name = names[int(rng.integers(len(names)))]
    return image_example(training_prompt(name, rng, config.data.cfg_drop_prob), zero, tokenizer)

  packed = PackedBatches(example_at, rows=config.data.batch_size, spec=spec)
  rows = images = tokens = attended = 0
  while packed.next_example < examples:
    batch = next(packed)
    used, pairs = useful_work(batch["segment_ids"])
    rows, tokens, attended = rows + len(batch["segment_ids"]), tokens + used, attended + pairs
    images += int(batch["image_valid"].sum())
  return RowUse(
    seq_len=spec.seq_len,
    rows=rows,
    examples=packed.next_example,
    images=images,
    tokens=tokens,
    attended=attended,
    longest=lengths[longest],
    longest_prompt=prompts[longest],
  )


def host_example_stream(config_json: str, process_index: int, process_count: int):
  """This host's example_at of a config given as JSON (what worker processes build)."""
  import ml_collections

  from monoformer_jax.text.tokenizer import tokenizer_of

  config = ml_collections.ConfigDict(json.loads(config_json))
  return host_stream(
    source_of(config).examples(config, tokenizer_of(config), config.seed),
    process_index,
    process_count,
  )


def data_shards(config, process_count: int, state: dict | None = None) -> int:
  """How many shards the stream and the global batch are cut into:
  data.shards, or when it is 0 the resumed state's count (so a run resumes
  exactly on another number of processes), else one per process."""
  shards = config.data.shards
  saved = data_state_of(state)["shards"] if state is not None else None
  if shards == 0:
    shards = saved if saved and saved % process_count == 0 else process_count
  if saved and saved != shards:
    logging.warning(
      "the data state was read in %d shards, these %d processes read %d "
      "(data.shards=%d); the data order restarts",
      saved,
      process_count,
      shards,
      config.data.shards,
    )
  if shards % process_count:
    raise ConfigError(
      f"data.shards={shards} is not divisible by the {process_count} "
      "processes (each owns whole shards); use a multiple of "
      f"{process_count}, or 0 for one shard per process"
    )
  if config.data.batch_size % shards:
    raise ConfigError(
      f"data.batch_size={config.data.batch_size} (global rows) is not "
      f"divisible by {shards} data shards (data.shards, or one per "
      "process); change either"
    )
  return shards


def make_batches(
  config, tokenizer, *, process_index: int = 0, process_count: int = 1, state: dict | None = None
):
  """This host's batches: its data shards' blocks of rows (sharded.ShardedBatches;
  `data.batch_size // shards` rows each) packed from the config's dataset
  stream seeded by `config.seed`, the examples made by `data.workers`
  processes (0: here), the next `data.prefetch` batches packed ahead in a
  thread; `state` (from `get_state()`, merged over processes) resumes."""
  shards = data_shards(config, process_count, state)
  stream = source_of(config).examples(config, tokenizer, config.seed)  # errors surface here
  own = range(
    process_index * shards // process_count, (process_index + 1) * shards // process_count
  )
  workers = config.data.workers
  parts = {}
  for shard in own:
    shard_stream = host_stream(stream, shard, shards)
    if workers:
      shard_stream = pipeline.WorkerExamples(
        functools.partial(host_example_stream, config.to_json(), shard, shards),
        max(1, workers // len(own)),
      )
    parts[shard] = PackedBatches(
      shard_stream, rows=config.data.batch_size // shards, spec=row_spec(config, tokenizer)
    )
  batches = ShardedBatches(parts, shards)
  if state is not None:
    state = data_state_of(state)
    if state["shards"] == shards:
      batches.set_state(state)
  depth = config.data.prefetch
  return pipeline.Prefetched(batches, depth) if depth > 0 else batches
