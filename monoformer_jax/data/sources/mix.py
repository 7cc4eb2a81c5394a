"""Mix: several prepared datasets interleaved by weight.

`data.mix` {name: weight} names the sources and their shares, `data.dirs`
{name: folder} their prepared folders: e.g. {'text_to_image': 9, 'chat': 1}
(configs/t2i_chat.py). Each source's stream is seeded from the run's seed;
pipeline.mix interleaves them in exact shares per block. Nothing is prepared
for a mix itself: prepare each of its datasets.
"""

from __future__ import annotations

import numpy as np

from monoformer_jax.config.fields import real
from monoformer_jax.data import builders, datasets, pipeline
from monoformer_jax.data.sources import DataSource, PrepareArgs, Prepared
from monoformer_jax.errors import ConfigError


class Mix(DataSource):
  name = "mix"
  mixable = False
  needs_input = False

  def prepare(self, args: PrepareArgs, output_dir: str) -> Prepared:
    raise ConfigError(
      "a mix is not prepared itself: prepare each dataset it mixes, e.g. "
      "`python -m monoformer_jax.data.prepare text_to_image ...`"
    )

  def check(self, config):
    d = config.data
    weights = dict(d.mix)
    if not weights:
      raise ConfigError("data.name='mix' needs data.mix, e.g. {'text_to_image': 9, 'chat': 1}")
    mixable = [n for n in datasets.SOURCES if datasets.source(n).mixable]
    for name, weight in weights.items():
      if name not in mixable:
        raise ConfigError(f"data.mix names {name!r}; mix any of {mixable}")
      real(f"data.mix.{name}", weight, low=0)  # as the schema checks it
      builders.check_prepared(f"data.dirs.{name}", dict(d.dirs).get(name, ""), name)
    if not sum(weights.values()) > 0:
      raise ConfigError(f"data.mix={weights}: at least one weight must be > 0")

  def examples(self, config, tokenizer, seed: int, directory: str | None = None):
    self.check(config)
    weights = dict(config.data.mix)
    dirs = dict(config.data.dirs)
    seeds = np.random.SeedSequence(seed).generate_state(len(weights) + 1)
    streams = [
      datasets.source(name).examples(config, tokenizer, int(s), dirs.get(name) or None)
      for name, s in zip(weights, seeds)
    ]
    return pipeline.mix(streams, list(weights.values()), int(seeds[-1]))


SOURCE = Mix()
