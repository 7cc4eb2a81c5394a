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
import re
import sys
from collections.abc import Callable

from absl import app, flags, logging

from monoformer_jax.config import files
from monoformer_jax.errors import ConfigError, UserError

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
  """`error: message` and one `  because: ...` line per cause in its chain that
  the lines before do not already say."""
  lines = [f"error: {error}"]
  seen = {id(error)}
  cause = _cause_of(error)
  while cause is not None and id(cause) not in seen:
    seen.add(id(cause))
    first = str(cause).strip().splitlines()
    first = first[0] if first else ""
    if not first or first not in "\n".join(lines):
      lines.append(f"  because: {type(cause).__name__}: {first}")
    cause = _cause_of(cause)
  return "\n".join(lines)


def _cause_of(error: BaseException) -> BaseException | None:
  """What Python's own traceback would show as `error`'s cause: none after
  `raise ... from None`."""
  if error.__cause__ is not None or error.__suppress_context__:
    return error.__cause__
  return error.__context__


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing (`flag_values(argv)`), every failure one `ConfigError`.

  ml_collections' config flags read `--config=FILE[:variant]` and apply each
  `--config.a.b=v` while absl parses, so their failures (a file that is not
  there or does not run, a variant or a field that does not exist, a value
  of the wrong type) come before `main` and used to be pages of traceback.
  Here each `--config` file is run first by `config.files.load` and each
  override's field looked up (`check_override`), which name the file, line,
  variants or nearest field; what absl itself refuses (an unknown flag, a
  value it cannot parse, a missing required flag) keeps its message. Returns
  the arguments left over, as absl does."""
  try:
    expanded = flag_values.read_flags_from_files(argv, force_gnu=False)
  except flags.Error as e:  # a --flagfile that is not there
    raise ConfigError(_flag_error(e, {})) from e
  loaded = {}
  for name, spec, overrides in _config_arguments(expanded, flag_values):
    if spec is None:
      if overrides:
        raise ConfigError(
          f"--{overrides[0]} overrides a field of --{name}, which is not given; pass "
          f"--{name}=FILE.py before it"
        )
      continue
    loaded[name] = files.load(spec, f"--{name}={spec}")
    for override in overrides:
      path = override.split("=", 1)[0].split(".", 1)[1]
      files.check_override(loaded[name], path, f"--{override}")
  try:
    return flag_values(argv)
  except flags.Error as e:
    raise ConfigError(_flag_error(e, loaded)) from e
  except Exception as e:  # ml_collections applying an override: the command line's value
    first = str(e).strip().splitlines()
    raise ConfigError(f"{type(e).__name__}: {first[0] if first else ''}") from e


def _flag_error(error: flags.Error, loaded: dict) -> str:
  """absl's message for a flag it refused, on one line, with what the flag takes."""
  message = str(error).strip().splitlines()[0]
  required = re.fullmatch(
    r"flag (--\w+)=None: Flag \1 must have a value other than None\.", message
  )
  if required:
    return f"{required[1]} is required"
  if isinstance(error, flags.UnrecognizedFlagError):
    return f"{message} (--helpfull lists the flags)"
  value = re.match(r"flag --(\w+)\.([\w.]+)=", message)
  if value and value[1] in loaded:
    node = loaded[value[1]]
    for name in value[2].split("."):
      node = node.get(name) if hasattr(node, "get") else None
    if node is not None:
      return f"{message}; {value[2]} takes {files.kind_of(node)}"
  return message


def _config_arguments(argv: list[str], flag_values: flags.FlagValues):
  """(name, the value given or None, its `name.a.b=v` overrides) of each config
  file flag (ml_collections' DEFINE_config_file) that `flag_values` holds, as `argv` gives them."""
  from ml_collections.config_flags import config_flags

  names = [
    n for n in flag_values if isinstance(flag_values[n].parser, config_flags.ConfigFileFlagParser)
  ]
  args = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
  for name in names:
    spec, overrides = None, []
    for i, arg in enumerate(args):
      bare = arg.lstrip("-")
      if not arg.startswith("-"):
        continue
      if bare.startswith(f"{name}="):
        spec = bare.split("=", 1)[1]
      elif bare == name and i + 1 < len(args):
        spec = args[i + 1]
      elif bare.startswith((f"{name}.", f"no{name}.")):
        path = bare[2:] if bare.startswith("no") else bare
        overrides.append(path if "=" in path else f"{path}=")
    yield name, spec, overrides


def _wants_traceback(argv: list[str]) -> bool:
  """Whether `argv` sets --verbose (read by hand: it failed to parse)."""
  verbose = False
  for arg in argv[1:]:
    bare = arg.lstrip("-").lower() if arg.startswith("-") else ""
    if bare in ("verbose", "verbose=true", "verbose=1"):
      verbose = True
    elif bare in ("noverbose", "verbose=false", "verbose=0"):
      verbose = False
  return verbose


def _fail(error: UserError):
  """Print `error` as `error: ...` with its causes, and exit with status 2."""
  logging.flush()
  print(describe(error) + "\n(--verbose shows the traceback)", file=sys.stderr)
  sys.exit(2)


def _parse_flags_or_fail(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS):
  """`parse_flags`, its error printed as one line (exit status 2), or with
  --verbose raised with its traceback."""
  try:
    return parse_flags(argv, flag_values)
  except UserError as error:
    if _wants_traceback(argv):
      raise
    _fail(error)


def run(main: Callable[[list[str]], None]):
  """absl.app.run(main) with the project's logging and error printing; the
  flags are parsed by `parse_flags`, so a bad flag or config file is one line
  too."""

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
      _fail(error)

  app.run(guarded, flags_parser=_parse_flags_or_fail)
