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
`load_model` / `load_params` read the weights of either; `fingerprint` tells
one save of a step from another (what a sample folder is bound to). Any of
these paths names a checkpoint: a training workdir (its latest step), its
`checkpoints/` folder, one step folder `.../checkpoints/800`, or a
`save_model` folder.

Nothing is lost quietly: a step counts once Orbax has committed it (logged
then; a save never committed, killed or failed, is removed and never named),
a save that cannot fit on the disk or fails stops the run naming the path,
the bytes and the committed steps (which stay whole), a resumed run falls
back from an unreadable step (or one whose data state is not one) to the
newest readable one (moving the broken one aside, not deleting it), a step
folder holding another step's state is refused, and weights are loaded only
into the model they were saved for, finite.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging as std_logging
import os
import re
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from monoformer_jax.config import complete
from monoformer_jax.errors import CheckpointError, MissingPathError, PathError, UserError
from monoformer_jax.model.build import abstract_model, param_shardings
from monoformer_jax.parallel import sharding
from monoformer_jax.paths import files_under, free_bytes, is_local, move_folder, new_folder_beside

WEIGHTS = ("ema", "raw")
# Model fields that say how to compute, not what the weights are.
_COMPUTE_FIELDS = ("dtype", "attention_impl", "remat", "scan_unroll")


def _manager(
  directory: str, *, create: bool = False, keep: int | None = None, asynchronous: bool = False
) -> ocp.CheckpointManager:
  """The one CheckpointManager set-up: every item a checkpoint may hold is
  named (so Orbax does not warn about the ones a reader skips); readers pass
  create=False and never make folders, writers remove what a save that never
  committed left (before their first save)."""
  directory = os.fspath(directory)
  return ocp.CheckpointManager(
    directory if "://" in directory else os.path.abspath(directory),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=create,
      cleanup_tmp_directories=create,
      enable_async_checkpointing=asynchronous,
    ),
    item_handlers=dict(
      state=ocp.PyTreeCheckpointHandler(),
      data=ocp.JsonCheckpointHandler(),
      config=ocp.JsonCheckpointHandler(),
    ),
  )


def _target(abstract, shardings):
  """Restore arguments that put each array of `abstract` into its sharding."""
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  return target, ocp.checkpoint_utils.construct_restore_args(target)


def check_params(stored, wanted, where: str, fix: str):
  """Raises, naming every differing parameter, when the parameter trees
  `stored` (checkpoint metadata) and `wanted` (this config's) disagree."""
  shapes = lambda tree: {
    jax.tree_util.keystr(p): tuple(v.shape)
    for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  stored, wanted = shapes(stored), shapes(wanted)
  problems = [
    f"{k}: {stored[k]} in the checkpoint, {wanted[k]} for this config"
    for k in wanted
    if k in stored and stored[k] != wanted[k]
  ]
  problems += [f"{k}: missing from the checkpoint" for k in wanted if k not in stored]
  problems += [
    f"{k}: in the checkpoint, not in this config's model" for k in stored if k not in wanted
  ]
  if problems:
    shown = "\n  ".join(problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise CheckpointError(
      f"checkpoint {where} does not match this config's model:\n  {shown}{more}\n{fix}"
    )


def check_model_fields(saved, config, where: str, *, allowed: bool, override: str):
  """Raises when the model settings saved with a checkpoint and `config`'s
  differ in anything but how to compute (rope_theta, eps, conditioning, ...:
  the same shapes, other numbers), unless `allowed`; `override` says how."""
  differ = model_differences(saved, config)
  if not differ:
    return
  if allowed:
    logging.warning(
      "%s was made with other model settings (%s); using this config's, as asked",
      where,
      "; ".join(differ),
    )
    return
  raise CheckpointError(
    f"{where} was made with other model settings: {'; '.join(differ)}. They change "
    "what the weights compute. Use the checkpoint's values (its `config` item holds "
    f"them), or {override} to go on with this config's"
  )


def _check_recorded_step(directory: str, step: int, recorded):
  """Refuses step folder `step` of `directory` whose state records another
  step (`recorded`): a folder copied or renamed, e.g. a restored backup."""
  recorded = int(jax.device_get(recorded))
  if recorded != step:
    raise CheckpointError(
      f"checkpoint folder {directory}/{step} holds the state of step {recorded}, not of "
      f"step {step} (copied or renamed?); rename it back to {directory}/{recorded} or move "
      f"it out of {directory}, then run again"
    )


def _first_line(error: BaseException) -> str:
  """The gist of an error: its type and first line (TensorStore's spec dump cut off)."""
  lines = str(error).strip().splitlines()
  first = (lines[0] if lines else "").split(" See full TensorStore details")[0]
  return f"{type(error).__name__}: {first}"[:300]


def _save_failure(error: BaseException) -> str:
  """Why a save failed: the system's reason where TensorStore gives one (at
  the end of a message that a first line would cut off), else the gist."""
  code = re.search(r"os_error_code='?(\d+)", str(error))
  if code is None:
    return _first_line(error)
  return f"{os.strerror(int(code.group(1)))} [errno {code.group(1)}] writing its files"


# What a failed Orbax restore leaves behind: its TensorStore reads keep failing
# in background threads after the restore has raised, each printing a
# traceback (~3000 lines for a tiny model). Once we have reported the failure
# in one line, these are noise, silenced (only these) from the first restore on.
_RESTORE_NOISE = ("Event loop is closed", "Encountered error while reading array index")
_silenced = False


def _silence_failed_restore_noise():
  global _silenced
  if _silenced:
    return
  _silenced = True
  noise = lambda e: e is not None and any(n in str(e) for n in _RESTORE_NOISE)
  except_hook, unraisable_hook = sys.excepthook, sys.unraisablehook
  sys.excepthook = lambda t, e, tb: None if noise(e) else except_hook(t, e, tb)
  sys.unraisablehook = lambda u: None if noise(u.exc_value) else unraisable_hook(u)
  std_logging.getLogger("asyncio").addFilter(lambda r: not (r.exc_info and noise(r.exc_info[1])))


def _state_bytes(state) -> int:
  return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(state))


# ------------------------------------------------------------------ training


def _uncommitted(directory: str) -> list[str]:
  """The folders in `directory` of saves that never committed. On a local disk
  Orbax writes a step to `N.orbax-checkpoint-tmp...` and renames it `N` when it
  is whole; on a bucket, which has no rename, it writes `N` and marks it whole
  with a `commit_success.txt` last, so there a step folder without it."""
  if is_local(directory):
    if not os.path.isdir(directory):
      return []
    return sorted(
      os.path.join(directory, name)
      for name in os.listdir(directory)
      if ocp.path.step.TMP_DIR_SUFFIX in name
    )
  root = epath.Path(directory)
  if not root.is_dir():
    return []
  return sorted(
    os.fspath(p)
    for p in root.iterdir()
    if ocp.path.step.TMP_DIR_SUFFIX in p.name
    or (p.name.isdigit() and p.is_dir() and ocp.path.step.is_tmp_checkpoint(p))
  )


def _writable(directory: str) -> str:
  """`directory`, made if missing. A file there, or a folder that cannot be
  written to, is refused now: the first save would fail after the training
  up to it."""
  if "://" in directory:
    return directory
  try:
    if os.path.isfile(directory):
      raise NotADirectoryError(20, "a file is there, not a folder")
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_test_"):
      pass
  except OSError as e:
    raise PathError(
      f"cannot keep checkpoints in {directory} ({e.strerror or e}); move what is there "
      "away or make it writable, or pass another --workdir"
    ) from e
  return directory


class TrainCheckpointer:
  """A training run's checkpoints: state, data position and config per step.

  A step counts once Orbax has committed it (its folder renamed from
  `N.orbax-checkpoint-tmp` to `N`): `steps()`, the logs and every message
  name committed steps only. What a killed or failed save left is removed
  when the checkpointer opens, naming it. A save waits for the one in
  flight first, so its failure is known before another starts. `close()`
  (or leaving a `with` block) waits for the last one."""

  def __init__(self, directory: str, *, keep: int, save_every: int):
    if keep < 1:
      raise CheckpointError(
        f"keep={keep}: at least the newest checkpoint must be kept "
        "(--config.train.keep_checkpoints=1 or more)"
      )
    self.directory = _writable(os.fspath(directory))
    self.save_every = save_every
    self._remove_uncommitted()
    # (The manager removes those that cannot be seen here, before its first save.)
    self.manager = _manager(self.directory, create=True, keep=keep, asynchronous=True)
    self._pending: tuple[int, float, int] | None = None  # (step, start time, bytes)
    self._failure: PathError | None = None  # a failed save not yet raised
    self._ours: set[int] = set()  # steps this run restored or committed: same content
    self._known: list[int] = sorted(self.manager.all_steps())  # the committed steps last read
    self._closed = False

  def __enter__(self):
    return self

  def __exit__(self, kind, error, traceback):
    self.close(error)

  def steps(self) -> list[int]:
    """The committed steps, after the save in flight has ended (a failure
    found on the way is raised by the next save, poll, wait or close)."""
    self._settle()
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, config, *, force: bool = False) -> bool:
    """Starts saving at multiples of `save_every` (or when forced); returns
    whether it did. `poll()` and `wait()` log the step once it is committed."""
    if not force and step % self.save_every:
      return False
    self._settle()
    self._raise_failure()
    if step in self.manager.all_steps():
      if step in self._ours:
        return False
      raise CheckpointError(
        f"cannot save step {step}: the folder {self.directory}/{step} already holds a "
        "checkpoint this run did not write (copied in while it ran?); move it out of "
        f"{self.directory} and resume"
      )
    needed = _state_bytes(state)
    free = free_bytes(self.directory)
    if free is not None and free < needed:
      raise self._failed(step, needed, f"{free:,} bytes are free there")
    try:
      started = self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state),
          data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(json.loads(config.to_json())),
        ),
        force=True,
      )
    except Exception as e:
      self._remove_uncommitted(step)
      raise self._failed(step, needed, _save_failure(e)) from e
    if started:
      self._pending = (step, time.perf_counter(), needed)
    return started

  def _settle(self) -> list[int]:
    """Waits for the save in flight; logs (and returns) its step once it is
    committed, or keeps its failure for `_raise_failure`. Afterwards the
    manager's steps are the committed ones on disk (also any copied in)."""
    pending, self._pending = self._pending, None
    error = None
    if pending is not None:
      try:
        self.manager.wait_until_finished()
        self.manager.check_for_errors()
      except Exception as e:
        error = e
    # When a save began Orbax dropped the steps its retention would delete
    # from its list; after a failure they are still on disk.
    unreadable = self._reload()
    if pending is None:
      if unreadable is not None and self._failure is None:
        self._failure = PathError(
          f"cannot list the checkpoints in {self.directory} ({_first_line(unreadable)}); "
          f"the steps committed there were {self._known}. Check that it can be reached "
          "from this machine, then run again"
        )
        self._failure.__cause__ = unreadable
      return []
    step, start, needed = pending
    # A save Orbax finished is committed, even if the list cannot be read back now.
    committed = step in self._known if unreadable is None else error is None
    if committed and step not in self._known:
      self._known = sorted({*self._known, step})
    if error is not None and committed:
      # Only removing older steps comes after the commit (e.g. one that is
      # a symbolic link, which Orbax refuses to delete): they stay on disk.
      logging.warning(
        "checkpoint step %d committed, but removing the steps past train.keep_checkpoints "
        "failed (%s); they stay in %s",
        step,
        _first_line(error),
        self.directory,
      )
      error = None
    if error is None and not committed:
      error = RuntimeError("Orbax reported no error, yet the step folder is not there")
    if error is not None:
      self._remove_uncommitted(step)
      self._failure = self._failed(step, needed, _save_failure(error))
      self._failure.__cause__ = error
      return []
    self._ours.add(step)
    logging.info(
      "checkpoint step %d saved to %s (%.1f MB, committed within %.1f s)",
      step,
      self.directory,
      needed / 1e6,
      time.perf_counter() - start,
    )
    return [step]

  def _raise_failure(self):
    if self._failure is not None:
      failure, self._failure = self._failure, None
      raise failure

  def _remove_uncommitted(self, step: int | None = None):
    """Removes what saves that never committed left (a killed run's, named),
    or what the failed save of `step` wrote. What cannot be removed now (the
    bucket unreachable) is left for the next run's start."""
    if jax.process_index() != 0:
      return
    try:
      for path in _uncommitted(self.directory):
        if step is None:
          logging.warning("removing %s: a save that never committed (killed or failed)", path)
        elif os.path.basename(path).split(".")[0] != str(step):
          continue
        if is_local(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          epath.Path(path).rmtree()
    except Exception as e:  # the save's own failure is what gets reported
      logging.warning("could not remove an uncommitted save in %s: %s", self.directory, e)

  def _reload(self) -> Exception | None:
    """Reads the committed steps from storage into the manager and `_known`;
    returns what failed instead (e.g. a bucket that stopped answering), the
    last list read then standing."""
    try:
      self.manager.reload()
    except Exception as e:
      return e
    self._known = sorted(self.manager.all_steps())
    return None

  def _failed(self, step: int, needed: int, why: str) -> PathError:
    self._reload()  # what is on disk, committed, whatever Orbax's list says
    kept = self._known
    fix = (
      "Free space there (or lower train.keep_checkpoints), or resume with --workdir on a "
      "larger disk after copying the checkpoints folder"
      if is_local(self.directory)
      else "Check that the bucket can be reached and written from this machine (network, "
      "credentials, quota), then run again: it resumes from the last committed step"
    )
    return PathError(
      f"could not save step {step} to {self.directory}: {why}; a checkpoint needs about "
      f"{needed:,} bytes. "
      + (
        f"The committed steps there, {kept}, are intact and resumable. "
        if kept
        else "No step is committed there yet. "
      )
      + fix
    )

  def poll(self, *, wait: bool = False) -> list[int]:
    """Logs (and returns) the step whose save has been committed since the
    last call; with `wait`, first waits for the save in flight. Raises the
    failure of a save."""
    done = []
    if self._pending is not None and (wait or not self.manager.is_saving_in_progress()):
      done = self._settle()
    self._raise_failure()
    return done

  def wait(self):
    self.poll(wait=True)

  def close(self, error: BaseException | None = None):
    """Waits for the save in flight, logs it once committed and closes; safe
    to call again. A failed save raises its PathError, unless `error` (what
    the caller is already raising, e.g. from a `finally`) is given: then the
    failure is logged and `error` goes on."""
    if self._closed:
      return
    self._closed = True
    self._settle()
    try:
      self.manager.close()
    except Exception as e:  # a failure _settle has already kept
      logging.debug("closing the checkpoint manager: %s", _first_line(e))
    if self._failure is not None and error is not None:
      logging.error("%s", self._failure)
      self._failure = None
    self._raise_failure()

  def restore_latest(self, abstract_state, shardings, config, read_data):
    """(step, state in `shardings`, the data state of every process) of the newest
    readable checkpoint, or None when there is none. `read_data` turns a saved
    data item into a data state, raising on one that is not (the data pipeline
    owns that format). An unreadable step is reported, moved aside to
    `<directory>_unreadable/` (so a new save can take its number) and the one
    before it tried; a checkpoint of another model, or a step folder holding
    another step's state, is an error, not a fallback."""
    _silence_failed_restore_noise()
    problems = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      where = f"{self.directory}/{step}"
      try:
        stored = self.manager.item_metadata(step)["state"]["params"]
        saved_config = _config_at(self.manager, step)
      except UserError:
        raise  # a config this version cannot read is no damaged checkpoint
      except Exception as e:
        problems.append(self._unreadable(step, e))
        continue
      # Another model's checkpoint fails here, naming every differing parameter
      # (the optimizer state and EMA mirror the parameters).
      check_params(
        stored,
        abstract_state["params"],
        where,
        "Resume with the config it was trained with (its `config` item "
        "holds it) or point --workdir at a fresh directory.",
      )
      check_model_fields(
        saved_config,
        config,
        f"checkpoint {where}",
        allowed=config.train.allow_model_changes,
        override="pass --config.train.allow_model_changes=True",
      )
      try:
        state, data = self._restore(step, abstract_state, shardings)
        data = read_data(data)
      except CheckpointError:
        raise
      except Exception as e:
        problems.append(self._unreadable(step, e))
        continue
      # Before anything is trained, written or deleted: a resumed run would
      # retrain from the recorded step under a higher number, and retention
      # would delete the real newer steps.
      _check_recorded_step(self.directory, step, state["step"])
      if problems:
        logging.warning("resumed from step %d, the newest readable one (see above)", step)
      self._ours.add(step)
      return step, state, data
    if problems:
      raise CheckpointError(
        f"no readable checkpoint in {self.directory}: "
        + "; ".join(problems)
        + f". They were moved to {self.directory}_unreadable/; start again with a fresh "
        "--workdir (or restore the folder from a backup)"
      )
    return None

  def _unreadable(self, step: int, error: BaseException) -> str:
    why = f"step {step} ({_first_line(error)})"
    aside = new_folder_beside(os.path.join(f"{self.directory}_unreadable", str(step)))
    if jax.process_index() == 0:
      try:
        move_folder(f"{self.directory}/{step}", aside)
      except OSError as e:
        raise CheckpointError(
          f"checkpoint {self.directory}/{step} cannot be read ({_first_line(error)}) and "
          f"could not be moved aside to {aside} ({e.strerror or e}); move it out of "
          f"{self.directory} yourself and run again to resume from the step before it"
        ) from error
      self.manager.reload()
    logging.warning(
      "checkpoint %s/%d cannot be read: %s; moved it to %s and trying the step before it",
      self.directory,
      step,
      _first_line(error),
      aside,
    )
    return why

  def _restore(self, step: int, abstract_state, shardings):
    target, restore_args = _target(abstract_state, shardings)
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args),
        data=ocp.args.JsonRestore(),
      ),
    )
    return restored["state"], restored["data"]


# -------------------------------------------------------------------- models


def model_differences(saved, config) -> list[str]:
  """`model.x=A there, B here` for each weight-shaping field that differs
  (`saved` is complete: a field added since it was saved holds its default)."""
  return [
    f"model.{k}={saved.model[k]!r} there, {v!r} here"
    for k, v in config.model.items()
    if k not in _COMPUTE_FIELDS and saved.model[k] != v
  ]


def _is_dir(path: str) -> bool:
  """Whether `path` is a folder, on this machine or a bucket (`gs://...`: a
  prefix that holds objects)."""
  return bool(path) and epath.Path(path).is_dir()


def resolve(path: str, step: int | None = None) -> tuple[str, int]:
  """(checkpoint manager directory, step) that `path` names; latest by default.
  The same forms are taken on a local disk and on a bucket (`gs://...`)."""
  path = os.fspath(path).rstrip("/")
  if not _is_dir(path):
    raise MissingPathError(
      f"checkpoint path {path!r} does not exist; pass a training "
      "workdir, a step folder like workdir/checkpoints/800, or the "
      "output of `python -m monoformer_jax.convert`"
    )
  if _is_dir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  name = os.path.basename(path)
  if name.isdigit():  # a step folder? (listing the folder above costs a bucket a request)
    steps_beside = [str(s) for s in resolve_steps(os.path.dirname(path))]
    if name in steps_beside and _is_dir(os.path.join(path, "state")):
      if step is not None and step != int(name):
        raise CheckpointError(f"{path} is the folder of step {name}, not of step {step}")
      return os.path.dirname(path), int(name)
  steps = resolve_steps(path)
  if not steps:
    raise MissingPathError(
      f"no checkpoint in {path!r}: expected a training workdir, its checkpoints/ "
      "folder, a step folder like checkpoints/800, or the output of "
      "`python -m monoformer_jax.convert`"
    )
  if step is None:
    return path, steps[-1]
  if step not in steps:
    raise MissingPathError(f"no step {step} in {path}; it holds steps {steps}")
  return path, step


def _config_at(manager: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  """The config saved with `step`, completed by the schema: a field added since
  it was saved takes its default, so old checkpoints load through the same path."""
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return complete(restored["config"], f"the config saved with {manager.directory}/{step}")


def _unreadable_error(directory: str, step: int, error: BaseException) -> CheckpointError:
  others = [s for s in resolve_steps(directory) if s != step]
  hint = (
    f"pass one of its other steps, e.g. {directory}/{others[-1]}"
    if others
    else "restore it from a backup, or convert or train the model again"
  )
  return CheckpointError(
    f"checkpoint {directory}/{step} cannot be read ({_first_line(error)}); {hint}"
  )


def beside(checkpoint: str, step: int, name: str) -> str:
  """The path of output `name` of `checkpoint`'s step beside it: WORKDIR/{name}_step{N}
  for a training workdir, MODEL_{name}_step{N} beside a converted model; in the
  same bucket for a checkpoint on one."""
  directory, _ = resolve(checkpoint, step)
  if "://" not in directory:
    directory = os.path.abspath(directory)
  if os.path.basename(directory) == "checkpoints":  # a training workdir's
    return os.path.join(os.path.dirname(directory), f"{name}_step{step}")
  return f"{directory}_{name}_step{step}"


def resolve_steps(directory: str) -> list[int]:
  """The committed steps of a checkpoint folder (local or on a bucket) as
  Orbax finds them: folders named by a number without leading zeros, not a
  file, a `0006` or a save that never committed (`6.orbax-checkpoint-tmp`)."""
  if not _is_dir(directory):
    return []
  found = ocp.path.step.standard_name_format().find_all(epath.Path(directory))
  return sorted(m.step for m in found)


def load_config(path: str, step: int | None = None):
  """(ConfigDict saved with the checkpoint `path` names, its step)."""
  directory, step = resolve(path, step)
  try:
    return _config_at(_manager(directory), step), step
  except UserError:
    raise
  except Exception as e:
    raise _unreadable_error(directory, step, e) from e


def stored_weights(path: str) -> list[str]:
  """Which weights ('params', 'ema') the checkpoint `path` names holds."""
  directory, step = resolve(path)
  return sorted(_manager(directory).item_metadata(step)["state"])


# A step's files up to this size are digested whole by `fingerprint`: Orbax's
# commit record, the config, the array metadata and manifests (not the weights'
# data files, which are digested by name and size only).
_SMALL_FILE_BYTES = 64 << 10


def fingerprint(path: str, step: int | None = None) -> str:
  """16 hex digits that tell one save of the checkpoint step `path` names from
  any other: a digest of the names and sizes of the step folder's files and of
  the contents of its small ones, which include Orbax's commit timestamps. A
  copy of the folder has the same fingerprint; the same path and step saved
  again (a workdir deleted and trained anew) has another. Reads no weights."""
  directory, step = resolve(path, step)
  folder = epath.Path(directory) / str(step)
  try:
    files = files_under(folder)
    digest = hashlib.sha256()
    for relative, file in files:
      size = file.stat().length
      digest.update(f"{relative}\0{size}\0".encode())
      if size <= _SMALL_FILE_BYTES:
        digest.update(file.read_bytes())
  except OSError as e:
    raise _unreadable_error(directory, step, e) from e
  return digest.hexdigest()[:16]


def load_params(
  path: str,
  *,
  weights: str = "ema",
  config=None,
  shardings=None,
  step: int | None = None,
  allow_model_changes: bool = False,
):
  """(params pure dict, config, step) from the checkpoint `path` names.

  `weights`: 'ema' (the default for sampling, as the reference) or 'raw'.
  `config` defaults to the one saved with the checkpoint; one whose model
  settings differ from it (rope_theta, eps, ...) is refused unless
  `allow_model_changes`. `shardings` (a pytree of NamedShardings like the
  params, e.g. from `param_shardings`) restores each array straight into its
  shards, else onto the default device. Only the chosen weights are read,
  never the optimizer state; weights that are not finite are refused.
  """
  _, params, config, step = _restore(path, weights, config, shardings, step, allow_model_changes)
  return params, config, step


def load_model(
  path: str,
  *,
  weights: str = "ema",
  config=None,
  shardings=None,
  step: int | None = None,
  allow_model_changes: bool = False,
):
  """(MonoFormer with the checkpoint's weights, config): see `load_params`."""
  graphdef, params, config, _ = _restore(
    path, weights, config, shardings, step, allow_model_changes
  )
  return nnx.merge(graphdef, params), config


@contextlib.contextmanager
def model_on_mesh(path: str, *, weights: str, config, step: int):
  """(model, config) of the checkpoint, its weights restored straight into the
  shardings of config.mesh; the block runs on that mesh with the config's
  sharding rules, as the sampling and evaluation entry points do."""
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), sharding.logical_rules(config.sharding_rules):
    model, config = load_model(
      path, weights=weights, config=config, shardings=param_shardings(config, mesh), step=step
    )
    logging.info("%s weights of %s (step %d), mesh %s", weights, path, step, dict(mesh.shape))
    yield model, config


def nonfinite_params(params) -> list[str]:
  """The names of the arrays of `params` that hold a NaN or an infinity."""
  finite = jax.device_get(
    jax.jit(lambda t: jax.tree.map(lambda x: jnp.isfinite(x).all(), t))(params)
  )
  return [
    jax.tree_util.keystr(p) for p, ok in jax.tree_util.tree_flatten_with_path(finite)[0] if not ok
  ]


def _restore(path, weights, config, shardings, step, allow_model_changes=False):
  """load_params' work, also returning the model's graphdef."""
  if weights not in WEIGHTS:
    raise CheckpointError(f"weights={weights!r}: choose one of {WEIGHTS}")
  directory, step = resolve(path, step)
  where = f"{directory}/{step}"
  _silence_failed_restore_noise()
  manager = _manager(directory)
  try:
    saved_config = _config_at(manager, step)
    stored = manager.item_metadata(step)["state"]
  except UserError:
    raise
  except Exception as e:
    raise _unreadable_error(directory, step, e) from e
  config = saved_config if config is None else config
  key = "ema" if weights == "ema" else "params"
  if key not in stored:
    raise CheckpointError(
      f"checkpoint {where} has no {key!r} weights (it holds "
      f"{sorted(stored)}); ask for weights='raw' (--weights=raw)"
    )
  graphdef, abstract, _ = abstract_model(config.model)
  differ = model_differences(saved_config, config)
  fix = (
    "Set " + "; ".join(differ) + " to the checkpoint's values"
    if differ
    else "Pass the config the checkpoint was made with (its `config` item holds it)"
  )
  check_params(stored[key], abstract, where, fix + ", or convert the weights for this model size.")
  check_model_fields(
    saved_config,
    config,
    f"checkpoint {where}",
    allowed=allow_model_changes,
    override="pass allow_model_changes=True "
    "(--config.train.allow_model_changes=True for train.init_from)",
  )
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  wanted, wanted_shardings = {key: abstract}, {key: shardings}
  if "step" in stored:  # a training state records its step: read it along
    wanted["step"] = jax.ShapeDtypeStruct((), stored["step"].dtype)
    wanted_shardings["step"] = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target, restore_args = _target(wanted, wanted_shardings)
  try:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
      ),
    )
  except Exception as e:
    raise _unreadable_error(directory, step, e) from e
  if "step" in stored:
    _check_recorded_step(directory, step, restored["state"]["step"])
  params = restored["state"][key]
  bad = nonfinite_params(params)
  if bad:
    raise CheckpointError(
      f"checkpoint {where} holds non-finite {key!r} weights in "
      f"{len(bad)} arrays ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}); "
      "it was saved from a diverged run: use an earlier step"
    )
  return graphdef, params, config, step


def save_model(directory: str, config, params, *, ema=None, step: int = 0):
  """Writes a model checkpoint (`params`, optionally `ema`, and the config)
  that `load_model`, sampling, evaluation and `train.init_from` read."""
  state = dict(params=params) if ema is None else dict(params=params, ema=ema)
  with _manager(os.fspath(directory), create=True) as manager:
    manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), config=ocp.args.JsonSave(json.loads(config.to_json()))
      ),
      force=True,
    )
    manager.wait_until_finished()
