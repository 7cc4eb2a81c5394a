"""Folders the entry points write to: made if missing, checked writable, never overwritten.

    writable_dir(path, what, flag)      a folder that is one (or can be made) and is writable
    fresh_output_dir(path, outputs, flag, overwrite)
                                        a writable folder holding none of `outputs`
    new_folder_beside(base)             `base`, or the first of `base-2`, `base-3`, ... not there
    writable_file(path, what, flag)     a file path whose folder is (or can be made) writable
    free_bytes(path)                    the free space where `path` is (or would be) written
    whole_file(path)                    a binary file to write that appears at `path` (local
                                        or `gs://...`) whole or not at all

Reading files that may be on a bucket (`gs://...`; any scheme epath knows):
    is_local(path)                      True for a path on this machine (no scheme)
    file_size(path)                     its size in bytes
    folder_of(path)                     `path` if a folder, else the folder holding it
    open_binary(path)                   the file opened "rb", seekable, failing as a local one
    read_range(path, start, size)       exactly bytes [start, start + size): one ranged GET
                                        on a bucket, so a reader that wants one tensor of a
                                        large file fetches that tensor, not the file
    files_under(folder)                 every file below a folder or a bucket's prefix
    copy_file(source, target)           one file, streamed, appearing whole or not at all
    copy_files(source, target)          every file below a folder copied below another
    move_folder(source, target)         a rename here; a copy then a delete on a bucket
    staged_folder(folder)               a local folder uploaded to a bucket's `folder` at the end
    join(folder, relative)              folder/relative, '/'-joined and normalized on a bucket
    read_all(path)                      the whole file's bytes: one request on a bucket
    path_kind(path, what)               "file", "folder" or None (not there), local or bucket
                                        (locally "other" too: a device, a pipe)
    FileLookup()                        `path in lookup`: whether a file is there, a bucket's
                                        folder listed once for all the paths asked in it

Each failure is a `PathError` naming the flag, the path and the fix. A cloud
folder (`gs://...`, through etils.epath) has nothing to make: `writable_dir`
probes it by writing and deleting a small object, so a missing bucket or
missing credentials stop the run before its work, naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from monoformer_jax.errors import PathError


def writable_dir(path: str, what: str, flag: str) -> str:
  """`path` as a folder that exists (made if need be) and can be written to."""
  path = os.fspath(path)
  if not path:
    raise PathError(f"{flag} is empty; pass a folder for the {what} (it is made if missing)")
  if "://" in path:  # a bucket: writing is checked by writing; an object there is no folder
    from etils import epath

    if epath.Path(path).is_file():
      raise PathError(
        f"{flag}={path!r} is a file, not a folder; pass a folder for the {what} "
        "(it is made if missing)"
      )
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
  """`path` as a file that can be written: not a folder, in a folder that
  exists (made if need be) and is writable. Checked before the work whose
  results it receives, so they are not lost to a bad path after it. On a
  bucket (`gs://...`) only that it is no folder: writing is checked by writing."""
  path = os.fspath(path)
  if "://" in path:
    from etils import epath

    if epath.Path(path).is_dir():
      raise PathError(
        f"{flag}={path!r} is a folder; pass the path of a file for the {what} "
        "(one in that folder, say)"
      )
    return path
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
  from etils import epath

  path = writable_dir(path, "outputs", flag)
  there = [name for name in outputs if (epath.Path(path) / name).exists()]
  if there and not overwrite:
    raise PathError(
      f"{flag}={path!r} already holds {there}; pass another {flag} or --overwrite to replace them"
    )
  return path


def new_folder_beside(base: str) -> str:
  """`base`, or `base-2`, `base-3`, ... : the first that does not exist yet
  (on this machine or a bucket)."""
  from etils import epath

  candidate, k = base, 1
  while epath.Path(candidate).exists():
    k += 1
    candidate = f"{base}-{k}"
  return candidate


def is_local(path) -> bool:
  """True for a path on this machine's disks, where os, mmap and np.memmap work;
  False for a URL (`gs://bucket/...`), read through epath."""
  return "://" not in os.fspath(path)


def folder_of(path) -> str:
  """`path` if it is a folder, else the folder that holds it (absolute if local)."""
  path = os.fspath(path)
  if is_local(path):
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  from etils import epath

  return path if epath.Path(path).is_dir() else os.path.dirname(path.rstrip("/"))


class _SeekLikeLocal:
  """A bucket's file object whose seek before the start raises OSError, as a
  local file's does (gcsfs raises ValueError), so readers that probe a file
  (zipfile's end-of-archive search on a file of a few bytes) treat both alike."""

  def __init__(self, file):
    self._file = file

  def seek(self, offset: int, whence: int = 0) -> int:
    try:
      return self._file.seek(offset, whence)
    except ValueError as e:
      raise OSError(errno.EINVAL, f"{e}") from e

  def __getattr__(self, name):
    return getattr(self._file, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._file.close()


def open_binary(path):
  """The file `path` opened for reading bytes: local, or on a bucket through epath
  (reads are buffered ranged requests, so a reader that seeks fetches only what
  it reads)."""
  if is_local(path):
    return open(path, "rb")
  from etils import epath

  return _SeekLikeLocal(epath.Path(path).open("rb"))


def file_size(path) -> int:
  """Bytes in the file `path` (local or on a bucket)."""
  if is_local(path):
    return os.path.getsize(path)
  from etils import epath

  return epath.Path(path).stat().length


def read_range(path, start: int, size: int) -> bytes:
  """Bytes [start, start + size) of the file `path`, fewer only at its end.

  On a bucket this is one ranged request for just those bytes (a buffered file
  object would read ahead several MB more)."""
  if size <= 0:
    return b""
  if is_local(path):
    with open(path, "rb") as f:
      f.seek(start)
      return f.read(size)
  import fsspec

  fs, inner = fsspec.core.url_to_fs(os.fspath(path))
  return fs.cat_file(inner, start=start, end=start + size)


def free_bytes(path: str) -> int | None:
  """Free bytes on the disk that holds `path`, or would hold it once made (its
  nearest existing folder); None for a cloud path."""
  path = os.path.abspath(os.fspath(path)) if "://" not in os.fspath(path) else None
  if path is None:
    return None
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


@contextlib.contextmanager
def whole_file(path) -> Iterator[BinaryIO]:
  """A binary file to write `path` with, which appears there whole or not at
  all, so a reader never takes a half-written file for a whole one: locally a
  temporary file beside it renamed on success; on a bucket (`gs://...`, no
  atomic rename there) one object, whose upload is published only when
  closed, and left unfinished when the writing fails."""
  path = os.fspath(path)
  if "://" in path:
    from etils import epath

    f = epath.Path(path).open("wb")
    try:
      yield f
    except BaseException:
      # Left unfinished, an upload is never published (GCS drops it within a
      # week); closing the file, or its finalizer, would publish the part.
      f.closed = True
      raise
    f.close()
    return
  # A name of this writer's own (two processes writing one file never share it),
  # hidden beside the file; data.prepare removes those a killed run left.
  folder, name = os.path.split(path)
  tmp = os.path.join(folder, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
  try:
    with open(tmp, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def files_under(folder) -> list[tuple[str, object]]:
  """(relative name, epath.Path) of every file under `folder`, sorted by name,
  for a local folder or a bucket's prefix alike (walked one level at a time:
  epath refuses `**` on a bucket, and its walk names a bucket's folders
  without their `gs://`)."""
  from etils import epath

  files = []

  def add(here, relative):
    for entry in here.iterdir():
      name = f"{relative}{entry.name}"
      if entry.is_dir():
        add(entry, f"{name}/")
      else:
        files.append((name, entry))

  add(epath.Path(folder), "")
  return sorted(files, key=lambda f: f[0])


def copy_file(source, target):
  """One file copied, streamed in 16 MiB pieces, local or on a bucket on either
  side; the copy appears at `target` whole or not at all (`whole_file`)."""
  from etils import epath

  try:
    with epath.Path(source).open("rb") as src, whole_file(target) as dst:
      shutil.copyfileobj(src, dst, 16 << 20)
  except OSError as e:
    first = (str(e).strip().splitlines() or [""])[0]
    raise PathError(
      f"cannot copy {source} to {target} ({type(e).__name__}: {first}); "
      "check the path, its permissions and the free space"
    ) from e


def copy_files(source, target):
  """Every file under the folder `source` copied to the same name under
  `target` (folders made as needed), one `copy_file` each."""
  from etils import epath

  for name, file in files_under(source):
    (epath.Path(target) / name).parent.mkdir(parents=True, exist_ok=True)
    copy_file(file, epath.Path(target) / name)


def move_folder(source: str, target: str):
  """Moves the folder `source` to `target` (whose parent is made): a rename on
  this machine; on a bucket, where folders are name prefixes and there is no
  rename, each object is copied, then the source's are deleted."""
  if is_local(source) and is_local(target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(source, target)
    return
  from etils import epath

  copy_files(source, target)
  epath.Path(source).rmtree()


@contextlib.contextmanager
def staged_folder(folder: str) -> Iterator[str]:
  """`folder` itself on this machine (made if missing). For a bucket, a local
  temporary folder for writers that only know local files (image savers,
  jax's profiler), whose files are uploaded to `folder`, one object each, when
  the block ends without an error; after an error nothing is uploaded."""
  folder = os.fspath(folder)
  if is_local(folder):
    os.makedirs(folder, exist_ok=True)
    yield folder
    return
  with tempfile.TemporaryDirectory(prefix="staged_") as local:
    yield local
    copy_files(local, folder)


# ----------------------------------------------------------- inputs named relative to a folder


def join(folder, relative: str) -> str:
  """`folder`/`relative`: os.path.join locally (as it always was); on a bucket
  '/'-joined and normalized ("./a", "x/../a" -> "a"), since an object's name is
  taken literally there ("root/./a" is no object "root/a")."""
  folder = os.fspath(folder)
  if is_local(folder):
    return os.path.join(folder, relative)
  scheme, rest = folder.split("://", 1)
  bucket, _, inside = rest.partition("/")
  inner = posixpath.normpath(posixpath.join("/", inside, relative)).lstrip("/")
  return f"{scheme}://{bucket}/{inner}" if inner else f"{scheme}://{bucket}"


class FileLookup:
  """Whether files exist, asked of many paths (an annotation file's images):
  `path in lookup`. Locally os.path.isfile, one cheap call each; on a bucket
  each folder is listed once, when a path in it is first asked about (one
  request per 1000 names), so a million images cost a thousand requests, not
  a million."""

  def __init__(self):
    self._listed: dict[str, frozenset[str]] = {}

  def __contains__(self, path) -> bool:
    path = os.fspath(path)
    if is_local(path):
      return os.path.isfile(path)
    folder, name = path.rsplit("/", 1)
    if folder not in self._listed:
      self._listed[folder] = frozenset(_files_in(folder))
    return name in self._listed[folder]


def _files_in(folder: str) -> list[str]:
  """The names of the files (not subfolders) directly in the bucket folder `folder`."""
  import fsspec

  fs, inner = fsspec.core.url_to_fs(folder)
  try:
    entries = fs.ls(inner, detail=True)
  except FileNotFoundError:
    return []
  finally:
    fs.invalidate_cache(inner)  # gcsfs keeps every listing's details: GBs for millions
  inside = inner.rstrip("/") + "/"
  return [
    e["name"][len(inside) :]
    for e in entries
    if e.get("type") == "file" and e["name"].startswith(inside)
  ]


def read_all(path) -> bytes:
  """The bytes of the file `path`: on a bucket one GET (epath's read_bytes asks
  for the object's size first, and an existence check before it costs more:
  eight requests an image where this is one). FileNotFoundError if it is not
  there (a bucket's "folder" is no object: not there either)."""
  if is_local(path):
    with open(path, "rb") as f:
      return f.read()
  import fsspec

  fs, inner = fsspec.core.url_to_fs(os.fspath(path))
  return fs.cat_file(inner)


def path_kind(path, what: str) -> str | None:
  """The kind of the input `path`: "file", "folder", None (nothing there) or,
  locally, "other" (a device, a pipe); `what` names it in errors. On a bucket a path the
  storage client cannot ask about (no bucket name, no access) is a PathError
  naming it, not the client's traceback."""
  path = os.fspath(path)
  if is_local(path):
    if os.path.isfile(path) or os.path.isdir(path):
      return "file" if os.path.isfile(path) else "folder"
    return "other" if os.path.exists(path) else None
  from etils import epath

  where = epath.Path(path)
  try:
    return "file" if where.is_file() else "folder" if where.is_dir() else None
  except Exception as e:  # the storage client's own errors, not only OSError
    why = " ".join(str(e).split())[:200] or type(e).__name__
    raise PathError(
      f"{what}={path!r} cannot be looked up ({type(e).__name__}: {why}); check the bucket's "
      "name and that this machine's credentials may read it"
    ) from e
