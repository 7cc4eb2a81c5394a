"""Data: the row layout (packing.py), the prompt format (prompts.py), pixel
conventions (images.py), and the datasets with the one path to batches
(datasets.py; the embedded default in digits.py)."""

from monoformer_jax.data import prompts
from monoformer_jax.data.datasets import (DATASETS, Dataset, class_by_name, class_names,
                                          dataset_of, draws_pixels, make_batches)
from monoformer_jax.data.images import from_unit_range, to_unit_range
from monoformer_jax.data.packing import (Example, PackedBatches, PromptLayout, PromptRows,
                                         Row, RowSpec, host_stream, image_slots,
                                         pack_examples, prompt_rows, row_spec,
                                         tokens_per_image)

__all__ = ["DATASETS", "Dataset", "Example", "PackedBatches", "PromptLayout", "PromptRows",
           "Row", "RowSpec", "class_by_name", "class_names", "dataset_of", "draws_pixels",
           "from_unit_range", "host_stream", "image_slots", "make_batches", "pack_examples",
           "prompt_rows", "prompts", "row_spec", "to_unit_range", "tokens_per_image"]
