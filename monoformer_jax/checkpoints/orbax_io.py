"""Orbax checkpoints: the project's own on-disk format, for training and for models.

A checkpoint folder is an Orbax CheckpointManager directory of numbered steps.
Each step holds up to three items:
    state   a pytree: a training state (params, opt_state, ema, step), or a
            model (`params`, usually `ema`); restored straight into the
            shardings of the CURRENT mesh (which may differ from the saving one)
    data    the data iterator's state (JSON, per process; training only), so a
            resumed run reads exactly the rows an uninterrupted one would
    config  the run's config (JSON), which says what model the weights are

`TrainCheckpointer` writes training runs (asynchronously, keeping the last N);
`save_model` writes a model (e.g. from `python -m monoformer_jax.convert`);
`load_model` / `load_params` read the weights of either. Any of these paths
names a checkpoint: a training workdir (its latest step), its `checkpoints/`
folder, one step folder `.../checkpoints/800`, or a `save_model` folder.
"""

from __future__ import annotations

import json
import logging as std_logging
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from monoformer_jax.model.build import abstract_model

WEIGHTS = ("ema", "raw")
# Model fields that say how to compute, not what the weights are.
_COMPUTE_FIELDS = ("dtype", "attention_impl", "remat")


def quiet_orbax_logs():
  """Keeps Orbax's warnings in the absl log and drops its INFO narration of
  every save and restore (the entry points call this once)."""
  logging.get_absl_logger().addFilter(
      lambda r: "orbax" not in r.pathname or r.levelno >= std_logging.WARNING)


def _manager(directory: str, *, create: bool = False, keep: int | None = None,
             asynchronous: bool = False) -> ocp.CheckpointManager:
  """The one CheckpointManager set-up: every item a checkpoint may hold is
  named (so Orbax does not warn about the ones a reader skips); readers pass
  create=False and never make folders."""
  directory = os.fspath(directory)
  return ocp.CheckpointManager(
      directory if "://" in directory else os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=asynchronous),
      item_handlers=dict(state=ocp.PyTreeCheckpointHandler(),
                         data=ocp.JsonCheckpointHandler(),
                         config=ocp.JsonCheckpointHandler()))


def _target(abstract, shardings):
  """Restore arguments that put each array of `abstract` into its sharding."""
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  return target, ocp.checkpoint_utils.construct_restore_args(target)


def check_params(stored, wanted, where: str, fix: str):
  """Raises, naming every differing parameter, when the parameter trees
  `stored` (checkpoint metadata) and `wanted` (this config's) disagree."""
  shapes = lambda tree: {jax.tree_util.keystr(p): tuple(v.shape) for p, v in
                         jax.tree_util.tree_flatten_with_path(tree)[0]}
  stored, wanted = shapes(stored), shapes(wanted)
  problems = [f"{k}: {stored[k]} in the checkpoint, {wanted[k]} for this config"
              for k in wanted if k in stored and stored[k] != wanted[k]]
  problems += [f"{k}: missing from the checkpoint" for k in wanted if k not in stored]
  problems += [f"{k}: in the checkpoint, not in this config's model"
               for k in stored if k not in wanted]
  if problems:
    shown = "\n  ".join(problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise ValueError(f"checkpoint {where} does not match this config's model:\n  "
                     f"{shown}{more}\n{fix}")


# ------------------------------------------------------------------ training

class TrainCheckpointer:
  """A training run's checkpoints: state, data position and config per step."""

  def __init__(self, directory: str, *, keep: int, save_every: int):
    self.directory = os.fspath(directory)
    self.save_every = save_every
    self.manager = _manager(self.directory, create=True, keep=keep, asynchronous=True)

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
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave({data_key: data_state}),
        config=ocp.args.JsonSave(json.loads(config.to_json()))), force=True)

  def restore(self, step: int, abstract_state, shardings):
    """(state in `shardings`, this process's data state) of checkpoint `step`."""
    # Another model's checkpoint fails here, naming every differing parameter
    # (the optimizer state and EMA mirror the parameters).
    check_params(self.manager.item_metadata(step)["state"]["params"],
                 abstract_state["params"], f"{self.directory}/{step}",
                 "Resume with the config it was trained with (its `config` item "
                 "holds it) or point --workdir at a fresh directory.")
    target, restore_args = _target(abstract_state, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args),
        data=ocp.args.JsonRestore()))
    data = restored["data"].get(f"process_{jax.process_index()}")
    if data is None:
      raise ValueError(f"checkpoint {self.directory}/{step} has no data state for "
                       f"process {jax.process_index()}; was it saved with another "
                       "number of hosts?")
    return restored["state"], data

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


# -------------------------------------------------------------------- models

def model_differences(saved, config) -> list[str]:
  """`model.x=A there, B here` for each weight-shaping field that differs."""
  return [f"model.{k}={saved.model.get(k)!r} there, {v!r} here"
          for k, v in config.model.items()
          if k not in _COMPUTE_FIELDS and saved.model.get(k) != v]


def resolve(path: str, step: int | None = None) -> tuple[str, int]:
  """(checkpoint manager directory, step) that `path` names; latest by default."""
  path = os.fspath(path).rstrip("/")
  if not os.path.isdir(path) and "://" not in path:
    raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
    if step is not None and step != int(name):
      raise ValueError(f"{path} is the folder of step {name}, not of step {step}")
    return os.path.dirname(path), int(name)
  steps = sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []
  if not steps:
    raise FileNotFoundError(
        f"no checkpoint in {path!r}: expected a training workdir, its checkpoints/ "
        "folder, a step folder like checkpoints/800, or the output of "
        "`python -m monoformer_jax.convert`")
  if step is None:
    return path, steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"no step {step} in {path}; it holds steps {steps}")
  return path, step


def _config_at(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(restored["config"])


def load_config(path: str, step: int | None = None):
  """(ConfigDict saved with the checkpoint `path` names, its step)."""
  directory, step = resolve(path, step)
  return _config_at(_manager(directory), step), step


def stored_weights(path: str) -> list[str]:
  """Which weights ('params', 'ema') the checkpoint `path` names holds."""
  directory, step = resolve(path)
  return sorted(_manager(directory).item_metadata(step)["state"])


def load_params(path: str, *, weights: str = "ema", config=None, shardings=None,
                step: int | None = None):
  """(params pure dict, config, step) from the checkpoint `path` names.

  `weights`: 'ema' (the default for sampling, as the reference) or 'raw'.
  `config` defaults to the one saved with the checkpoint; `shardings` (a
  pytree of NamedShardings like the params, e.g. from `param_shardings`)
  restores each array straight into its shards, else onto the default device.
  Only the chosen weights are read, never the optimizer state.
  """
  _, params, config, step = _restore(path, weights, config, shardings, step)
  return params, config, step


def load_model(path: str, *, weights: str = "ema", config=None, shardings=None,
               step: int | None = None):
  """(MonoFormer with the checkpoint's weights, config): see `load_params`."""
  graphdef, params, config, _ = _restore(path, weights, config, shardings, step)
  return nnx.merge(graphdef, params), config


def _restore(path, weights, config, shardings, step):
  """load_params' work, also returning the model's graphdef."""
  if weights not in WEIGHTS:
    raise ValueError(f"weights={weights!r}: choose one of {WEIGHTS}")
  directory, step = resolve(path, step)
  manager = _manager(directory)
  saved_config = _config_at(manager, step)
  config = saved_config if config is None else config
  stored = manager.item_metadata(step)["state"]
  key = "ema" if weights == "ema" else "params"
  if key not in stored:
    raise ValueError(f"checkpoint {directory}/{step} has no {key!r} weights (it holds "
                     f"{sorted(stored)}); ask for weights='raw' (--weights=raw)")
  graphdef, abstract, _ = abstract_model(config.model)
  differ = model_differences(saved_config, config)
  fix = ("Set " + "; ".join(differ) + " to the checkpoint's values" if differ else
         "Pass the config the checkpoint was made with (its `config` item holds it)")
  check_params(stored[key], abstract, f"{directory}/{step}",
               fix + ", or convert the weights for this model size.")
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  target, restore_args = _target({key: abstract}, {key: shardings})
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True)))
  return graphdef, restored["state"][key], config, step


def save_model(directory: str, config, params, *, ema=None, step: int = 0):
  """Writes a model checkpoint (`params`, optionally `ema`, and the config)
  that `load_model`, sampling, evaluation and `train.init_from` read."""
  state = dict(params=params) if ema is None else dict(params=params, ema=ema)
  with _manager(os.fspath(directory), create=True) as manager:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        config=ocp.args.JsonSave(json.loads(config.to_json()))), force=True)
    manager.wait_until_finished()
