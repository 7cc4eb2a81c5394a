"""One run per workdir: a lock file naming the run that holds it.

    lock = workdir_lock(workdir)   # a FileLock for a local folder, a CloudLock for gs://
    lock.acquire()                 # PathError naming the owner when another run holds it
    lock.release()                 # removes it if it is still this run's; safe to call twice

`WORKDIR/run.lock` is created atomically (O_CREAT | O_EXCL) and holds JSON:
the owner's host, pid, the process's start time (so a pid the system gave to
another process since is not taken for the owner), when it started and its
command line. A lock left by a run that died without releasing it (SIGKILL, a
power cut) is stale when its host is this one and its process is gone: it is
named in a warning and taken over. A lock from another host cannot be checked
for liveness from here: it is refused, and the message says to delete the file
if that run has ended.

In a bucket (`gs://...`) the same record is the object `WORKDIR/run.lock`,
created only if absent (an upload with the precondition "generation 0",
which GCS applies atomically); it is released by deleting it only if its
generation is still the one this run wrote. Staleness is judged as above.
(The local GCS emulator the tests use ignores preconditions: the lock is
also looked for before the upload, which catches any run that is not
starting in the same instant.)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import time
import uuid

from absl import logging

from monoformer_jax.errors import PathError

LOCK_NAME = "run.lock"


def workdir_lock(workdir: str) -> FileLock | CloudLock | None:
  """The lock of `workdir` for its backend (a gs:// bucket, a file system);
  None (with a warning) for another scheme, which has none yet."""
  workdir = os.fspath(workdir)
  if workdir.startswith("gs://"):
    return CloudLock(workdir)
  if "://" in workdir:
    logging.warning(
      "--workdir=%s: runs are locked on a local disk or in gs:// only, so nothing stops a "
      "second run in this one; start one run per workdir",
      workdir,
    )
    return None
  return FileLock(workdir)


def _new_record() -> dict:
  """What a lock says of the run that holds it; `token` tells its owner."""
  return dict(
    host=socket.gethostname(),
    pid=os.getpid(),
    process_start=_process_start(os.getpid()),
    since=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    command=" ".join(getattr(sys, "orig_argv", sys.argv)),
    token=uuid.uuid4().hex,
  )


def _is_record(owner) -> bool:
  return (
    isinstance(owner, dict)
    and isinstance(owner.get("host"), str)
    and type(owner.get("pid")) is int
    and owner["pid"] > 0
  )


def _refuse_unless_stale(directory: str, path: str, owner: dict, record: dict):
  """Raises for a lock another run holds (or may hold); returns when it is
  stale (its run, on this host, is gone), after a warning."""
  if owner["host"] != record["host"]:
    raise PathError(
      f"--workdir={directory!r} is locked by {_describe(owner)}: a run on another "
      f"host, which this one cannot check. If that run has ended, delete {path} and "
      "rerun; else pass another --workdir"
    )
  if _alive(owner):
    same = " (this same process)" if owner["pid"] == record["pid"] else ""
    raise PathError(
      f"--workdir={directory!r} is in use by another run: {_describe(owner)}{same}. "
      f"Wait for it to end (or stop it), or pass another --workdir; {path} names it"
    )
  logging.warning("%s was left by a run that is gone (%s): taking it over", path, _describe(owner))


def _process_start(pid: int) -> str | None:
  """When process `pid` started, as `boot id:clock ticks since boot` (Linux's
  /proc), or None where that cannot be read (another system, no such pid)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
    with open("/proc/sys/kernel/random/boot_id") as f:
      boot = f.read().strip()
  except OSError:
    return None
  # Field 22 is the start time; the command name (field 2) may hold spaces and
  # parentheses, so the fields are counted from its closing one.
  return f"{boot}:{stat.rpartition(')')[2].split()[19]}"


def _alive(owner: dict) -> bool:
  """Whether the owner's process (on this host) is still running."""
  pid = owner["pid"]
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process: alive
  recorded, now = owner.get("process_start"), _process_start(pid)
  return not (recorded and now and recorded != now)  # else the pid was reused


def _describe(owner: dict) -> str:
  return (
    f"pid {owner['pid']} on host {owner['host']} since {owner.get('since', '?')} "
    f"({owner.get('command') or 'command unknown'})"
  )


@contextlib.contextmanager
def _one_taker_at_a_time(directory: str):
  """Serialises the runs on this host that read, judge and replace the lock:
  two that both found the same stale lock must not both take it over (the
  second would remove the first's new lock). Runs on other hosts never take
  over this host's lock, and O_EXCL keeps them from creating over it."""
  try:
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
  except (ImportError, OSError):  # no flock here (Windows): O_EXCL alone
    yield
    return
  try:
    with contextlib.suppress(OSError):  # a file system without flock: O_EXCL alone
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # closing releases the flock


class FileLock:
  """`DIR/run.lock` on a local (or mounted) file system."""

  def __init__(self, directory: str):
    self.directory = os.fspath(directory)
    self.path = os.path.join(self.directory, LOCK_NAME)
    self.record: dict | None = None  # this run's, while it holds the lock

  def acquire(self):
    record = _new_record()
    with _one_taker_at_a_time(self.directory):
      for _ in range(3):  # another run may remove or create it between our calls
        try:
          fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
          fd = None  # judged below, so that a refusal does not carry this error along
        except OSError as e:
          raise PathError(
            f"--workdir={self.directory!r}: cannot create the lock file {self.path} "
            f"({e.strerror or e}); pass a folder you can write to"
          ) from e
        if fd is None:
          owner = self._owner()
          if owner is not None:
            self._refuse_or_clear(owner, record)
          continue
        with os.fdopen(fd, "w") as f:
          json.dump(record, f)
          f.flush()
          os.fsync(f.fileno())
        self.record = record
        return
    raise PathError(
      f"--workdir={self.directory!r}: another run keeps creating and removing {self.path}; "
      "start one run per workdir"
    )

  def _owner(self) -> dict | None:
    """The lock's record; None if it vanished. A file still empty or partial
    is read again for half a second (its owner is writing it), then refused."""
    for attempt in range(5):
      try:
        with open(self.path) as f:
          text = f.read()
      except FileNotFoundError:
        return None
      except OSError as e:
        text, why = "", e.strerror or str(e)
      else:
        why = "not the JSON record of a run"
        try:
          owner = json.loads(text)
          if _is_record(owner):
            return owner
        except ValueError:
          pass
      if attempt < 4:
        time.sleep(0.1)
    raise PathError(
      f"--workdir={self.directory!r} holds a lock file {self.path} that cannot be read "
      f"({why}{f': {text[:80]!r}' if text else ''}); if no run is using this workdir, "
      "delete that file and rerun"
    )

  def _refuse_or_clear(self, owner: dict, record: dict):
    """Raises for a lock another run holds (or may hold); removes a stale one."""
    _refuse_unless_stale(self.directory, self.path, owner, record)
    with contextlib.suppress(FileNotFoundError):
      os.remove(self.path)

  def release(self):
    """Removes the lock if it is still this run's (someone may have deleted
    it and another run taken it since); a no-op when not held."""
    if self.record is None:
      return
    mine, self.record = self.record, None
    try:
      with open(self.path) as f:
        owner = json.load(f)
    except (OSError, ValueError):
      owner = None
    if isinstance(owner, dict) and owner.get("token") == mine["token"]:
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)
    else:
      logging.warning(
        "%s is no longer this run's lock (removed or replaced while it ran): left as it is",
        self.path,
      )


class CloudLock:
  """`gs://BUCKET/DIR/run.lock`, an object created only if absent."""

  def __init__(self, directory: str):
    self.directory = os.fspath(directory).rstrip("/")
    self.path = f"{self.directory}/{LOCK_NAME}"
    bucket, _, name = self.path.removeprefix("gs://").partition("/")
    self._bucket, self._name = bucket, name
    self.generation: int | None = None  # of the object this run wrote, while it holds it
    self.token: str | None = None

  def _blob(self):
    from google.cloud import storage

    return storage.Client().bucket(self._bucket).blob(self._name)

  def _failed(self, doing: str, e: Exception) -> PathError:
    return PathError(
      f"--workdir={self.directory!r}: cannot {doing} the lock {self.path} "
      f"({_first_words(e)}); check that the bucket exists and that this machine's "
      "credentials may write to it"
    )

  def acquire(self):
    from google.api_core import exceptions

    record = _new_record()
    for _ in range(3):  # another run may remove or create it between our calls
      try:
        owner = self._owner()
        if owner is None:
          blob = self._blob()
          blob.upload_from_string(
            json.dumps(record), content_type="application/json", if_generation_match=0
          )
          self.generation, self.token = blob.generation, record["token"]
          return
      except exceptions.PreconditionFailed:
        continue  # created by another run since we looked: judged on the next pass
      except PathError:
        raise
      except Exception as e:
        raise self._failed("create", e) from e
      _refuse_unless_stale(self.directory, self.path, owner, record)
      with contextlib.suppress(Exception):  # only the stale generation we read
        self._blob().delete(if_generation_match=owner["generation"])
    raise PathError(
      f"--workdir={self.directory!r}: another run keeps creating and removing {self.path}; "
      "start one run per workdir"
    )

  def _owner(self) -> dict | None:
    """The lock's record with its `generation`; None when there is no lock."""
    from google.api_core import exceptions

    blob = self._blob()
    try:
      text = blob.download_as_text()
    except exceptions.NotFound:
      return None
    try:
      owner = json.loads(text)
    except ValueError:
      owner = None
    if not _is_record(owner):
      raise PathError(
        f"--workdir={self.directory!r} holds a lock {self.path} that cannot be read "
        f"(not the JSON record of a run: {text[:80]!r}); if no run is using this workdir, "
        "delete that object and rerun"
      )
    return dict(owner, generation=blob.generation)

  def release(self):
    """Deletes the lock if its generation is still this run's; a no-op when
    not held. A failure (the bucket unreachable) is logged, not raised: the
    run's own outcome is what its caller is waiting for."""
    if self.generation is None:
      return
    generation, self.generation = self.generation, None
    from google.api_core import exceptions

    try:
      # The token too: a server that ignores preconditions (the emulator) is
      # kept from deleting another run's lock but for a write in between.
      owner = json.loads(self._blob().download_as_text())
      if not isinstance(owner, dict) or owner.get("token") != self.token:
        raise exceptions.PreconditionFailed("another run's record")
      self._blob().delete(if_generation_match=generation)
    except (exceptions.NotFound, exceptions.PreconditionFailed, ValueError):
      logging.warning(
        "%s is no longer this run's lock (removed or replaced while it ran): left as it is",
        self.path,
      )
    except Exception as e:
      logging.error(
        "could not remove the lock %s (%s): the next run on this host takes it over; "
        "from another host, delete it first",
        self.path,
        _first_words(e),
      )


def _first_words(e: Exception) -> str:
  return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
