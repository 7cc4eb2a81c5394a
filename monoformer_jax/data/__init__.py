"""Data: the row layout (packing.py), the prompt format (prompts.py), pixel
conventions (images.py), the dataset registry with the one path to batches
(datasets.py) and the dataset sources it registers (sources/)."""

from monoformer_jax.data import prompts
from monoformer_jax.data.datasets import (SOURCES, class_by_name, class_names, draws_pixels,
                                          make_batches, source, source_of)
from monoformer_jax.data.images import from_unit_range, to_unit_range
from monoformer_jax.data.packing import (Example, PackedBatches, PromptLayout, PromptRows,
                                         Row, RowSpec, host_stream, image_slots,
                                         pack_examples, prompt_rows, row_spec,
                                         tokens_per_image)

__all__ = ["SOURCES", "Example", "PackedBatches", "PromptLayout", "PromptRows", "Row",
           "RowSpec", "class_by_name", "class_names", "draws_pixels", "from_unit_range",
           "host_stream", "image_slots", "make_batches", "pack_examples", "prompt_rows",
           "prompts", "row_spec", "source", "source_of", "to_unit_range", "tokens_per_image"]
