"""Data: packing examples into rows (the row layout) and the datasets."""

from monoformer_jax.data.digits import (class_prompt, digits_example_stream,
                                        image_prompt_example, make_digits_batches,
                                        to_unit_range)
from monoformer_jax.data.packing import (Example, PackedBatches, RowSpec, host_stream,
                                         pack_examples, prompt_rows, row_spec)

__all__ = ["Example", "PackedBatches", "RowSpec", "class_prompt", "digits_example_stream",
           "host_stream", "image_prompt_example", "make_digits_batches", "pack_examples",
           "prompt_rows", "row_spec", "to_unit_range"]
