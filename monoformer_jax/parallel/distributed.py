"""Several processes, one run: start-up, agreed preemption, shared host values.

A pod (or a GPU cluster) runs the same command on every host; JAX joins them
with `jax.distributed.initialize()`. `initialize()` here calls it when the
environment says the run has several processes, or when asked to:

    launch/local.sh      JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
    SLURM (sbatch/srun)  SLURM_NTASKS > 1 (JAX reads the rest from SLURM)
    Open MPI (mpirun)    OMPI_COMM_WORLD_SIZE > 1
    a TPU pod slice      the same JAX_* variables, which launch/pod_worker.sh
                         sets from the TPU VM's metadata (or GKE's TPU_WORKER_*);
                         or --jax_distributed: JAX finds the workers itself

Preemption: a SIGTERM reaches one host (or all, at different times). With
several processes JAX's own notifier takes the signal and the coordination
service picks one step that every host reaches
(`multihost_utils.reached_preemption_sync_point`, what Orbax's
`reached_preemption` uses), so all hosts enter the collective save at the
same step and leave together. A single process turns SIGTERM into a flag,
for the length of the run only (`Preemption` is a context manager).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal

import jax
import numpy as np
from absl import logging

from monoformer_jax.errors import ConfigError

# The exit status of a run that a preemption stopped after saving: rerunning
# the same command resumes it. EX_TEMPFAIL of sysexits.h ("try again later"):
# launch/pod_worker.sh restarts on it, launch/gpu_slurm.sh requeues the job.
# 0 is a finished run and 2 a config error or a divergence (cli.run), which a
# restart would only repeat.
RESUMABLE = 75


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"environment variable {name}={value!r} must be an integer") from None


def wanted(flag: bool = False) -> bool:
  """Whether this run is one of several processes (by flag or environment)."""
  return bool(
    flag
    or os.environ.get("JAX_COORDINATOR_ADDRESS")
    or (_int_env("SLURM_NTASKS") or 1) > 1
    or (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1
  )


def initialize(flag: bool = False) -> bool:
  """Joins the other processes of the run when there are any (see the module
  docstring); returns whether it did. Call before anything touches a device."""
  if not wanted(flag):
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  count, index = _int_env("JAX_NUM_PROCESSES"), _int_env("JAX_PROCESS_ID")
  if address and (count is None or index is None):
    raise ConfigError(
      f"JAX_COORDINATOR_ADDRESS={address!r} is set but JAX_NUM_PROCESSES "
      "and JAX_PROCESS_ID are not: set all three (launch/local.sh does)"
    )
  if address:
    if not 0 <= index < count:
      raise ConfigError(f"JAX_PROCESS_ID={index} is not in [0, JAX_NUM_PROCESSES={count})")
    kwargs = dict(coordinator_address=address, num_processes=count, process_id=index)
  jax.distributed.initialize(**kwargs)
  logging.info(
    "process %d of %d: %d local devices, %d in all",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


class Preempted(BaseException):
  """A SIGTERM during a phase that cannot stop at a step boundary (the
  end-of-run samples), raised from the signal handler. A BaseException, like
  KeyboardInterrupt, so that no `except Exception` on its way swallows it."""


class Preemption:
  """`reached(step)`: whether to save this step and stop, the same answer on
  every host. Call it at every step, on every host.

  A context manager: a single process's SIGTERM handler is installed on entry
  (before the run restores, reads data or compiles, so a SIGTERM then stops it
  at its first step boundary) and the previous handler is put back on exit.
  Inside `interrupting()`, a SIGTERM raises `Preempted` at once instead."""

  def __init__(self):
    self.multi = jax.process_count() > 1
    self.signalled = False
    self._raise = False
    self._previous = None
    self._installed = False

  def __enter__(self):
    if not self.multi:  # JAX's notifier owns SIGTERM when several processes run
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._installed = True
      except ValueError:  # not the main thread (e.g. a notebook worker)
        pass
    return self

  def __exit__(self, *exc):
    if self._installed:
      # None: the handler before was not set from Python; the default is the best guess.
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False
    return False

  def _handle(self, *_):
    self.signalled = True
    if self._raise:
      raise Preempted()

  @contextlib.contextmanager
  def interrupting(self):
    """A phase that a SIGTERM ends at once (raising `Preempted`), also one that
    came just before it. A single process only: with several, JAX's notifier
    takes the signal and only `reached` learns of it."""
    if self.signalled:
      raise Preempted()
    self._raise = True
    try:
      yield
    finally:
      self._raise = False

  def reached(self, step: int) -> bool:
    if self.multi:
      from jax.experimental import multihost_utils

      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.signalled


def all_gather_json(value) -> list:
  """Every process's JSON-able `value`, in process order, on every process
  (a collective: all processes call it at the same point)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils

  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[: data.size] = data
  everyone = multihost_utils.process_allgather(padded)
  return [
    json.loads(bytes(row[:n]).decode())
    for row, n in zip(
      np.asarray(everyone).reshape(jax.process_count(), -1), np.asarray(lengths).reshape(-1)
    )
  ]
