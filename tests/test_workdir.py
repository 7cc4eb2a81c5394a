"""One run per workdir, and what a run leaves on disk however it ends.

The lock (lock.py): a live owner is refused before anything is written, a
stale one is named and taken over, another host's and an unreadable one are
refused and left alone. Two real runs in one workdir: the second refuses; the
first, SIGKILLed mid-way and resumed, leaves one metrics row per step (in
metrics.jsonl and as TensorBoard shows the events) with the replaced rows
kept aside. Ctrl-C waits for the save in flight; a SIGTERM during the set-up
or the end-of-run samples stops the run at once; every exit releases the lock
and puts the SIGTERM handler back.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import pytest
from helpers import digits_config, tensorboard_scalars

from monoformer_jax import inference, lock
from monoformer_jax.checkpoints import load_params
from monoformer_jax.errors import PathError
from monoformer_jax.train import loop
from monoformer_jax.train.loop import train_and_evaluate

HOST = socket.gethostname()
SINCE = "2026-01-02T03:04:05+00:00"


def _owner(pid: int, **fields) -> dict:
  """A lock record as another run would have written it."""
  record = dict(
    host=HOST,
    pid=pid,
    process_start=lock._process_start(pid),
    since=SINCE,
    command="python -m monoformer_jax.train --workdir=...",
    token="theirs",
  )
  return dict(record, **fields)


def _steps_logged(workdir, name="metrics.jsonl"):
  return [json.loads(line)["step"] for line in (workdir / name).read_text().splitlines()]


def _committed(workdir):
  folder = workdir / "checkpoints"
  return (
    sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
  )


@pytest.fixture
def sigterm_handler():
  """A handler of the test's own, which every run must put back when it ends."""

  def before(*_):
    pytest.fail("the run's SIGTERM handler was not in place")

  previous = signal.signal(signal.SIGTERM, before)
  yield before
  signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- the lock


def test_a_run_refuses_a_workdir_that_a_live_run_holds_and_writes_nothing(tmp_path):
  path = tmp_path / "run.lock"
  path.write_text(json.dumps(_owner(os.getppid())))  # pytest's parent: alive
  before = path.read_bytes()
  with pytest.raises(PathError) as caught:
    train_and_evaluate(digits_config(num_steps=2), str(tmp_path))
  message = str(caught.value)
  assert "\n" not in message
  assert message.startswith(
    f"--workdir={str(tmp_path)!r} is in use by another run: pid {os.getppid()} on host {HOST} "
    f"since {SINCE} (python -m monoformer_jax.train --workdir=...). Wait for it to end"
  )
  assert "or pass another --workdir" in message and caught.value.__context__ is None
  assert os.listdir(tmp_path) == ["run.lock"] and path.read_bytes() == before


def test_a_runs_checkpoints_folder_given_as_its_workdir_is_refused(tmp_path):
  """--workdir=RUN/checkpoints trained afresh in RUN/checkpoints/checkpoints
  instead of resuming; it is refused, naming the run's workdir."""
  checkpoints = tmp_path / "checkpoints"
  (checkpoints / "2").mkdir(parents=True)
  (checkpoints / "4").mkdir()
  before = sorted(os.listdir(checkpoints))
  with pytest.raises(PathError) as caught:
    train_and_evaluate(digits_config(num_steps=2), str(checkpoints))
  assert str(caught.value) == (
    f"--workdir={str(checkpoints)!r} holds checkpoint steps [2, 4] itself: it is a run's "
    "checkpoints folder, and a run there would start afresh; pass the run's workdir "
    f"(--workdir={tmp_path}) to resume it"
  )
  assert sorted(os.listdir(checkpoints)) == before  # no lock, no metrics, nothing


@pytest.mark.parametrize("gone", ["exited", "pid reused"])
def test_a_stale_lock_of_this_host_is_named_and_taken_over(tmp_path, caplog, gone):
  if gone == "exited":
    ended = subprocess.Popen(["true"])
    ended.wait()
    stale = _owner(ended.pid)
  else:  # the pid is alive, but it is another process than the one that wrote the lock
    if lock._process_start(os.getpid()) is None:
      pytest.skip("no /proc: a reused pid cannot be told apart here")
    stale = _owner(os.getppid(), process_start="another boot:1")
  path = tmp_path / "run.lock"
  path.write_text(json.dumps(stale))
  held = lock.workdir_lock(str(tmp_path))
  with caplog.at_level(logging.WARNING, logger="absl"):
    held.acquire()
  assert f"{path} was left by a run that is gone (pid {stale['pid']} on host {HOST}" in caplog.text
  mine = json.loads(path.read_text())
  assert (mine["host"], mine["pid"]) == (HOST, os.getpid()) and mine["token"] != "theirs"
  assert mine["process_start"] == lock._process_start(os.getpid())
  # Held now: another taker (here this same process) is refused.
  with pytest.raises(PathError, match=r"in use by another run: .*\(this same process\)"):
    lock.workdir_lock(str(tmp_path)).acquire()
  held.release()
  held.release()  # twice is harmless
  assert not path.exists()
  # A lock replaced while the run held it (deleted by hand, then taken by
  # another run) is not the run's to remove.
  held.acquire()
  path.write_text(json.dumps(_owner(os.getppid())))
  held.release()
  assert json.loads(path.read_text())["token"] == "theirs"


def test_another_hosts_lock_or_an_unreadable_one_is_refused_and_left_alone(tmp_path, caplog):
  path = tmp_path / "run.lock"
  path.write_text(json.dumps(_owner(os.getpid(), host="elsewhere-7")))  # alive here, not there
  with pytest.raises(PathError) as caught:
    lock.workdir_lock(str(tmp_path)).acquire()
  assert str(caught.value) == (
    f"--workdir={str(tmp_path)!r} is locked by pid {os.getpid()} on host elsewhere-7 since "
    f"{SINCE} (python -m monoformer_jax.train --workdir=...): a run on another host, which "
    f"this one cannot check. If that run has ended, delete {path} and rerun; else pass "
    "another --workdir"
  )
  assert json.loads(path.read_text())["host"] == "elsewhere-7"
  for text in ('{"host": "h", "pid": ', '{"host": "h", "pid": 0}', "[]"):
    path.write_text(text)  # cut short, or no process of its own
    with pytest.raises(PathError, match=r"cannot be read \(not the JSON record of a run: "):
      lock.workdir_lock(str(tmp_path)).acquire()
    assert path.read_text() == text
  # A scheme with no lock backend takes none, and says so (gs:// has one: test_gcs_train.py).
  with caplog.at_level(logging.WARNING, logger="absl"):
    assert lock.workdir_lock("s3://bucket/run") is None
  assert "nothing stops a second run" in caplog.text


# ------------------------------------------------------------- metrics


def test_the_rows_past_the_starting_step_are_moved_aside_whole(tmp_path, caplog):
  """A killed run's rows past its checkpoint, a line it cut short and a row
  that is no row go to metrics_replaced.jsonl, after what an earlier resume
  put there; metrics.jsonl keeps the rest, in order."""
  rows = [json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 6)]
  path, aside = tmp_path / "metrics.jsonl", tmp_path / "metrics_replaced.jsonl"
  aside.write_text('{"step": 9}\n')
  path.write_text("".join(rows[:3]) + '{"step": "x"}\n' + "".join(rows[3:]) + '{"step": 6, "lo')
  with caplog.at_level(logging.WARNING, logger="absl"):
    loop._set_aside_rows_after(str(path), 2, str(aside))
  assert path.read_text() == "".join(rows[:2])
  assert aside.read_text() == (
    '{"step": 9}\n' + rows[2] + '{"step": "x"}\n' + "".join(rows[3:]) + '{"step": 6, "lo\n'
  )
  assert f"{path}: moved 5 rows past step 2, where this run starts" in caplog.text
  loop._set_aside_rows_after(str(path), 2, str(aside))  # nothing past 2: nothing moves
  assert path.read_text() == "".join(rows[:2]) and aside.read_text().count("\n") == 6
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "metrics_replaced.jsonl"]


@pytest.mark.parametrize("blocked", ["metrics.jsonl", "tensorboard"])
def test_a_metrics_path_that_cannot_be_written_stops_the_run_before_the_compile(
  tmp_path, caplog, blocked, one_device
):
  (tmp_path / blocked).mkdir() if blocked.endswith(".jsonl") else (tmp_path / blocked).touch()
  with caplog.at_level(logging.INFO, logger="absl"), pytest.raises(PathError) as caught:
    train_and_evaluate(digits_config(num_steps=2), str(tmp_path), sample_at_end=False)
  assert str(caught.value).startswith(f"cannot write the metrics to {tmp_path / blocked}")
  assert "\n" not in str(caught.value) and "compiling the train step" not in caplog.text
  assert not (tmp_path / "run.lock").exists() and _committed(tmp_path) == []


# ------------------------------------------------- every exit of a run


def test_an_error_in_the_set_up_releases_the_lock_and_the_sigterm_handler(
  tmp_path, monkeypatch, sigterm_handler, one_device
):
  def broken(*_, **__):
    raise RuntimeError("the data source broke")

  monkeypatch.setattr(loop, "make_batches", broken)
  with pytest.raises(RuntimeError, match="the data source broke"):
    train_and_evaluate(digits_config(num_steps=2), str(tmp_path), sample_at_end=False)
  assert signal.getsignal(signal.SIGTERM) is sigterm_handler
  assert not (tmp_path / "run.lock").exists()
  assert _committed(tmp_path) == [] and _steps_logged(tmp_path) == []


def test_sigterm_during_the_set_up_stops_before_the_compile_with_nothing_saved(
  tmp_path, monkeypatch, caplog, sigterm_handler, one_device
):
  make_batches = loop.make_batches

  def terminated(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return make_batches(*args, **kwargs)

  monkeypatch.setattr(loop, "make_batches", terminated)
  with caplog.at_level(logging.INFO, logger="absl"):
    state, metrics, preempted = train_and_evaluate(digits_config(num_steps=2), str(tmp_path))
  assert int(state["step"]) == 0 and metrics is None and preempted
  assert "preempted (SIGTERM) before the first step: stopping with nothing new to save" in (
    caplog.text
  )
  assert "compiling the train step" not in caplog.text
  assert signal.getsignal(signal.SIGTERM) is sigterm_handler
  assert not (tmp_path / "run.lock").exists() and not (tmp_path / "samples").exists()
  assert _committed(tmp_path) == [] and _steps_logged(tmp_path) == []


@pytest.mark.slow
def test_ctrl_c_waits_for_the_save_in_flight_and_releases_the_lock(
  tmp_path, monkeypatch, sigterm_handler, one_device
):
  """Ctrl-C at the log of step 3, just after step 2's asynchronous save began."""
  write = loop._Metrics.write

  def interrupted(self, step, row):
    write(self, step, row)
    if step == 3:
      raise KeyboardInterrupt

  monkeypatch.setattr(loop._Metrics, "write", interrupted)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(
      digits_config(num_steps=6, checkpoint_every=2), str(tmp_path), sample_at_end=False
    )
  # Committed when the exception arrives here: no temporary folder is left.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  _, _, step = load_params(str(tmp_path), weights="raw")
  assert step == 2
  assert _steps_logged(tmp_path) == [1, 2, 3]
  assert signal.getsignal(signal.SIGTERM) is sigterm_handler
  assert not (tmp_path / "run.lock").exists()


@pytest.mark.slow
def test_sigterm_during_the_end_of_run_samples_stops_them_at_once(
  tmp_path, monkeypatch, caplog, sigterm_handler, one_device
):
  """The signal arrives inside the sampler (as it loads the VAE, before the
  first image): the run stops there and returns; step 2 is saved."""
  load_vae_of = inference.load_vae_of
  calls = []

  def terminated(config):
    calls.append(config)
    if len(calls) == 2:  # the first: the run's check at its start (train/samples.py)
      os.kill(os.getpid(), signal.SIGTERM)
    return load_vae_of(config)

  monkeypatch.setattr(inference, "load_vae_of", terminated)
  with caplog.at_level(logging.INFO, logger="absl"):
    state, _, preempted = train_and_evaluate(
      digits_config(num_steps=2, checkpoint_every=2), str(tmp_path)
    )
  assert int(state["step"]) == 2 and preempted  # the samples are still to write
  assert len(calls) == 2
  assert "preempted (SIGTERM) during the end-of-run samples: stopped them; step 2 is saved" in (
    caplog.text
  )
  assert "sampling " not in caplog.text  # stopped before the first image
  assert list((tmp_path / "samples").iterdir()) == []
  assert _committed(tmp_path) == [2] and _steps_logged(tmp_path) == [1, 2]
  assert signal.getsignal(signal.SIGTERM) is sigterm_handler
  assert not (tmp_path / "run.lock").exists()


_TENSORBOARD_WITHOUT_TORCH = """
import sys
from monoformer_jax.train.loop import _summary_writer
writer = _summary_writer()(sys.argv[1])
writer.add_scalar("loss", 1.5, 3)
writer.close()
held_off = "torch" not in sys.modules
import torch  # still importable afterwards
print(held_off, torch.ones(2).sum().item())
"""


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
  """tensorboardX imports torch when it is installed (as here, and on Colab):
  ~2 s of every run's start, held off; the events are the same."""
  run = subprocess.run(
    [sys.executable, "-c", _TENSORBOARD_WITHOUT_TORCH, str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.split() == ["True", "2.0"]
  assert tensorboard_scalars(tmp_path) == {"loss": [(3, 1.5)]}
