"""Several processes, one run, on this machine (launch/local.sh).

The reference is one process of the 8 simulated devices reading the stream in
2 data shards; two processes of 4 devices each (one shard each) must log the
same losses, agree on the step a SIGTERM to one of them stops at, and leave
a checkpoint that one process on another mesh resumes into the same curve.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import TINY_CONFIG_FLAG, digits_config, tensorboard_scalars

from monoformer_jax.checkpoints import load_params
from monoformer_jax.data.sharded import merge_data_states
from monoformer_jax.errors import FileFormatError, TrainingDiverged
from monoformer_jax.train.loop import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The 2-process run saves every EVERY steps and is SIGTERMed once the first is
# committed: it stops a step or two later (~0.2-1 s a step here), well before STEPS.
STEPS = 16
EVERY = 2
METRICS = ("loss", "diff", "lm", "grad_norm")


def _history(workdir):
  return {
    r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
  }


def _pids(out_file, n: int, proc, deadline: float) -> list[int]:
  while True:
    found = re.findall(r"process (\d+): pid (\d+)", out_file.read_text())
    if len(found) == n:
      return [int(pid) for _, pid in sorted(found)]
    assert proc.poll() is None, out_file.read_text()
    assert time.time() < deadline, "launch/local.sh did not start its processes"
    time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(600)  # its own waits allow 300 + 240 s
def test_two_processes_train_as_one_stop_together_and_resume_on_another_mesh(tmp_path):
  one = tmp_path / "one"
  reference_config = digits_config(num_steps=STEPS, checkpoint_every=STEPS)
  reference_config.data.shards = 2
  train_and_evaluate(reference_config, str(one), sample_at_end=False)
  reference = _history(one)

  two, logs, out = tmp_path / "two", tmp_path / "logs", tmp_path / "local.out"
  with open(out, "w") as f:
    proc = subprocess.Popen(
      [
        "bash",
        os.path.join(REPO, "launch", "local.sh"),
        "2",
        "--",
        sys.executable,
        "-m",
        "monoformer_jax.train",
        TINY_CONFIG_FLAG,
        f"--workdir={two}",
        f"--config.train.num_steps={STEPS}",
        f"--config.train.checkpoint_every={EVERY}",
      ],
      env=dict(os.environ, LOG_DIR=str(logs)),
      stdout=f,
      stderr=subprocess.STDOUT,
      cwd=REPO,
    )
  deadline = time.time() + 300
  try:
    pids = _pids(out, 2, proc, deadline)
    while not (two / "checkpoints" / str(EVERY)).exists():
      assert proc.poll() is None, (logs / "process_0.log").read_text()[-3000:]
      assert time.time() < deadline, f"no step-{EVERY} checkpoint within 300 s"
      time.sleep(0.2)
    os.kill(pids[1], signal.SIGTERM)  # one host is preempted; both must stop
    assert proc.wait(timeout=240) == 0, out.read_text()[-3000:]
  finally:
    if proc.poll() is None:
      proc.kill()
  stopped = [
    re.findall(
      r"preempted \(SIGTERM\): saved step (\d+) on every host",
      (logs / f"process_{i}.log").read_text(),
    )
    for i in range(2)
  ]
  assert stopped[0] and stopped[0] == stopped[1], stopped
  stop = int(stopped[0][0])
  assert EVERY <= stop < STEPS
  saved = sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit())
  assert saved[-1] == stop

  # Two processes of one shard each = one process of two shards.
  two_procs = _history(two)
  assert sorted(two_procs) == list(range(1, stop + 1))
  for step, line in two_procs.items():
    for key in METRICS:
      np.testing.assert_allclose(
        line[key], reference[step][key], rtol=1e-5, err_msg=f"{key}@{step}"
      )

  # One process, another mesh, the same curve from the two processes' checkpoint.
  resumed = digits_config(num_steps=STEPS)
  resumed.mesh.update(data=2, fsdp=4)
  train_and_evaluate(resumed, str(two), sample_at_end=False)
  after = _history(two)
  assert sorted(after) == list(range(1, STEPS + 1))
  for step in range(stop + 1, STEPS + 1):
    for key in METRICS:
      np.testing.assert_allclose(
        after[step][key], reference[step][key], rtol=1e-4, err_msg=f"{key}@{step}"
      )


@pytest.mark.slow
def test_an_injected_nan_stops_with_the_diagnosis_and_keeps_only_finite_states(
  tmp_path, one_device
):
  config = digits_config(num_steps=8, checkpoint_every=2, debug_nan_step=4, profile_steps=1)
  with pytest.raises(
    TrainingDiverged,
    match=r"step 4 is not finite \(loss=nan, "
    r"grad_norm=nan\); the state stopped at step 3 .* \[2, 3\]",
  ):
    train_and_evaluate(config, str(tmp_path), sample_at_end=False)
  # The logged steps before it: in metrics.jsonl and as TensorBoard scalars,
  # with the throughput fields; and the profiled step's trace.
  logged = _history(tmp_path)
  assert sorted(logged) == [1, 2, 3]
  board = tensorboard_scalars(tmp_path / "tensorboard")
  for key in ("loss", "grad_norm", "step_time_s", "tokens_per_s_per_device", "data_wait_s"):
    assert [s for s, _ in board[key]] == [1, 2, 3], key
    np.testing.assert_allclose(
      [v for _, v in board[key]], [logged[s][key] for s in (1, 2, 3)], rtol=1e-6
    )
  assert all(logged[s]["tokens_per_s_per_device"] > 0 for s in (1, 2, 3))
  assert list((tmp_path / "profile").rglob("*.xplane.pb"))
  for step in (2, 3):  # loading refuses non-finite weights; check them anyway
    for weights in ("raw", "ema"):
      params, _, at = load_params(str(tmp_path), weights=weights, step=step)
      assert at == step
      assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_data_states_of_several_processes_merge_into_one():
  merged = merge_data_states(
    [
      {"shards": 4, "next_example": {"0": 10, "1": 12}},
      {"shards": 4, "next_example": {"2": 9, "3": 11}},
    ]
  )
  assert merged == {"shards": 4, "next_example": {"0": 10, "1": 12, "2": 9, "3": 11}}
  # A shard no process holds would be a state no run can resume from.
  with pytest.raises(FileFormatError, match=r"not one position for each of its 4 shards"):
    merge_data_states([{"shards": 4, "next_example": {"0": 10, "1": 12}}])
