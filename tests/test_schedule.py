"""The learning-rate schedules (`optim.schedule`, train/schedule.py) against their
formulas written here in plain Python, at chosen updates: the reference's
`use_lr_decay` (MonoFormer train.py `get_lr`) at its boundaries, cosine, wsd in
each shape; bad settings refused at the config check with the field and the
fix; one tiny run that logs the schedule's lr on every line."""

import json
import math

import numpy as np
import optax
import pytest

from monoformer_jax.config import base, complete
from monoformer_jax.errors import ConfigError
from monoformer_jax.train.checks import check_train_config
from monoformer_jax.train.schedule import lr_schedule
from monoformer_jax.train.state import make_optimizer


def reference_get_lr(it, warmup_iters, learning_rate, lr_decay_iters, min_lr):
  """MonoFormer train.py get_lr, restated: linear warmup from 0, then a cosine
  from learning_rate to min_lr ending at lr_decay_iters, then min_lr.
  (train.py sets min_lr = lr * config.lr_decay_rate.)"""
  if it < warmup_iters:
    return learning_rate * it / warmup_iters
  if it > lr_decay_iters:
    return min_lr
  ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
  return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def optim(**fields):
  c = base()
  c.optim.update(fields)
  return complete(c).optim


def values(schedule, steps):
  """The schedule at `steps` as the train step calls it: an int32 count, jitted."""
  import jax

  return np.asarray(jax.jit(jax.vmap(schedule))(np.asarray(steps, np.int32)), np.float64)


# The reference's configs/train_imagenet.py settings for use_lr_decay=True.
WARMUP_ITERS, LR_DECAY_ITERS, LR_DECAY_RATE, LR = 500, 300_000, 0.1, 1e-4


@pytest.mark.parametrize("warmup", [WARMUP_ITERS, 0])
def test_cosine_is_the_references_use_lr_decay_at_its_boundaries(warmup):
  schedule = lr_schedule(
    optim(
      schedule="cosine",
      lr=LR,
      warmup_steps=warmup,
      decay_steps=LR_DECAY_ITERS,
      min_lr_ratio=LR_DECAY_RATE,
    ),
    num_steps=500_000,  # the reference's max_steps: past the decay's end it keeps min_lr
  )
  w, d = warmup, LR_DECAY_ITERS
  steps = sorted({0, 1, 2, 250, max(w - 1, 0), w, w + 1, (w + d) // 2, d - 1, d, d + 1, 499_999})
  want = [reference_get_lr(s, w, LR, d, LR * LR_DECAY_RATE) for s in steps]
  # float32 (optax's warmup is 1e-4 - 1e-4 * (1 - t/500)): 1e-6 of the peak. An
  # update off by one in the warmup is 2e-7 away, in the cosine's middle 5e-10.
  np.testing.assert_allclose(values(schedule, steps), want, rtol=2e-6, atol=LR * 1e-6)
  # The boundaries themselves: 0 at the start, the peak at the warmup's end,
  # min_lr from lr_decay_iters on.
  got = dict(zip(steps, values(schedule, steps)))
  assert got[0] == (0.0 if w else pytest.approx(LR, rel=1e-6))
  assert got[w] == pytest.approx(LR, rel=1e-6)
  assert got[d] == got[d + 1] == got[499_999] == pytest.approx(LR * LR_DECAY_RATE, rel=1e-6)


def test_cosine_without_decay_steps_ends_at_num_steps():
  schedule = lr_schedule(optim(schedule="cosine", lr=3e-4, warmup_steps=10, min_lr_ratio=0.0), 110)
  steps = [0, 5, 10, 35, 60, 85, 109, 110, 200]
  want = [reference_get_lr(s, 10, 3e-4, 110, 0.0) for s in steps]
  np.testing.assert_allclose(values(schedule, steps), want, rtol=2e-6, atol=3e-4 * 1e-6)
  assert values(schedule, [60])[0] == pytest.approx(1.5e-4, rel=1e-6)  # half way: half the lr


def wsd_formula(t, lr, warmup, num_steps, fraction, shape, ratio):
  """Warmup-stable-decay written out: linear warmup from 0, lr until the last
  round(fraction * num_steps) updates, then lr -> lr * ratio in `shape`."""
  decay_len = round(fraction * num_steps)
  start = num_steps - decay_len
  if t < warmup:
    return lr * t / warmup
  if t < start:
    return lr
  p = min((t - start) / decay_len, 1.0)
  falls = {"linear": 1 - p, "cosine": 0.5 * (1 + math.cos(math.pi * p)), "1-sqrt": 1 - p**0.5}
  return lr * ratio + (lr - lr * ratio) * falls[shape]


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_warms_up_holds_then_decays_in_its_shape(shape):
  num_steps, warmup, fraction, ratio = 1000, 20, 0.25, 0.05
  schedule = lr_schedule(
    optim(
      schedule="wsd",
      lr=2e-4,
      warmup_steps=warmup,
      decay_fraction=fraction,
      decay_shape=shape,
      min_lr_ratio=ratio,
    ),
    num_steps,
  )
  steps = [0, 1, 19, 20, 21, 500, 749, 750, 751, 800, 875, 999, 1000, 1500]
  want = [wsd_formula(s, 2e-4, warmup, num_steps, fraction, shape, ratio) for s in steps]
  np.testing.assert_allclose(values(schedule, steps), want, rtol=2e-6, atol=2e-4 * 1e-6)
  # Where the shapes differ: a quarter into the decay (update 812.5 -> 812).
  quarter = {"linear": 1 - 62 / 250, "cosine": 0.5 * (1 + math.cos(math.pi * 62 / 250))}
  quarter["1-sqrt"] = 1 - math.sqrt(62 / 250)
  assert values(schedule, [812])[0] == pytest.approx(
    2e-4 * ratio + 2e-4 * (1 - ratio) * quarter[shape], rel=1e-5
  )


@pytest.mark.parametrize("warmup", [0, 7])
def test_constant_is_what_it_was(warmup):
  """The default is today's warmup-then-constant, bit for bit."""
  _, schedule = make_optimizer(optim(lr=3e-4, warmup_steps=warmup))
  steps = list(range(0, 12)) + [10_000]
  was = (
    optax.warmup_constant_schedule(0.0, 3e-4, warmup) if warmup else optax.constant_schedule(3e-4)
  )
  np.testing.assert_array_equal(values(schedule, steps), values(was, steps))
  want = [3e-4 * min(s / warmup, 1.0) if warmup else 3e-4 for s in steps]
  np.testing.assert_allclose(values(schedule, steps), want, rtol=1e-6)


def _config(num_steps=1000, **optim_fields):
  c = base()
  c.optim.update(optim_fields)
  c.train.num_steps = num_steps
  return c


# (the settings, train.num_steps, what the one-line error must say)
REFUSED = [
  (dict(schedule="step_decay"), 1000, ["optim.schedule='step_decay'", "'cosine'"]),
  (dict(schedule="wsd", decay_shape="exp"), 1000, ["optim.decay_shape='exp'", "'1-sqrt'"]),
  (dict(schedule="wsd", decay_fraction=0.0), 1000, ["optim.decay_fraction=0.0", "in (0, 1]"]),
  (dict(schedule="wsd", decay_fraction=1.5), 1000, ["optim.decay_fraction=1.5"]),
  (dict(schedule="cosine", min_lr_ratio=-0.1), 1000, ["optim.min_lr_ratio=-0.1", "[0, 1]"]),
  (dict(schedule="cosine", decay_steps=-5), 1000, ["optim.decay_steps=-5", ">= 0"]),
  # A schedule's field set under another schedule would be ignored.
  (dict(decay_steps=300_000), 1000, ["optim.decay_steps=300000", "schedule=cosine"]),
  (dict(min_lr_ratio=0.0), 1000, ["optim.min_lr_ratio=0.0", "'cosine' or 'wsd'"]),
  (dict(schedule="cosine", decay_shape="linear"), 1000, ["optim.decay_shape='linear'", "'wsd'"]),
  (dict(schedule="cosine", decay_fraction=0.5), 1000, ["optim.decay_fraction=0.5", "wsd"]),
  # Phases against the run's length (the cross-section check).
  (
    dict(schedule="cosine", warmup_steps=500, decay_steps=500),
    1000,
    ["optim.warmup_steps=500", "optim.decay_steps=500", "raise optim.decay_steps"],
  ),
  (
    dict(schedule="cosine", decay_steps=300_000),
    1000,
    ["optim.decay_steps=300000", "past train.num_steps=1000", "or 0 to end the cosine"],
  ),
  (
    dict(schedule="cosine", warmup_steps=1000),
    1000,
    ["optim.warmup_steps=1000", "train.num_steps=1000"],
  ),
  (
    dict(schedule="wsd", decay_fraction=0.001),
    100,
    ["optim.decay_fraction=0.001", "no decay update in train.num_steps=100", "0.01"],
  ),
  (
    dict(schedule="wsd", warmup_steps=900, decay_fraction=0.2),
    1000,
    ["optim.warmup_steps=900", "last 200", "at most 800"],
  ),
]


@pytest.mark.parametrize("fields, num_steps, says", REFUSED, ids=[str(r[0]) for r in REFUSED])
def test_bad_schedule_settings_are_refused_at_the_config_check(fields, num_steps, says):
  with pytest.raises(ConfigError) as caught:
    check_train_config(_config(num_steps, **fields), reads_data=False)
  message = str(caught.value)
  assert "\n" not in message
  for part in says:
    assert part in message, message


def test_good_schedule_settings_pass_the_config_check():
  for fields in (
    dict(),
    dict(schedule="cosine", warmup_steps=500, decay_steps=1000, min_lr_ratio=0.1),
    dict(schedule="cosine", warmup_steps=999),
    dict(schedule="wsd", warmup_steps=800, decay_fraction=0.2, decay_shape="linear"),
  ):
    config = check_train_config(_config(1000, **fields), reads_data=False)
    assert {k: config.optim[k] for k in fields} == fields


def test_make_optimizer_needs_num_steps_where_the_schedule_depends_on_it():
  for schedule in ("wsd", "cosine"):
    with pytest.raises(ValueError, match="depends on train.num_steps"):
      make_optimizer(optim(schedule=schedule))
  _, schedule = make_optimizer(
    optim(schedule="cosine", decay_steps=100, min_lr_ratio=0.0), None, 100
  )
  assert values(schedule, [100])[0] == 0.0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_run_logs_the_schedules_lr_on_every_line(tmp_path, one_device):
  """digits:tiny, 4 updates of wsd (1 warmup, the last 2 decaying linearly to
  0): metrics.jsonl's lr at logged step s is the rate update s used,
  schedule(s - 1), from the config's train.num_steps."""
  from helpers import digits_config

  from monoformer_jax.train.loop import train_and_evaluate

  config = digits_config(num_steps=4, log_every=1, checkpoint_every=4)
  config.optim.update(
    schedule="wsd", lr=1e-3, warmup_steps=1, decay_fraction=0.5, decay_shape="linear"
  )
  config.optim.min_lr_ratio = 0.0
  train_and_evaluate(config, str(tmp_path), sample_at_end=False)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  logged = {row["step"]: row["lr"] for row in rows}
  want = {s: wsd_formula(s - 1, 1e-3, 1, 4, 0.5, "linear", 0.0) for s in (1, 2, 3, 4)}
  assert want == {1: 0.0, 2: 1e-3, 3: 1e-3, 4: 5e-4}
  assert logged.keys() == want.keys()
  np.testing.assert_allclose([logged[s] for s in want], list(want.values()), rtol=1e-6)
