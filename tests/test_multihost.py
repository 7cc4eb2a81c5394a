"""Several processes, one run: what holds whatever launches them. The
launchers themselves (launch/local.sh, tpu_pod.sh) are run in tests/test_launch.py.
"""

import json

import jax
import numpy as np
import pytest
from helpers import digits_config, tensorboard_scalars

from monoformer_jax.checkpoints import load_params
from monoformer_jax.data.datasets import make_batches
from monoformer_jax.data.sharded import merge_data_states
from monoformer_jax.errors import FileFormatError, TrainingDiverged
from monoformer_jax.model.build import train_flops_counter
from monoformer_jax.text.tokenizer import tokenizer_of
from monoformer_jax.train.checks import check_train_config
from monoformer_jax.train.loop import train_and_evaluate


def _history(workdir):
  return {
    r["step"]: r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
  }


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
  # Each step's throughput counts only the columns holding an example, its FLOPs
  # only those tokens and the pairs inside each example: the batches replayed.
  config = check_train_config(config)
  batches = make_batches(config, tokenizer_of(config))
  flops_of = train_flops_counter(config.model)
  for step in (1, 2, 3):
    seg = next(batches)["segment_ids"]
    lengths = [np.unique(row[row > 0], return_counts=True)[1] for row in seg]
    tokens = sum(int(n.sum()) for n in lengths)
    pairs = sum(int((n.astype(np.int64) ** 2).sum()) for n in lengths)
    record = logged[step]
    seconds = record["step_time_s"] * jax.local_device_count()  # device-seconds
    np.testing.assert_allclose(record["padding"], 1 - tokens / seg.size, rtol=1e-9)
    np.testing.assert_allclose(record["tokens_per_s_per_device"] * seconds, tokens, rtol=1e-6)
    np.testing.assert_allclose(
      record["tflops_per_device"] * 1e12 * seconds, flops_of(tokens, pairs), rtol=1e-6
    )
  assert 0.02 < logged[1]["padding"] < 0.5
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
