"""The learning-rate schedule: `optim.schedule` and its fields, as one optax schedule.

Every schedule starts with a linear warmup from 0 to `optim.lr` over the first
`optim.warmup_steps` updates (none when 0), then:

    constant   `optim.lr` to the end (the paper: the reference's default,
               `use_lr_decay=False`)
    cosine     a cosine from `optim.lr` down to `lr * optim.min_lr_ratio`, which it
               reaches at update `optim.decay_steps` (at most train.num_steps; 0:
               train.num_steps) and keeps to the end.
               With warmup_steps=warmup_iters, decay_steps=lr_decay_iters and
               min_lr_ratio=lr_decay_rate this is the reference's `use_lr_decay=True`
               (MonoFormer train.py `get_lr`, "cosine with warmup"), update for update
               when its gradient_accumulation_steps is 1 (it counts loader batches)
    wsd        warmup-stable-decay: `optim.lr` until the last `optim.decay_fraction`
               of train.num_steps, in which it falls to `lr * optim.min_lr_ratio` with
               the shape `optim.decay_shape` (linear, cosine or 1-sqrt)

The schedule maps the update count (the train state's `step` before the update,
0 for the first) to the rate that update uses; the train step logs it as `lr`.
`phases` checks the fields against train.num_steps (the config check runs it
before anything loads) and says where each phase begins.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax

from monoformer_jax.config.fields import fail


@dataclasses.dataclass(frozen=True)
class Phases:
  """Where the schedule's phases begin, in updates: warmup [0, warmup), then
  `optim.lr` until `decay_start`, then the decay over `decay_len` updates
  (decay_len 0: no decay)."""

  warmup: int
  decay_start: int
  decay_len: int


def phases(optim, num_steps: int) -> Phases:
  """The phases of `optim`'s schedule for a run of `num_steps` updates; a
  setting that leaves a phase empty or out of order raises a ConfigError."""
  warmup = optim.warmup_steps
  if optim.schedule == "constant":
    return Phases(warmup, decay_start=max(warmup, num_steps), decay_len=0)
  if optim.schedule == "cosine":
    end = optim.decay_steps or num_steps
    if end <= warmup:
      named = (
        f"optim.decay_steps={optim.decay_steps}"
        if optim.decay_steps
        else (f"train.num_steps={num_steps} (optim.decay_steps=0 ends the cosine there)")
      )
      fail(
        "optim.warmup_steps",
        warmup,
        f"must be below the cosine's end, {named}: the cosine runs from the warmup's end to it",
        "lower optim.warmup_steps or raise optim.decay_steps",
      )
    if end > num_steps:  # the run would stop part way down: a decay cut short
      fail(
        "optim.decay_steps",
        optim.decay_steps,
        f"is past train.num_steps={num_steps}: the run would end before the cosine does",
        "use at most train.num_steps, or 0 to end the cosine with the run",
      )
    return Phases(warmup, decay_start=warmup, decay_len=end - warmup)
  if optim.schedule == "wsd":
    decay_len = round(optim.decay_fraction * num_steps)
    if decay_len < 1:
      fail(
        "optim.decay_fraction",
        optim.decay_fraction,
        f"gives no decay update in train.num_steps={num_steps}",
        f"raise it to at least {1 / num_steps:.2g}",
      )
    if warmup > num_steps - decay_len:
      fail(
        "optim.warmup_steps",
        warmup,
        f"runs into the wsd decay, which takes the last {decay_len} of "
        f"train.num_steps={num_steps} updates (optim.decay_fraction={optim.decay_fraction})",
        f"use at most {num_steps - decay_len} warmup steps or a smaller optim.decay_fraction",
      )
    return Phases(warmup, decay_start=num_steps - decay_len, decay_len=decay_len)
  raise ValueError(f"optim.schedule={optim.schedule!r} has no phases (the schema lists it?)")


def _one_minus_sqrt(init: float, end: float, steps: int) -> optax.Schedule:
  """init -> end as 1 - sqrt(progress) (Hägele et al. 2024's wsd cooldown)."""

  def schedule(count):
    progress = jnp.clip(jnp.asarray(count, jnp.float32) / steps, 0.0, 1.0)
    return end + (init - end) * (1.0 - jnp.sqrt(progress))

  return schedule


def lr_schedule(optim, num_steps: int) -> optax.Schedule:
  """update count -> learning rate, for `optim` over a run of `num_steps` updates."""
  p = phases(optim, num_steps)
  lr, low = optim.lr, optim.lr * optim.min_lr_ratio
  pieces, starts = [], []
  if p.warmup:
    pieces.append(optax.linear_schedule(0.0, lr, p.warmup))
  if p.decay_start > p.warmup or not p.decay_len:
    starts.append(p.warmup)
    pieces.append(optax.constant_schedule(lr))
  if p.decay_len:
    shape = "cosine" if optim.schedule == "cosine" else optim.decay_shape
    starts.append(p.decay_start)
    if shape == "cosine":
      pieces.append(optax.cosine_decay_schedule(lr, p.decay_len, alpha=optim.min_lr_ratio))
    elif shape == "linear":
      pieces.append(optax.linear_schedule(lr, low, p.decay_len))
    else:
      pieces.append(_one_minus_sqrt(lr, low, p.decay_len))
  # join_schedules takes the boundaries between pieces: drop the first start,
  # which is 0 when there is no warmup and the warmup's end otherwise.
  boundaries = starts if p.warmup else starts[1:]
  return pieces[0] if len(pieces) == 1 else optax.join_schedules(pieces, boundaries)
