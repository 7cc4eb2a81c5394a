"""Folders the entry points write to: made if missing, checked writable, never overwritten.

    writable_dir(path, what, flag)      a folder that is one (or can be made) and is writable
    fresh_output_dir(path, outputs, flag, overwrite)
                                        a writable folder holding none of `outputs`
    new_folder_beside(base)             `base`, or the first of `base-2`, `base-3`, ... not there
    free_bytes(path)                    the free space where `path` is (or would be) written

Each failure is a `PathError` naming the flag, the path and the fix. Cloud
paths (`gs://...`) are passed through to the libraries that write them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable

from monoformer_jax.errors import PathError


def writable_dir(path: str, what: str, flag: str) -> str:
  """`path` as a folder that exists (made if need be) and can be written to."""
  path = os.fspath(path)
  if "://" in path:
    return path
  if os.path.exists(path) and not os.path.isdir(path):
    raise PathError(
      f"{flag}={path!r} is a file, not a folder; pass a folder for the "
      f"{what} (it is made if missing)"
    )
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
      pass
  except OSError as e:
    raise PathError(
      f"{flag}={path!r}: cannot write the {what} there ({e.strerror or e}); "
      "pass a folder you can write to"
    ) from e
  return path


def fresh_output_dir(path: str, outputs: Iterable[str], flag: str, overwrite: bool = False) -> str:
  """A writable `path` that holds none of `outputs` (unless `overwrite`)."""
  path = writable_dir(path, "outputs", flag)
  there = [name for name in outputs if os.path.exists(os.path.join(path, name))]
  if there and not overwrite:
    raise PathError(
      f"{flag}={path!r} already holds {there}; pass another {flag} or --overwrite to replace them"
    )
  return path


def new_folder_beside(base: str) -> str:
  """`base`, or `base-2`, `base-3`, ... : the first that does not exist yet."""
  candidate, k = base, 1
  while os.path.exists(candidate):
    k += 1
    candidate = f"{base}-{k}"
  return candidate


def free_bytes(path: str) -> int | None:
  """Free bytes on the disk that holds `path`, or would hold it once made (its
  nearest existing folder); None for a cloud path."""
  path = os.path.abspath(os.fspath(path)) if "://" not in os.fspath(path) else None
  if path is None:
    return None
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free
