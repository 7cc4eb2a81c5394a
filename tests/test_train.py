"""Training end to end on the digits default: it learns, and it resumes exactly."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from monoformer_jax.train.loop import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]


def digits_config(**train):
  spec = importlib.util.spec_from_file_location("digits_cfg", REPO / "configs" / "digits.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.num_layers = 2
  c.data.batch_size = 8
  c.data.seq_len = 64
  c.data.max_images_per_row = 1
  c.optim.warmup_steps = 0
  c.mesh.data = 1
  c.mesh.fsdp = -1   # 8 simulated devices, FSDP over all of them
  c.train.update(dict(dict(log_every=1, checkpoint_every=10, keep_checkpoints=3), **train))
  return c


def history(workdir):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in rows}


def test_loss_goes_down_on_digits(tmp_path):
  train_and_evaluate(digits_config(num_steps=40), str(tmp_path), sample_at_end=False)
  h = history(tmp_path)
  first = np.mean([h[s]["diff"] for s in range(1, 6)])
  last = np.mean([h[s]["diff"] for s in range(31, 41)])
  assert last < 0.7 * first, (first, last)


def test_resume_continues_the_same_loss_curve(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train_and_evaluate(digits_config(num_steps=20), str(straight), sample_at_end=False)
  train_and_evaluate(digits_config(num_steps=10), str(resumed), sample_at_end=False)
  # A new process would start here: nothing is shared but the workdir.
  train_and_evaluate(digits_config(num_steps=20), str(resumed), sample_at_end=False)
  a, b = history(straight), history(resumed)
  assert sorted(b) == list(range(1, 21))
  for step in range(11, 21):
    for key in ("loss", "diff", "lm", "grad_norm"):
      np.testing.assert_allclose(b[step][key], a[step][key], rtol=1e-6, err_msg=f"{key}@{step}")


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_with_the_same_losses(tmp_path, sig):
  """Kill a training process after a checkpoint; the resumed run continues the
  uninterrupted run's loss curve exactly (data position and RNG restored).
  SIGTERM (preemption) must also save the step it stopped at and exit cleanly."""
  import os
  import signal
  import subprocess
  import sys
  import time

  straight, killed = tmp_path / "straight", tmp_path / "killed"
  config = digits_config(num_steps=30, checkpoint_every=5)
  train_and_evaluate(config, str(straight), sample_at_end=False)

  flags = [f"--config.{k}={v}" for k, v in (
      ("model.num_layers", 2), ("data.batch_size", 8), ("data.seq_len", 64),
      ("data.max_images_per_row", 1), ("optim.warmup_steps", 0), ("mesh.data", 1),
      ("mesh.fsdp", -1), ("train.num_steps", 30), ("train.log_every", 1),
      ("train.checkpoint_every", 5))]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
      [sys.executable, "-m", "monoformer_jax.train", f"--config={REPO / 'configs' / 'digits.py'}",
       f"--workdir={killed}", *flags], env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "10").exists():
      assert proc.poll() is None, "training exited before its step-10 checkpoint"
      assert time.time() < deadline, "no step-10 checkpoint within 240 s"
      time.sleep(0.2)
  finally:
    proc.send_signal(getattr(signal, sig))
    returncode = proc.wait(timeout=120)
  if sig == "SIGTERM":
    assert returncode == 0
    logged = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    saved = max(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == logged[-1] >= 10, (saved, logged[-1])

  train_and_evaluate(config, str(killed), sample_at_end=False)
  # Every logged line, from the killed process and from the resumed one (which
  # redoes the steps after its checkpoint), equals the uninterrupted run's.
  a = history(straight)
  lines = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
  steps = [l["step"] for l in lines]
  # Resumed, not restarted: step 1 ran once, and every step is covered.
  assert steps.count(1) == 1 and set(steps) == set(range(1, 31)) and steps[-1] == 30
  for line in lines:
    for key in ("loss", "diff", "lm", "grad_norm"):
      np.testing.assert_allclose(line[key], a[line["step"]][key], rtol=1e-6,
                                 err_msg=f"{key}@{line['step']}")


def test_resuming_with_another_model_size_names_the_problem(tmp_path):
  train_and_evaluate(digits_config(num_steps=2), str(tmp_path), sample_at_end=False)
  other = digits_config(num_steps=4)
  other.model.mlp_dim = 256
  with pytest.raises(ValueError, match=r"(?s)does not match this config's model:\n.*"
                     r"\['mlp'\]\['w_gate'\]: \(2, 128, 352\) in the checkpoint, "
                     r"\(2, 128, 256\) for this config"):
    train_and_evaluate(other, str(tmp_path), sample_at_end=False)
