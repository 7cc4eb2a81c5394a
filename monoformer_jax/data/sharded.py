"""Many hosts reading one stream: each host's share of the examples, and the
data state of a checkpoint across hosts.

The global stream is cut into `data.shards` shards, shard s taking every
S-th example from s (`host_stream`). A process packs the shards it owns into
its own block of rows of the global batch (`ShardedBatches`), so a step's
global batch is the same on any process count that divides S, and every
shard's position (its next example) is the whole data state a checkpoint
keeps (`merge_data_states` joins every process's part).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from monoformer_jax.data.packing import PackedBatches
from monoformer_jax.errors import ConfigError, FileFormatError
from monoformer_jax.layout import Example


def host_stream(
  example_at: Callable[[int], Example], process_index: int, process_count: int
) -> Callable[[int], Example]:
  """Host `process_index`'s share of a global stream: its example i is global
  example i * process_count + process_index, so hosts never share examples
  and together cover the stream."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
  if process_count == 1:
    return example_at
  return lambda i: example_at(i * process_count + process_index)


class ShardedBatches(Iterator[dict]):
  """This process's rows of the global batch: one PackedBatches per data shard
  it owns, their rows side by side.

  The stream is cut into `shards` shards (shard s: `host_stream(stream, s,
  shards)`) and the global batch into as many blocks of rows, block s packed
  from shard s alone. A process owns a run of whole shards, so the global
  batch of a step is the same however many processes read it (2 processes
  of 1 shard each, or 1 process of 2 shards), and a checkpoint's data state
  (every shard's next example) resumes exactly on any process count that
  divides `shards`.
  """

  def __init__(self, parts: dict[int, PackedBatches], shards: int):
    self.parts, self.shards = parts, shards

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    blocks = [next(part) for part in self.parts.values()]
    if len(blocks) == 1:
      return blocks[0]
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}

  def get_state(self) -> dict:
    """{"shards": S, "next_example": {shard: index}} for the shards owned here;
    the loop merges every process's into one (`merge_data_states`)."""
    return {
      "shards": self.shards,
      "next_example": {str(s): p.next_example for s, p in self.parts.items()},
    }

  def set_state(self, state: dict):
    state = data_state_of(state)
    if state["shards"] != self.shards:
      raise ConfigError(
        f"the data state was read in {state['shards']} shards, these "
        f"batches in {self.shards}; set data.shards={state['shards']}"
      )
    for s, part in self.parts.items():
      part.set_state({"next_example": state["next_example"][str(s)]})


def data_state_of(saved) -> dict:
  """The data state `saved` (a checkpoint's `data` item, in any form a version
  of this project wrote) as {"shards": S, "next_example": {"0": i0, ...,
  "S-1": i}}, checked: anything else raises FileFormatError naming what is
  wrong, before a batch is read at a wrong or negative position. Older forms:
  {"next_example": i} (one stream, before data shards) is shard 0 of 1;
  {"process_p": {"next_example": i}, ...} (per process) is shard p of P."""

  def index(value, what: str) -> int:
    if type(value) is not int or value < 0:
      raise FileFormatError(
        f"the data state's {what} is {value!r}, not an example index (an integer >= 0)"
      )
    return value

  if not isinstance(saved, dict):
    raise FileFormatError(f"the data state is {type(saved).__name__} {saved!r:.80}, not a dict")
  if "shards" not in saved and set(saved) == {"next_example"}:
    return {"shards": 1, "next_example": {"0": index(saved["next_example"], "next_example")}}
  if saved and "shards" not in saved and all(k.startswith("process_") for k in saved):
    positions = {k.removeprefix("process_"): v for k, v in saved.items()}
    if sorted(positions) != sorted(str(p) for p in range(len(positions))) or not all(
      isinstance(v, dict) and "next_example" in v for v in positions.values()
    ):
      raise FileFormatError(
        f"the data state {sorted(saved)} is not a position for processes 0..{len(saved) - 1}"
      )
    return {
      "shards": len(positions),
      "next_example": {p: index(v["next_example"], f"process_{p}") for p, v in positions.items()},
    }
  if sorted(saved) != ["next_example", "shards"]:
    raise FileFormatError(
      f"the data state holds the keys {sorted(saved)}, not 'shards' and 'next_example'"
    )
  shards, positions = saved["shards"], saved["next_example"]
  if type(shards) is not int or shards < 1:
    raise FileFormatError(f"the data state's shards is {shards!r}, not an integer >= 1")
  wanted = [str(s) for s in range(shards)]
  if not isinstance(positions, dict) or set(positions) != set(wanted):
    raise FileFormatError(
      f"the data state's next_example is {positions!r:.80}, not one position for each of "
      f"its {shards} shards (keys {wanted[0]}..{wanted[-1]})"
    )
  return {"shards": shards, "next_example": {s: index(positions[s], f"shard {s}") for s in wanted}}


def merge_data_states(states: Sequence[dict]) -> dict:
  """One data state from every process's `get_state()` (each holds its own
  shards), checked as a resumed run will read it."""
  merged = {}
  for s in states:
    merged.update(s["next_example"])
  return data_state_of({"shards": states[0]["shards"], "next_example": merged})
