"""What a chip can do: the other half of MFU (the model's FLOPs are
model/build.py's `train_flops_per_row`).

`CHIPS` holds each accelerator's dense bf16 peak and memory, from the vendors'
published specifications; `chip_of(device)` finds a device's entry by its
`device_kind`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16_tflops: float  # dense peak, per chip (per device as JAX sees it)
  hbm_gib: float
  kinds: tuple[str, ...]  # substrings of jax's device_kind


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
  for chip in CHIPS:  # the first match: 'TPU v5 lite' before 'TPU v5'
    if any(k in kind for k in chip.kinds):
      return chip
  return None
