"""What every entry point (train, sample, convert, ...) shares: logging, readable
failures, and joining the other processes of a multi-host run.

`run(main)` is `absl.app.run(main)` with the project's logging (INFO, Orbax's
narration and JAX's backend probing dropped) and one rule for errors: a
`UserError` (a bad flag, config field, path, file or checkpoint) prints as
one line, `error: ...`, followed by its causes, and exits with status 2;
`--verbose` shows its traceback instead. Any other exception is a bug and
keeps its traceback. Before `main`, a process of a multi-host run (launch/,
or `--jax_distributed`) joins the others (parallel/distributed.py), JAX's
persistent compilation cache is turned on (`use_compilation_cache`), and
malloc keeps the host memory XLA:CPU frees between steps (`keep_host_memory`).
"""

from __future__ import annotations

import glob
import logging as std_logging
import os
import sys
from collections.abc import Callable

from absl import app, flags, logging

from monoformer_jax.errors import UserError

_VERBOSE = flags.DEFINE_bool(
  "verbose", False, "Show the traceback of input errors, not just their message."
)
_DISTRIBUTED = flags.DEFINE_bool(
  "jax_distributed",
  False,
  "Call jax.distributed.initialize() first: one process of a "
  "multi-host run (also done when the environment says so: parallel/distributed.py).",
)

# Loggers whose INFO lines are noise for our users: JAX's probing of backends
# that are not there ("Unable to initialize backend 'tpu'" on every CPU run).
_QUIET_LOGGERS = ("jax._src.xla_bridge",)


def quiet_logs():
  """INFO logging, without Orbax's and TFDS's narration of every save,
  restore and dataset read, and without JAX's backend probing; their warnings
  and errors still show."""
  logging.set_verbosity(logging.INFO)
  # The libraries' own INFO narration (every save, restore and dataset-info
  # read); matched by package folder, not our checkpoints/orbax_io.py.
  chatty = tuple(f"{os.sep}{name}{os.sep}" for name in ("orbax", "tensorflow_datasets"))
  logging.get_absl_logger().addFilter(
    lambda r: r.levelno >= std_logging.WARNING or not any(c in r.pathname for c in chatty)
  )
  for name in _QUIET_LOGGERS:
    std_logging.getLogger(name).setLevel(std_logging.WARNING)


def use_compilation_cache():
  """JAX's persistent compilation cache, so a second run (the tests, the
  notebook, a resumed job) loads its compiled steps instead of compiling them
  again: in $MONOFORMER_COMPILATION_CACHE, else ~/.cache/monoformer_jax/
  compilation_cache; 'off' turns it off, and a folder set through JAX's own
  JAX_COMPILATION_CACHE_DIR is left as it is. Programs of any compile time
  are kept (unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise)."""
  import jax

  folder = os.environ.get("MONOFORMER_COMPILATION_CACHE", "")
  if folder == "off" or jax.config.jax_compilation_cache_dir:
    return
  folder = folder or os.path.join(
    os.path.expanduser("~"), ".cache", "monoformer_jax", "compilation_cache"
  )
  jax.config.update("jax_compilation_cache_dir", folder)
  # Every program, not only those over JAX's 1 s: a sampler compiles dozens of
  # small ones (a second interleaved sampling run: 15 s instead of 18.5 s).
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# Device files of the chips JAX would compute on instead of the CPU: TPU VMs
# (/dev/accel*, /dev/vfio/N on v5p and later) and NVIDIA GPUs.
_ACCELERATOR_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def keep_host_memory() -> bool:
  """Make glibc's malloc keep freed memory for the next step instead of
  returning it to the kernel; True when it did.

  XLA:CPU allocates each run's temporaries afresh (one block: 344 MB for the
  digits train step) from the thread that runs the program. glibc serves a
  block that large from mmap and unmaps it when it is freed, so every step
  page-faults its whole working set in again: ~83,000 faults and 105-130 ms of
  kernel time per digits step on 2 cores (docs/benchmarks.md). With one arena,
  no mmap and no trimming below 2 GiB, the freed block stays in the heap and
  the next step reuses it; the process keeps its peak memory.

  Call it before JAX starts its CPU client (its threads pick their malloc
  arena on first use): `run` does, as do benchmarks/report.run,
  tests/conftest.py and the notebook. It does this only
  where JAX computes on the CPU: JAX_PLATFORMS starts with cpu, or it is unset
  and the host shows no TPU or GPU device files (there the temporaries live on
  the chip, and the host keeps glibc's defaults). Left alone off glibc and
  where the user tunes malloc: GLIBC_TUNABLES or any MALLOC_* variable in the
  environment (MALLOC_ARENA_MAX=8 keeps glibc's defaults)."""
  if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
    return False
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and not platforms.startswith("cpu"):
    return False
  if not platforms and any(glob.glob(p) for p in _ACCELERATOR_FILES):
    return False
  import ctypes

  try:
    libc = ctypes.CDLL(None)
  except OSError:
    return False
  if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (macOS, musl): nothing to tune
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
  return all(
    libc.mallopt(p, v) == 1
    for p, v in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1))
  )


def describe(error: BaseException) -> str:
  """`error: message` and one `  because: ...` line per cause in its chain."""
  lines = [f"error: {error}"]
  seen = {id(error)}
  cause = error.__cause__ or error.__context__
  while cause is not None and id(cause) not in seen:
    seen.add(id(cause))
    first = str(cause).strip().splitlines()
    lines.append(f"  because: {type(cause).__name__}: {first[0] if first else ''}")
    cause = cause.__cause__ or cause.__context__
  return "\n".join(lines)


def run(main: Callable[[list[str]], None]):
  """absl.app.run(main) with the project's logging and error printing."""

  def guarded(argv):
    quiet_logs()
    keep_host_memory()
    use_compilation_cache()
    try:
      from monoformer_jax.parallel import distributed

      distributed.initialize(_DISTRIBUTED.value)
      return main(argv)
    except UserError as error:
      if _VERBOSE.value:
        raise
      logging.flush()
      print(describe(error) + "\n(--verbose shows the traceback)", file=sys.stderr)
      sys.exit(2)

  app.run(guarded)
