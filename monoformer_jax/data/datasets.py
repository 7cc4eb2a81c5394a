"""The datasets the project trains on, and the one path from a config to batches.

A dataset is its name (`config.data.name`), its class names, what its images
are (pixels in [-1, 1], or SD-VAE latents) and its example stream: a function
`(config, tokenizer, seed) -> example_at(i)` giving example i of an infinite,
seeded stream. Everything else (the prompt format, packing, per-host shares,
resuming) is shared, so the rest of the package asks this module and never
names a dataset.

    digits          the embedded default (prepared on first use into data.dir,
                    or ~/.cache/monoformer_jax; nothing is downloaded)
    imagenet        class-conditional latents, `data.dir` from
                    `python -m monoformer_jax.data.prepare imagenet`
    text_to_image   prompted latents (JourneyDB-style), likewise
    chat, text      conversations (loss on the answers) and plain text
    llava           conversations about READ images (LLaVA's instruction data,
                    data/llava.py), the images decoded at read time
    mix             several of those by weight: `data.mix` {name: weight},
                    `data.dirs` {name: folder}

All but the digits' sentences are read from TFDS array_record through the
same Grain pipeline (data/pipeline.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable

import numpy as np
from absl import logging

from monoformer_jax.data import builders, digits, llava, pipeline
from monoformer_jax.data.packing import PackedBatches
from monoformer_jax.data.sharded import ShardedBatches, data_state_shards, host_stream
from monoformer_jax.errors import ConfigError
from monoformer_jax.layout import Example, row_spec


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  classes: Callable[[], tuple[str, ...]]  # the names class-conditional prompts fill in
  class_noun: str                # "digit": what one class is, for messages
  pixels: bool                   # images are pixels in [-1, 1]; else SD-VAE latents
  example_stream: Callable[..., Callable[[int], Example]]
  # Training steps at the dataset's default config before its samples are
  # recognisable (measured; 0: not known). Shorter runs are warned about.
  steps_for_samples: int = 0

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.classes()


# configs/digits.py, the classifier on its 200 end-of-run samples: 10% (chance)
# after 200 steps, 86.5% after 400, 100% after 800 (the default; README).
STEPS_FOR_DIGITS = 400


@functools.lru_cache(maxsize=1)
def _imagenet_names() -> tuple[str, ...]:
  from monoformer_jax.data.encode import imagenet_classes
  return tuple(name for _, name in imagenet_classes())


def _records(config, kind: str, directory: str | None = None):
  """The records of data.split of the prepared `kind` at `directory` (data.dir)."""
  directory = directory or config.data.get("dir", "")
  _prepared("data.dir", directory, kind)
  return builders.data_source(directory, config.data.get("split", "train"), kind=kind)


def _check_latents(records, config, kind: str):
  m = config.model
  want = (m.image_size, m.image_size, m.in_channels)
  got = tuple(np.asarray(records[0]["mean"]).shape)
  if got != want:
    raise ConfigError(f"the prepared {kind} latents are {got} but the model reads "
                      f"(model.image_size, model.image_size, model.in_channels)={want}; "
                      "prepare with the matching --image_size, or change the model")


def _latent_stream(kind: str):
  def stream(config, tokenizer, seed, directory=None):
    records = _records(config, kind, directory)
    _check_latents(records, config, kind)
    d = config.data
    options = dict(drop_prob=float(d.cfg_drop_prob), sample=bool(d.get("latent_sample", True)),
                   flip=bool(d.get("random_flip", True)))
    if kind == "imagenet":
      to_example = pipeline.imagenet_example(_imagenet_names(), tokenizer, **options)
    else:
      to_example = pipeline.text_to_image_example(tokenizer, **options)
    return pipeline.record_stream(records, to_example, seed)
  return stream


def _chat_stream(config, tokenizer, seed, directory=None):
  to_example = pipeline.chat_example_of(
      tokenizer, template=config.data.get("chat_template", "human_assistant"),
      train_on_source=bool(config.data.get("train_on_source", False)))
  return pipeline.record_stream(_records(config, "chat", directory), to_example, seed)


def _llava_stream(config, tokenizer, seed, directory=None):
  to_example = llava.LlavaExamples(config, tokenizer)   # the config's errors first
  directory = directory or config.data.get("dir", "")
  return llava.LlavaStream(_records(config, "llava", directory), to_example, seed,
                           where=f"the prepared llava dataset {directory}")


def _text_stream(config, tokenizer, seed, directory=None):
  return pipeline.record_stream(_records(config, "text", directory),
                                pipeline.text_example_of(tokenizer), seed)


def _mix_stream(config, tokenizer, seed, directory=None):
  check_data(config)
  weights = dict(config.data.mix)
  dirs = dict(config.data.get("dirs", {}))
  seeds = np.random.SeedSequence(seed).generate_state(len(weights) + 1)
  streams = [DATASETS[name].example_stream(config, tokenizer, int(s), dirs.get(name) or None)
             for name, s in zip(weights, seeds)]
  return pipeline.mix(streams, list(weights.values()), int(seeds[-1]))


DATASETS = {d.name: d for d in (
    Dataset("digits", lambda: digits.CLASS_NAMES, "digit", pixels=True,
            example_stream=digits.digits_example_stream, steps_for_samples=STEPS_FOR_DIGITS),
    Dataset("imagenet", _imagenet_names, "ImageNet class", pixels=False,
            example_stream=_latent_stream("imagenet")),
    Dataset("text_to_image", tuple, "", pixels=False,
            example_stream=_latent_stream("text_to_image")),
    Dataset("chat", tuple, "", pixels=False, example_stream=_chat_stream),
    Dataset("text", tuple, "", pixels=False, example_stream=_text_stream),
    Dataset("llava", tuple, "", pixels=False, example_stream=_llava_stream),
    Dataset("mix", tuple, "", pixels=False, example_stream=_mix_stream),
)}


def _prepared(field: str, directory: str, kind: str):
  if not directory:
    raise ConfigError(f"{field} is empty: point it at the {kind} dataset prepared by "
                      f"`python -m monoformer_jax.data.prepare {kind}`")
  if "://" not in directory and not os.path.exists(os.path.join(directory,
                                                                "dataset_info.json")):
    raise ConfigError(f"{field}={directory!r} is not a prepared dataset (no "
                      f"dataset_info.json): prepare it with `python -m "
                      f"monoformer_jax.data.prepare {kind} --output_dir=OUT` and pass "
                      f"OUT/monoformer_{kind}/{builders.VERSION}")


def check_data(config):
  """The data fields that name files, before anything is read: the prepared
  folder of each dataset and the mixing weights."""
  d = config.data
  dataset = dataset_of(config)
  if dataset.name == "digits":
    return
  if dataset.name != "mix":
    _prepared("data.dir", d.get("dir", ""), dataset.name)
    return
  weights = dict(d.get("mix", {}))
  if not weights:
    raise ConfigError("data.name='mix' needs data.mix, e.g. {'text_to_image': 9, 'chat': 1}")
  for name, weight in weights.items():
    if name not in DATASETS or name in ("mix", "digits"):
      raise ConfigError(f"data.mix names {name!r}; mix any of "
                        f"{[n for n in DATASETS if n not in ('mix', 'digits')]}")
    if not isinstance(weight, (int, float)) or not weight >= 0 or weight == float("inf"):
      raise ConfigError(f"data.mix.{name}={weight!r}: must be a finite weight >= 0")
    _prepared(f"data.dirs.{name}", dict(d.get("dirs", {})).get(name, ""), name)
  if not sum(weights.values()) > 0:
    raise ConfigError(f"data.mix={weights}: at least one weight must be > 0")


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


def host_example_stream(config_json: str, process_index: int, process_count: int):
  """This host's example_at of a config given as JSON (what worker processes build)."""
  import ml_collections
  from monoformer_jax.text.tokenizer import tokenizer_of
  config = ml_collections.ConfigDict(json.loads(config_json))
  return host_stream(dataset_of(config).example_stream(config, tokenizer_of(config),
                                                       config.seed),
                     process_index, process_count)


def data_shards(config, process_count: int, state: dict | None = None) -> int:
  """How many shards the stream and the global batch are cut into:
  data.shards, or when it is 0 the resumed state's count (so a run resumes
  exactly on another number of processes), else one per process."""
  shards = int(config.data.get("shards", 0))
  saved = data_state_shards(state)["shards"] if state is not None else None
  if shards == 0:
    shards = saved if saved and saved % process_count == 0 else process_count
  if saved and saved != shards:
    logging.warning("the data state was read in %d shards, these %d processes read %d "
                    "(data.shards=%d); the data order restarts", saved, process_count,
                    shards, int(config.data.get("shards", 0)))
  if shards % process_count:
    raise ConfigError(f"data.shards={shards} is not divisible by the {process_count} "
                      "processes (each owns whole shards); use a multiple of "
                      f"{process_count}, or 0 for one shard per process")
  if config.data.batch_size % shards:
    raise ConfigError(f"data.batch_size={config.data.batch_size} (global rows) is not "
                      f"divisible by {shards} data shards (data.shards, or one per "
                      "process); change either")
  return shards


def make_batches(config, tokenizer, *, process_index: int = 0, process_count: int = 1,
                 state: dict | None = None):
  """This host's batches: its data shards' blocks of rows (packing.ShardedBatches;
  `data.batch_size // shards` rows each) packed from the config's dataset
  stream seeded by `config.seed`, the examples made by `data.workers`
  processes (0: here), the next `data.prefetch` batches packed ahead in a
  thread; `state` (from `get_state()`, merged over processes) resumes."""
  dataset = dataset_of(config)
  shards = data_shards(config, process_count, state)
  stream = dataset.example_stream(config, tokenizer, config.seed)  # errors surface here
  own = range(process_index * shards // process_count,
              (process_index + 1) * shards // process_count)
  workers = int(config.data.get("workers", 0))
  parts = {}
  for shard in own:
    shard_stream = host_stream(stream, shard, shards)
    if workers:
      shard_stream = pipeline.WorkerExamples(functools.partial(
          host_example_stream, config.to_json(), shard, shards),
          max(1, workers // len(own)))
    parts[shard] = PackedBatches(shard_stream, rows=config.data.batch_size // shards,
                                 spec=row_spec(config, tokenizer))
  batches = ShardedBatches(parts, shards)
  if state is not None:
    state = data_state_shards(state)
    if state["shards"] == shards:
      batches.set_state(state)
  depth = int(config.data.get("prefetch", 2))
  return pipeline.Prefetched(batches, depth) if depth > 0 else batches
