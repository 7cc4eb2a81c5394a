"""Training end to end on the digits default: it learns, and it resumes exactly.

One uninterrupted run (`straight`) is the reference of every test here; the
preemption test interrupts a run twice, in real processes, and checks that the
pieces add up to that same run. Every run is on one device (no collective:
helpers.on_one_device); resuming sharded states is tests/test_multihost.py's.
"""

import json
import logging
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import (
  TINY_CONFIG_FLAG,
  digits_config,
  on_one_device,
  one_device_env,
  tensorboard_scalars,
)

from monoformer_jax.errors import PathError
from monoformer_jax.train.loop import train_and_evaluate

STEPS = 30
METRICS = ("loss", "diff", "lm", "grad_norm")
pytestmark = pytest.mark.slow


def history(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """An uninterrupted 30-step run, checkpointed every 5 steps."""
  workdir = tmp_path_factory.mktemp("straight")
  with on_one_device():
    train_and_evaluate(
      digits_config(num_steps=STEPS, checkpoint_every=5), str(workdir), sample_at_end=False
    )
  return workdir, {r["step"]: r for r in history(workdir)}


def test_loss_goes_down_on_digits(straight):
  _, h = straight
  first = np.mean([h[s]["diff"] for s in range(1, 6)])
  last = np.mean([h[s]["diff"] for s in range(21, 31)])
  assert last < 0.7 * first, (first, last)


def _start(workdir, checkpoint_every):
  """`python -m monoformer_jax.train` on the test config; its log goes beside workdir."""
  env = one_device_env(JAX_PLATFORMS="cpu")
  workdir.mkdir(exist_ok=True)
  with open(workdir.parent / f"log_{len(list(workdir.parent.glob('log_*')))}", "w") as log:
    return subprocess.Popen(
      [
        sys.executable,
        "-m",
        "monoformer_jax.train",
        TINY_CONFIG_FLAG,
        f"--workdir={workdir}",
        f"--config.train.num_steps={STEPS}",
        f"--config.train.checkpoint_every={checkpoint_every}",
      ],
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
    )


def _signal_after_checkpoint(proc, workdir, step: int, sig):
  try:
    deadline = time.time() + 240
    while not (workdir / "checkpoints" / str(step)).exists():
      assert proc.poll() is None, f"training exited before its step-{step} checkpoint"
      assert time.time() < deadline, f"no step-{step} checkpoint within 240 s"
      time.sleep(0.2)
  finally:
    proc.send_signal(sig)
    returncode = proc.wait(timeout=120)
  return returncode


def _saved_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_preempted_and_killed_runs_resume_with_the_same_losses(
  straight, tmp_path, one_device, caplog
):
  """SIGTERM (preemption) saves the step it stopped at and exits with 75, the
  status launchers restart on (distributed.RESUMABLE). A
  second process resumes from it; while it holds the workdir another run is
  refused, naming it; it is SIGKILLed two logged steps past a later
  checkpoint, which leaves its lock. A third run takes the stale lock over,
  resumes from that checkpoint and finishes. Every step is logged once, in
  metrics.jsonl and TensorBoard (the killed run's rows past its checkpoint
  kept aside verbatim), and equals the uninterrupted run's: the data position
  and the RNG come back exactly."""
  workdir = tmp_path / "interrupted"
  assert _signal_after_checkpoint(_start(workdir, 4), workdir, 4, signal.SIGTERM) == 75
  stopped = [line["step"] for line in history(workdir)][-1]
  assert _saved_steps(workdir)[-1] == stopped >= 4

  resumed_at = stopped - stopped % 6 + 6  # its first own checkpoint
  proc = _start(workdir, 6)
  metrics, lock_file = workdir / "metrics.jsonl", workdir / "run.lock"

  def rows_past_checkpoint():
    return (workdir / "checkpoints" / str(resumed_at)).exists() and (
      metrics.read_text().count("\n") >= resumed_at + 2
    )

  try:
    _wait_for(
      proc, lambda: lock_file.exists() and json.loads(lock_file.read_text())["pid"] == proc.pid
    )
    with pytest.raises(PathError, match=f"is in use by another run: pid {proc.pid} on host "):
      train_and_evaluate(digits_config(num_steps=STEPS), str(workdir), sample_at_end=False)
    _wait_for(proc, rows_past_checkpoint)
  finally:
    proc.kill()  # possibly during a save, or while a row is being written
    proc.wait(timeout=120)
  killed = metrics.read_text().splitlines(keepends=True)
  saved = _saved_steps(workdir)[-1]
  assert saved >= resumed_at and lock_file.exists()  # a SIGKILL cannot release it

  with caplog.at_level(logging.INFO, logger="absl"):
    train_and_evaluate(digits_config(num_steps=STEPS), str(workdir), sample_at_end=False)
  assert f"was left by a run that is gone (pid {proc.pid} on host " in caplog.text
  assert f"resumed from {workdir}/checkpoints step {saved}" in caplog.text
  assert not lock_file.exists()

  _, reference = straight
  lines = history(workdir)
  # Resumed, not restarted, and each step logged once: the rows the killed run
  # logged past its checkpoint moved aside whole (a line cut by the kill too).
  assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
  assert [json.loads(line) for line in killed[:saved]] == lines[:saved]  # kept as they were
  assert (workdir / "metrics_replaced.jsonl").read_text() == "".join(
    line if line.endswith("\n") else line + "\n" for line in killed[saved:]
  )
  for line in lines:
    for key in METRICS:
      np.testing.assert_allclose(
        line[key], reference[line["step"]][key], rtol=1e-6, err_msg=f"{key}@{line['step']}"
      )
  board = tensorboard_scalars(workdir / "tensorboard")
  for key in ("loss", "grad_norm"):
    assert [step for step, _ in board[key]] == list(range(1, STEPS + 1)), key
    np.testing.assert_allclose([v for _, v in board[key]], [r[key] for r in lines], rtol=1e-6)


def _wait_for(proc, done, seconds: float = 240):
  deadline = time.time() + seconds
  while not done():
    assert proc.poll() is None, "training exited before it was signalled"
    assert time.time() < deadline, f"not done within {seconds} s"
    time.sleep(0.02)


def test_resuming_with_another_model_size_names_the_problem(straight, tmp_path, one_device):
  workdir = tmp_path / "copy"
  shutil.copytree(straight[0], workdir)
  other = digits_config(num_steps=STEPS + 5)
  other.model.mlp_dim = 256
  with pytest.raises(
    ValueError,
    match=r"(?s)does not match this config's model:\n.*"
    r"\['mlp'\]\['w_gate'\]: \(2, 128, 352\) in the checkpoint, "
    r"\(2, 128, 256\) for this config",
  ):
    train_and_evaluate(other, str(workdir), sample_at_end=False)
