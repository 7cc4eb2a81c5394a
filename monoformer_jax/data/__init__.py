"""Data: the prompt format (prompts.py), the dataset registry with the one path
to batches (datasets.py) and the dataset sources it registers (sources/),
packing (packing.py: which examples share a row) and many hosts' shares of a
stream (sharded.py). How an example is laid out in a row is
monoformer_jax/layout.py's; pixel conventions are vision/pixels.py's."""

from monoformer_jax.data import prompts
from monoformer_jax.data.datasets import (
  SOURCES,
  class_by_name,
  class_names,
  draws_pixels,
  make_batches,
  source,
  source_of,
)
from monoformer_jax.data.packing import PackedBatches, pack_examples
from monoformer_jax.data.sharded import host_stream

__all__ = [
  "SOURCES",
  "PackedBatches",
  "class_by_name",
  "class_names",
  "draws_pixels",
  "host_stream",
  "make_batches",
  "pack_examples",
  "prompts",
  "source",
  "source_of",
]
