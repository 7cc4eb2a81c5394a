"""Config files: `--config=FILE.py[:variant]` and the repository's `configs/{name}.py`.

A config file is a Python module whose `get_config()` returns the config (a
ConfigDict built on `monoformer_jax.config.base()`, or a mapping of its
sections). A file with variants lists them in `VARIANTS` ("" is the default)
and takes the chosen one as get_config's argument.

    load(spec)           FILE.py[:variant] run: its get_config(variant), or one
                         ConfigError / MissingPathError naming the file (and
                         the line), what is wrong and the fix. The entry points'
                         `--config` flags are checked with it (cli.parse_flags)
                         before ml_collections reads the same file.
    check_override(config, path, where)
                         `--config.a.b=v`'s a.b is a field of `config`, or one
                         ConfigError naming the nearest real field
    config_file(name)    `configs/{name}.py[:variant]` loaded and completed, for
                         code that has no flag: conversions start from
                         `imagenet256`, the tests from `digits:tiny`, the
                         benchmarks and the notebook from `digits`

The files ship with a source checkout (the project is installed with
`pip install -e .`), not inside the package.
"""

import collections.abc
import dataclasses
import importlib.machinery
import importlib.util
import inspect
import os
import pathlib
import traceback
import typing

import ml_collections

from monoformer_jax.config.schema import SECTIONS, complete, field_paths, not_a_field
from monoformer_jax.errors import ConfigError, MissingPathError, PathError

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"


def load(spec: str, where: str | None = None):
  """The config `spec` ("path/to/file.py" or "path/to/file.py:variant") names:
  its get_config(variant), not yet completed. `where` is how the user gave it
  (default `--config=SPEC`), for the messages."""
  where = where or f"--config={spec}"
  path, _, variant = spec.partition(":")
  if not path:
    raise ConfigError(f"{where} names no file: pass a config file, e.g. --config=configs/digits.py")
  if not os.path.exists(path) and os.path.isfile(path + ".py"):
    raise MissingPathError(f"{where}: there is no file {path}; did you mean {path}.py?")
  if not os.path.exists(path):
    raise MissingPathError(
      f"{where}: there is no file {path} (from {os.getcwd()}); {_nearby(path)}"
    )
  if os.path.isdir(path):
    raise PathError(f"{where}: {path} is a folder; {_nearby(os.path.join(path, 'x.py'))}")
  module = _run(path, where)
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(
      f"{where}: {path} defines no get_config(); a config file's get_config() returns the "
      "config (start from monoformer_jax.config.base(), as configs/digits.py does)"
    )
  variants = getattr(module, "VARIANTS", None)
  if variants is not None and variant not in variants:
    choices = ", ".join(f"--config={path}" + (f":{v}" if v else "") for v in variants)
    raise ConfigError(f"{where}: {path} has no variant {variant!r}; pass one of {choices}")
  if variant and not _takes_an_argument(get_config):
    raise ConfigError(
      f"{where}: {path} has no variants (its get_config takes none); drop ':{variant}'"
    )
  called = f"get_config({variant!r})" if variant else "get_config()"
  try:
    config = get_config(variant) if variant else get_config()
  except Exception as e:  # the file's own code: whatever it raises is the file's problem
    raise ConfigError(
      f"{where}: {path}'s {called} failed{_line_in(e, path)}: {type(e).__name__}: {_first_line(e)}"
    ) from e
  if not _is_section(config):
    raise ConfigError(
      f"{where}: {path}'s {called} returned {_short(config)}, not a config; "
      + ("is its `return` missing? " if config is None else "")
      + "return a ConfigDict (start from monoformer_jax.config.base())"
    )
  return config


def check_override(config, path: str, where: str):
  """`path` ("train.num_steps") names a field of `config` (the loaded file's, so
  a field it adds is known too); else a ConfigError naming the nearest real
  one. An entry of a mapping field (data.mix.NAME) must be there already; an
  index (a[0]) is left to ml_collections."""
  node, walked = config, []
  for name in path.split("."):
    if "[" in name:
      return
    if not _is_section(node):
      raise ConfigError(
        f"{where}: {'.'.join(walked)} takes {kind_of(node)}, it is not a section of fields; "
        f"set it as --config.{'.'.join(walked)}=VALUE"
      )
    if name not in node:
      if _is_mapping_field(walked):
        raise ConfigError(
          f"{where}: {'.'.join(walked)} has no entry {name!r} here (it has {sorted(node)}); "
          f"give the whole mapping, e.g. --config.{'.'.join(walked)}=\"{{'{name}': ...}}\""
        )
      dotted = ".".join([*walked, name])
      if dotted in SECTIONS or dotted in field_paths():
        raise ConfigError(
          f"{where}: {dotted} is a {'section' if dotted in SECTIONS else 'field'} of the config, "
          "but this config file's get_config() leaves it out, so "
          "the command line cannot set it; build the config on monoformer_jax.config.base(), "
          "which holds every field"
        )
      raise not_a_field(dotted, list(node.keys()), where)
    node, walked = node[name], [*walked, name]
  if node is None:
    raise ConfigError(
      f"{where}: {path} is None in this config, and the command line cannot set a field "
      "that is None (ml_collections cannot tell its type); set it in the config file"
    )


def kind_of(value) -> str:
  """What a field holding `value` takes, in words: "an integer", "a number", ..."""
  kinds = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
  if isinstance(value, (tuple, list)):
    return "a list (repeat the flag once per item)"
  return kinds.get(type(value), f"a {type(value).__name__}")


def _is_section(node) -> bool:
  return isinstance(node, (ml_collections.ConfigDict, collections.abc.Mapping))


def _is_mapping_field(walked: list[str]) -> bool:
  """Whether the dotted name is a schema field that maps free names (data.mix, data.dirs)."""
  if len(walked) != 2 or walked[0] not in SECTIONS:
    return False
  kind = {f.name: f.type for f in dataclasses.fields(SECTIONS[walked[0]])}.get(walked[1])
  return typing.get_origin(kind) is collections.abc.Mapping


def config_file(name: str):
  """`configs/{name}.py`'s get_config(), completed and checked; "name:variant"
  calls get_config(variant), as `--config=configs/name.py:variant` does."""
  file, _, variant = name.partition(":")
  path = CONFIGS_DIR / f"{file}.py"
  if not path.exists():
    raise MissingPathError(
      f"no {path}: the configs come with a clone of the repository (install it with "
      f"`pip install -e .`), or pass --config=path/to/configs/{file}.py"
    )
  spec = f"{path}:{variant}" if variant else str(path)
  return complete(load(spec, where=f"config_file({name!r})"), f"configs/{file}.py")


# ------------------------------------------------------------------ helpers


def _run(path: str, where: str):
  """The module at `path`, run (not registered in sys.modules)."""
  name = "monoformer_config_" + "".join(c if c.isalnum() else "_" for c in path)
  loader = importlib.machinery.SourceFileLoader(name, path)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
  try:
    loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"{where}: {path}, line {e.lineno}: {e.msg}; fix the file") from e
  except Exception as e:  # an import or a name the file's own code gets wrong
    raise ConfigError(
      f"{where}: {path} fails to run{_line_in(e, path)}: {type(e).__name__}: {_first_line(e)}"
    ) from e
  return module


def _line_in(error: BaseException, path: str) -> str:
  """' at line N' of the innermost frame of `path` in the error's traceback."""
  target = os.path.realpath(path)
  lines = [
    f.lineno
    for f in traceback.extract_tb(error.__traceback__)
    if os.path.realpath(f.filename) == target
  ]
  return f" at line {lines[-1]}" if lines else ""


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0] if text else ""


def _short(value) -> str:
  text = repr(value)
  return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _takes_an_argument(function) -> bool:
  try:
    inspect.signature(function).bind("variant")
  except TypeError:
    return False
  except ValueError:  # no signature to read (a builtin): let the call decide
    return True
  return True


def _nearby(path: str) -> str:
  """The config files beside `path`, or the repository's when its folder is not there."""
  folder = os.path.dirname(path) or "."
  if os.path.isdir(folder):
    found = sorted(n for n in os.listdir(folder) if n.endswith(".py") and not n.startswith("_"))
    if found:
      return "the config files there: " + ", ".join(os.path.join(folder, n) for n in found)
    return f"{folder} holds no .py config files"
  there = sorted(CONFIGS_DIR.glob("*.py")) if CONFIGS_DIR.is_dir() else []
  return (
    "the repository's config files: " + ", ".join(map(str, there))
    if there
    else "pass the path of a config file (.py)"
  )
