"""Data: packing examples into rows (the row layout) and the datasets."""

from monoformer_jax.data.packing import Example, PackedBatches, RowSpec, pack_examples

__all__ = ["Example", "PackedBatches", "RowSpec", "pack_examples"]
