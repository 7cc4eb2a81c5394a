"""Training with `--workdir=gs://...` against a real GCS-protocol server on
localhost (conftest's `gcs_server`): checkpoints, resume, metrics.jsonl,
TensorBoard events and the workdir's lock all live in the bucket."""

import json
import os
import socket

import numpy as np
import pytest
from etils import epath
from helpers import digits_config, on_one_device, tensorboard_scalars

from monoformer_jax import lock
from monoformer_jax.errors import PathError
from monoformer_jax.paths import files_under, staged_folder, writable_dir
from monoformer_jax.train.loop import REPLACED_METRICS, train_and_evaluate


def _rows(path) -> list[dict]:
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines()]


def _losses(rows) -> dict:
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.timeout(240)
def test_a_run_in_a_bucket_resumes_with_the_curve_of_an_uninterrupted_one(gcs_path, tmp_path):
  run = lambda workdir, steps: train_and_evaluate(
    digits_config(num_steps=steps, log_every=1, checkpoint_every=2, profile_steps=1),
    workdir,
    sample_at_end=False,
  )
  with on_one_device():
    run(str(tmp_path), 6)  # the reference: uninterrupted, on a local disk
    run(gcs_path, 4)
    bucket = epath.Path(gcs_path)
    assert sorted(p.name for p in (bucket / "checkpoints").iterdir()) == ["2", "4"]
    assert not (bucket / lock.LOCK_NAME).exists()  # released at the end
    # As if the run had been killed after logging step 4 but before committing it.
    (bucket / "checkpoints" / "4").rmtree()
    run(gcs_path, 6)
  expected = _losses(_rows(tmp_path / "metrics.jsonl"))
  rows = _rows(bucket / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # each step once
  got = _losses(rows)
  np.testing.assert_allclose([got[s] for s in expected], list(expected.values()), rtol=1e-6)
  # The rows of steps 3 and 4 the first run logged past its last checkpoint, set aside.
  assert [r["step"] for r in _rows(bucket / REPLACED_METRICS)] == [3, 4]
  # TensorBoard shows what metrics.jsonl holds, read back from the bucket.
  board = tensorboard_scalars(bucket / "tensorboard")
  assert [s for s, _ in board["loss"]] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose(
    [v for _, v in board["loss"]], [got[s] for s in range(1, 7)], rtol=1e-6
  )
  # jax's profiler writes local files: the trace of step 3 was uploaded.
  assert any(name.endswith(".xplane.pb") for name, _ in files_under(bucket / "profile"))
  # Step 4 saved again, by the resumed run.
  assert sorted(p.name for p in (bucket / "checkpoints").iterdir()) == ["2", "4", "6"]


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
