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
from monoformer_jax.errors import ConfigError
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
    state = data_state_shards(state)
    if state["shards"] != self.shards:
      raise ConfigError(
        f"the data state was read in {state['shards']} shards, these "
        f"batches in {self.shards}; set data.shards={state['shards']}"
      )
    missing = [s for s in self.parts if str(s) not in state["next_example"]]
    if missing:
      raise ConfigError(f"the data state has no position for shards {missing}")
    for s, part in self.parts.items():
      part.set_state({"next_example": state["next_example"][str(s)]})


def data_state_shards(state: dict) -> dict:
  """A data state in ShardedBatches's form; a state of one PackedBatches
  (before data shards) is shard 0 of 1."""
  if "shards" in state:
    return state
  return {"shards": 1, "next_example": {"0": int(state["next_example"])}}


def merge_data_states(states: Sequence[dict]) -> dict:
  """One data state from every process's (each holds its own shards)."""
  states = [data_state_shards(s) for s in states]
  merged = {}
  for s in states:
    merged.update(s["next_example"])
  return {"shards": states[0]["shards"], "next_example": merged}
