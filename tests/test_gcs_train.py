"""Training with `--workdir=gs://...` against a real GCS-protocol server on
localhost (conftest's `gcs_server`): checkpoints, resume, metrics.jsonl,
TensorBoard events and the workdir's lock all live in the bucket."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import gcs_env, start_gcs_server
from etils import epath
from helpers import (
  TINY_CONFIG_FLAG,
  digits_config,
  on_one_device,
  one_device_env,
  tensorboard_scalars,
)

from monoformer_jax import lock
from monoformer_jax.errors import PathError
from monoformer_jax.paths import files_under, staged_folder, writable_dir
from monoformer_jax.train.loop import REPLACED_METRICS, train_and_evaluate


def _rows(path) -> list[dict]:
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines()]


def _losses(rows) -> dict:
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _plant_lock(gcs_path, **record):
  record = {
    **dict(host=socket.gethostname(), pid=os.getpid(), since="then", command="first"),
    **record,
  }
  path = epath.Path(gcs_path) / lock.LOCK_NAME
  path.write_text(json.dumps(record))
  return path


@pytest.mark.timeout(60)
def test_a_second_run_in_a_locked_bucket_workdir_is_refused_in_one_line(gcs_path):
  path = _plant_lock(gcs_path)  # this live process holds it
  with pytest.raises(PathError) as refused:
    train_and_evaluate(digits_config(num_steps=2), gcs_path, sample_at_end=False)
  message = str(refused.value)
  assert "\n" not in message and "is in use by another run" in message and gcs_path in message
  assert json.loads(path.read_text())["command"] == "first"  # left as it was
  assert sorted(p.name for p in epath.Path(gcs_path).iterdir()) == [lock.LOCK_NAME]

  # From another host: not checkable from here, refused naming the object to delete.
  _plant_lock(gcs_path, host="elsewhere")
  with pytest.raises(PathError, match=f"a run on another host.*delete {path}"):
    lock.workdir_lock(gcs_path).acquire()


@pytest.mark.timeout(60)
def test_the_bucket_lock_takes_over_a_stale_one_and_releases_only_its_own(gcs_path, caplog):
  path = _plant_lock(gcs_path, pid=2**22 + 12345)  # no such process on this host
  held = lock.workdir_lock(gcs_path)
  assert isinstance(held, lock.CloudLock)
  held.acquire()
  assert "left by a run that is gone" in caplog.text
  mine = json.loads(path.read_text())
  assert mine["pid"] == os.getpid() and mine["command"] != "first"
  held.release()
  assert not path.exists()
  held.release()  # twice is safe
  # A lock replaced while the run held it (deleted by hand, taken by another run)
  # is someone else's: left alone.
  held.acquire()
  other = _plant_lock(gcs_path, token="another run's")
  held.release()
  assert json.loads(other.read_text())["token"] == "another run's"


@pytest.mark.timeout(60)
def test_a_missing_bucket_is_refused_before_the_run_in_one_line(gcs_server):
  with pytest.raises(PathError) as refused:
    writable_dir("gs://no-such-bucket/run", "checkpoints", "--workdir")
  message = str(refused.value)
  assert "\n" not in message and "gs://no-such-bucket/run" in message
  assert "bucket exists" in message


@pytest.mark.timeout(60)
def test_samples_for_a_bucket_are_written_locally_then_uploaded_whole(gcs_path):
  outdir = f"{gcs_path}/samples"
  with staged_folder(outdir) as local:
    assert not local.startswith("gs:") and os.path.isdir(local)
    os.makedirs(os.path.join(local, "interleaved"))
    with open(os.path.join(local, "text.txt"), "w") as f:
      f.write("a -> b\n")
    with open(os.path.join(local, "interleaved", "0.png"), "wb") as f:
      f.write(bytes(range(256)))
  assert not os.path.exists(local)  # the staging folder is gone
  bucket = epath.Path(outdir)
  assert (bucket / "text.txt").read_text() == "a -> b\n"
  assert (bucket / "interleaved" / "0.png").read_bytes() == bytes(range(256))
  assert not os.path.exists("gs:")  # no local folder named after the scheme
  # An error inside uploads nothing (the samples are redone by the next run).
  with pytest.raises(RuntimeError), staged_folder(f"{gcs_path}/failed") as local:
    open(os.path.join(local, "half.npz"), "w").close()
    raise RuntimeError("killed")
  assert not epath.Path(f"{gcs_path}/failed/half.npz").exists()


def test_an_unreadable_step_in_a_bucket_is_moved_aside_and_the_one_before_resumed(gcs_path):
  """As on a local disk: the broken step goes to `<dir>_unreadable/` (copied
  and deleted: a bucket has no rename), so a new save can take its number."""
  from etils import epath
  from test_failures import _restore_toy, _toy_checkpoints, _toy_state

  from monoformer_jax.checkpoints import TrainCheckpointer

  c = f"{gcs_path}/checkpoints"
  _toy_checkpoints(c, [1])
  with TrainCheckpointer(c, keep=3, save_every=1) as ckpt:  # valid JSON, no data state
    ckpt.save(2, _toy_state(2.0, 2), {"shards": 1}, digits_config())
  files = _names_under(epath.Path(c) / "2")
  assert _restore_toy(c) == (1, 1.0, {"shards": 1, "next_example": {"0": 10}})
  assert [p.name for p in epath.Path(c).iterdir() if p.is_dir()] == ["1"]
  aside = epath.Path(f"{c}_unreadable") / "2"
  assert _names_under(aside) == files
  _toy_checkpoints(c, [2])  # the resumed run saves step 2 again
  assert _restore_toy(c)[:2] == (2, 2.0)


def _names_under(folder) -> list[str]:
  return [name for name, _ in files_under(folder)]


STEPS = 10


def _train_in_bucket(url: str, steps: int, log, *flags) -> subprocess.Popen:
  """`python -m monoformer_jax.train` with its workdir in the server's bucket,
  the storage clients' retries cut to about a second (tests/short_retries.py)."""
  return subprocess.Popen(
    [
      sys.executable,
      os.path.join(os.path.dirname(__file__), "short_retries.py"),
      "monoformer_jax.train",
      TINY_CONFIG_FLAG,
      "--workdir=gs://bucket/run",
      f"--config.train.num_steps={steps}",
      "--config.train.checkpoint_every=4",
      "--config.train.log_every=1",
      # No end-of-run samples: only the finished run gets there, and its samples
      # are not what is tested here.
      "--config.sample.num_per_class=0",
      "--config.sample.text_prompts=()",
      *flags,
    ],
    env=one_device_env(JAX_PLATFORMS="cpu", **gcs_env(url)),
    stdout=log,
    stderr=subprocess.STDOUT,
  )


def _stored_rows(path) -> list[dict]:
  """The JSON rows of an object, read from the server's files (not through it)."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return []
  return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def _wait_for_step(proc, metrics, step: int, seconds: float = 120, committed=None):
  """Until `step` is logged (and the step `committed` has its commit marker)."""
  deadline = time.time() + seconds
  marker = None if committed is None else metrics.parent / "checkpoints" / str(committed)
  while not (
    any(r["step"] >= step for r in _stored_rows(metrics))
    and (marker is None or (marker / "commit_success.txt").exists())
  ):
    assert proc.poll() is None, "training ended before the step"
    assert time.time() < deadline, f"step {step} not logged within {seconds} s"
    time.sleep(0.05)


@pytest.mark.timeout(300)
def test_a_bucket_run_killed_then_cut_off_keeps_its_committed_steps_and_resumes(tmp_path):
  """A run in a bucket is SIGKILLed mid-run; the next resumes and loses its
  bucket mid-run (the server stopped): it ends with one line naming the path,
  every committed step intact. With the server back, a third run takes over
  the lock left behind, removes the uncommitted save and finishes. Every step
  is logged once, the rows the cut-off runs logged past their last checkpoint
  (moved aside) equal the final run's, and the curve is a local uninterrupted
  run's. (A SIGTERM's save is the checkpointer's ordinary save: the
  preemption itself is tested on a local disk, test_train.py.)"""
  store = tmp_path / "store"  # the server's objects, on disk, readable while it is down
  server, url = start_gcs_server(store)
  run = store / ".cloudstorage" / "bucket" / "run"
  metrics = run / "metrics.jsonl"
  logs = [open(tmp_path / f"log_{i}", "w+") for i in range(3)]

  def output(i):
    logs[i].seek(0)
    return logs[i].read()

  try:
    killed = _train_in_bucket(url, STEPS, logs[0], "--config.train.profile_steps=1")
    try:
      _wait_for_step(killed, metrics, 6, committed=4)
    finally:
      killed.kill()  # possibly during a save, or while metrics.jsonl is uploaded
      killed.wait(timeout=60)

    cut_off = _train_in_bucket(url, STEPS, logs[1])
    try:
      _wait_for_step(cut_off, metrics, STEPS - 1)
    finally:
      server.stop()
      cut_off.wait(timeout=120)
    # One line, ours (status 2: a UserError, not a crash); the storage clients and
    # Orbax log their own retries and tracebacks above it.
    assert cut_off.returncode == 2, output(1)[-3000:]
    (error,) = [line for line in output(1).splitlines() if line.startswith("error: ")]
    # Whichever write found the bucket gone first (a save, metrics.jsonl) is named.
    assert "gs://bucket/run/" in error and "can be reached" in error, error
    kept = sorted(int(p.parent.name) for p in (run / "checkpoints").glob("*/commit_success.txt"))
    assert kept[-1] >= 4 and ("committed steps" not in error or f"{kept}, are intact" in error)

    server, url = start_gcs_server(store, port=int(url.rsplit(":", 1)[1]))
    finished = _train_in_bucket(url, STEPS, logs[2])
    assert finished.wait(timeout=180) == 0, output(2)[-3000:]
    assert "resumed from gs://bucket/run/checkpoints step 4" in output(1)  # after the kill
    assert f"resumed from gs://bucket/run/checkpoints step {kept[-1]}" in output(2)
    assert "left by a run that is gone" in output(2)  # the cut-off run's lock
  finally:
    server.stop()
    for log in logs:
      log.close()
  rows = _stored_rows(metrics)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  final = {r["step"]: r["loss"] for r in rows}
  aside = _stored_rows(run / REPLACED_METRICS)
  assert aside, "the killed and cut-off runs logged nothing past their checkpoints"
  for row in aside:
    np.testing.assert_allclose(row["loss"], final[row["step"]], rtol=1e-6, err_msg=row)
  # The curve of an uninterrupted run on a local disk.
  with on_one_device():
    train_and_evaluate(
      digits_config(num_steps=STEPS, checkpoint_every=4),
      str(tmp_path / "local"),
      sample_at_end=False,
    )
  expected = _losses(_rows(tmp_path / "local" / "metrics.jsonl"))
  np.testing.assert_allclose(list(final.values()), list(expected.values()), rtol=1e-6)
  # TensorBoard shows what metrics.jsonl holds.
  board = tensorboard_scalars(run / "tensorboard")
  assert [s for s, _ in board["loss"]] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([v for _, v in board["loss"]], list(final.values()), rtol=1e-6)
  # jax's profiler writes local files: the first run's trace (step 3) was uploaded.
  assert list((run / "profile").rglob("*.xplane.pb"))
  # Every step left is a committed save (the server's store keeps empty folders).
  steps = [p for p in (run / "checkpoints").iterdir() if any(f.is_file() for f in p.rglob("*"))]
  assert steps and all((p / "commit_success.txt").exists() for p in steps), steps


def test_a_killed_save_in_a_bucket_is_removed_at_the_next_start(gcs_path, caplog):
  """On a bucket Orbax writes step N in place and marks it whole with
  `commit_success.txt`, written last; a step without it (the save was killed)
  is never resumed from, and is removed, named, when the next run starts."""
  from test_failures import _restore_toy, _toy_checkpoints

  c = f"{gcs_path}/checkpoints"
  _toy_checkpoints(c, [1, 2])
  (epath.Path(c) / "2" / "commit_success.txt").unlink()  # as if killed before its commit
  with caplog.at_level(logging.WARNING, logger="absl"):
    assert _restore_toy(c) == (1, 1.0, {"shards": 1, "next_example": {"0": 10}})
  assert f"removing {c}/2: a save that never committed" in caplog.text
  assert not (epath.Path(c) / "2").exists() and (epath.Path(c) / "1").exists()
  _toy_checkpoints(c, [2])  # the resumed run saves step 2 again
  assert _restore_toy(c)[:2] == (2, 2.0)
