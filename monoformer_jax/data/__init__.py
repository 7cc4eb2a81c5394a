"""Data: the prompt format (prompts.py), pixel conventions (images.py), the
datasets with the one path to batches (datasets.py; the embedded default in
digits.py), packing (packing.py: which examples share a row) and many hosts'
shares of a stream (sharded.py). How an example is laid out in a row is
monoformer_jax/layout.py's."""

from monoformer_jax.data import prompts
from monoformer_jax.data.datasets import (DATASETS, Dataset, class_by_name, class_names,
                                          dataset_of, draws_pixels, make_batches)
from monoformer_jax.data.images import from_unit_range, to_unit_range
from monoformer_jax.data.packing import PackedBatches, pack_examples
from monoformer_jax.data.sharded import host_stream

__all__ = ["DATASETS", "Dataset", "PackedBatches", "class_by_name", "class_names",
           "dataset_of", "draws_pixels", "from_unit_range", "host_stream", "make_batches",
           "pack_examples", "prompts", "to_unit_range"]
