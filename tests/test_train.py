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
  c.train.update(log_every=1, checkpoint_every=10, keep_checkpoints=3, **train)
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
