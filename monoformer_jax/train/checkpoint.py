"""Orbax checkpoints of a training run: state, data position and config.

Each step directory holds three items:
    state   the train state pytree (params, opt_state, ema, step), restored
            straight into the shardings of the CURRENT mesh (which may differ
            from the mesh that saved it)
    data    the data iterator's state (JSON, per process), so a resumed run
            reads exactly the rows an uninterrupted one would
    config  the run's config (JSON), for the sampling/eval entry points
Saves are asynchronous; `keep` bounds how many are kept.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, save_every: int):
    self.directory = os.fspath(directory)
    self.save_every = save_every
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True),
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           data=ocp.JsonCheckpointHandler(),
                           config=ocp.JsonCheckpointHandler()))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config, *, force: bool = False) -> bool:
    """Saves at multiples of `save_every` (or when forced); returns whether it did."""
    if not force and step % self.save_every:
      return False
    if step in self.manager.all_steps():
      return False
    data_key = f"process_{jax.process_index()}"
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({data_key: data_state}),
        config=ocp.args.JsonSave(json.loads(config.to_json()))), force=True)

  def restore(self, step: int, abstract_state, shardings):
    """(state in `shardings`, this process's data state) of checkpoint `step`."""
    self._check_shapes(step, abstract_state)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    data = restored["data"].get(f"process_{jax.process_index()}")
    if data is None:
      raise ValueError(f"checkpoint {self.directory}/{step} has no data state for "
                       f"process {jax.process_index()}; was it saved with another "
                       "number of hosts?")
    return restored["state"], data

  def _check_shapes(self, step: int, abstract_state):
    """Raises, naming every differing parameter, if the checkpoint is another
    model (the optimizer state and EMA mirror the parameters)."""
    shapes = lambda tree: {jax.tree_util.keystr(p): tuple(v.shape) for p, v in
                           jax.tree_util.tree_flatten_with_path(tree)[0]}
    stored = shapes(self.manager.item_metadata(step)["state"]["params"])
    wanted = shapes(abstract_state["params"])
    problems = [f"{k}: {stored[k]} in the checkpoint, {wanted[k]} for this config"
                for k in wanted if k in stored and stored[k] != wanted[k]]
    problems += [f"{k}: missing from the checkpoint" for k in wanted if k not in stored]
    problems += [f"{k}: in the checkpoint, not in this config's model"
                 for k in stored if k not in wanted]
    if problems:
      shown = "\n  ".join(problems[:10])
      more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match this config's model:\n  "
          f"{shown}{more}\nResume with the config it was trained with (its `config` "
          "item holds it) or point --workdir at a fresh directory.")

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def load_config(directory: str, step: int | None = None):
  """The ConfigDict saved with a run's checkpoint (latest step by default)."""
  import ml_collections
  manager = ocp.CheckpointManager(os.fspath(directory), item_names=("config",),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {directory}")
  cfg = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(cfg["config"]), step
