"""Folders the entry points write to: made if missing, checked writable, never overwritten.

    writable_dir(path, what, flag)      a folder that is one (or can be made) and is writable
    fresh_output_dir(path, outputs, flag, overwrite)
                                        a writable folder holding none of `outputs`
    new_folder_beside(base)             `base`, or the first of `base-2`, `base-3`, ... not there
    writable_file(path, what, flag)     a local file path whose folder is (or can be made) writable
    free_bytes(path)                    the free space where `path` is (or would be) written
    is_cloud(path)                      whether `path` is a URL (gs://...), not a local path

Each failure is a `PathError` naming the flag, the path and the fix. A cloud
folder (`gs://...`, through etils.epath) has nothing to make: `writable_dir`
probes it by writing and deleting a small object, so a missing bucket or
missing credentials stop the run before its work, naming the path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable

from monoformer_jax.errors import PathError


def is_cloud(path) -> bool:
  """Whether `path` names an object store (`gs://...`): no append, no atomic
  rename, no free-space figure; local paths keep their file-system fast paths."""
  return "://" in os.fspath(path)


def writable_dir(path: str, what: str, flag: str) -> str:
  """`path` as a folder that exists (made if need be) and can be written to."""
  path = os.fspath(path)
  if not path:
    raise PathError(f"{flag} is empty; pass a folder for the {what} (it is made if missing)")
  if "://" in path:
    _probe_cloud_dir(path, what, flag)
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


def _probe_cloud_dir(path: str, what: str, flag: str):
  """Writes and deletes a small object in the cloud folder `path` (folders
  are only name prefixes there: nothing to make)."""
  from etils import epath

  probe = epath.Path(path) / f".write_test_{uuid.uuid4().hex}"
  try:
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # the storage client's own errors, not only OSError
    why = " ".join(str(e).split())[:200] or type(e).__name__
    raise PathError(
      f"{flag}={path!r}: cannot write the {what} there ({type(e).__name__}: {why}); check "
      "that the bucket exists and that this machine's credentials may write to it "
      "(`gcloud auth application-default login`, or the VM's service account)"
    ) from e


def writable_file(path: str, what: str, flag: str) -> str:
  """`path` as a local file that can be written: not a folder, in a folder
  that exists (made if need be) and is writable. Checked before the work
  whose results it receives, so they are not lost to a bad path after it."""
  path = os.fspath(path)
  if "://" in path:
    raise PathError(f"{flag}={path!r}: the {what} are written to a local disk; pass a local path")
  if os.path.isdir(path):
    raise PathError(
      f"{flag}={path!r} is a folder; pass the path of a file for the {what} "
      "(one in that folder, say)"
    )
  writable_dir(os.path.dirname(os.path.abspath(path)), what, f"the folder of {flag}")
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise PathError(f"{flag}={path!r} cannot be written (read-only); pass another {flag}")
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
