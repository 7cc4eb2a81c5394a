"""What a train step costs and what a chip can do: the numbers behind MFU.

`train_flops_per_row(model, seq_len)` counts one packed row through the train
step (forward + backward) the way MFU is usually counted (PaLM's appendix B,
MaxText): 6 FLOPs per weight per token for the matmuls (forward 2, backward
4; the token embedding is a lookup, not a matmul) plus 12 * layers * L^2 *
heads * head_dim for the attention's scores and values over the whole row
(every row attends over its full length, masked or not, as the kernels do).
Only matrices count (norm scales and biases are elementwise), and only those
applied to every token (PER_ROW lists the rest).
Rematerialisation is not counted: MFU measures the model's FLOPs, not the
hardware's.

XLA's own count (`compiled.cost_analysis()["flops"]`) is no substitute: it
counts the body of a `scan` once, and the layers are scanned. For a model of
one layer the two agree (tests/test_perf.py), which is the check that this
count is the step's.

`CHIPS` holds each accelerator's dense bf16 peak and memory, from the vendors'
published specifications; `chip_of(device)` finds a device's entry by its
`device_kind`.
"""

from __future__ import annotations

import dataclasses

import jax


# Not matmuls per token: the embedding is a lookup, the timestep MLP, the adaLN
# projections and t_projector run once per image (0.3% of the 1.1B step), and
# the reading side (im_embedder, the frozen CLIP tower) only on read images' tokens;
# none of them is counted (MFU is the decoder's and its heads').
PER_ROW = ("embed_tokens", "t_embedder", "adaln_module", "final_layer/adaln", "t_projector",
           "im_embedder", "vision_tower")


def train_flops_per_row(model_config, seq_len: int) -> float:
  """Model FLOPs of one `seq_len`-token row through forward and backward."""
  from monoformer_jax.model.build import abstract_model
  _, abstract, _ = abstract_model(model_config)
  weights = sum(
      x.size for path, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
      if x.ndim >= 2 and not any(
          "/".join(str(k.key) for k in path).startswith(p) for p in PER_ROW))
  m = model_config
  return float(6 * weights * seq_len
               + 12 * m.num_layers * seq_len ** 2 * m.num_heads * m.head_dim)


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16_tflops: float     # dense peak, per chip (per device as JAX sees it)
  hbm_gib: float
  kinds: tuple[str, ...]   # substrings of jax's device_kind


CHIPS = (
    Chip("v4", 275.0, 32.0, ("TPU v4",)),
    Chip("v5e", 197.0, 16.0, ("TPU v5 lite", "TPU v5e")),
    Chip("v5p", 459.0, 95.0, ("TPU v5p", "TPU v5")),
    Chip("v6e", 918.0, 32.0, ("TPU v6 lite", "TPU v6e")),
    Chip("H200", 989.0, 141.0, ("H200",)),
    Chip("H100", 989.0, 80.0, ("H100",)),
    Chip("A100", 312.0, 80.0, ("A100",)),
)


def chip_named(name: str) -> Chip:
  for chip in CHIPS:
    if chip.name == name:
      return chip
  raise KeyError(f"no chip {name!r}; known: {[c.name for c in CHIPS]}")


def chip_of(device) -> Chip | None:
  """The entry for `device` (by its device_kind), None for a CPU or an
  accelerator not in CHIPS (MFU is then not reported)."""
  kind = getattr(device, "device_kind", "")
  for chip in CHIPS:   # the first match: 'TPU v5 lite' before 'TPU v5'
    if any(k in kind for k in chip.kinds):
      return chip
  return None
