"""The training run, top to bottom: mesh, data, model, step, loop, samples.

`train_and_evaluate(config, workdir)` is everything `python -m
monoformer_jax.train` does. It resumes from the latest checkpoint in
`workdir/checkpoints` (same data position, same RNG stream), logs loss, lr and
throughput every `train.log_every` steps, checkpoints every
`train.checkpoint_every` steps, on SIGTERM and at the end, and finally writes
samples from the EMA weights to `workdir/samples/`. A fresh workdir starts
from `train.init_from` (a model checkpoint, e.g. from `python -m
monoformer_jax.convert llama`) when it is set, else from a random init.
"""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import numpy as np
from absl import logging
from flax import nnx

from monoformer_jax.checkpoints import (TrainCheckpointer, load_config, load_params,
                                        model_differences)
from monoformer_jax.data.datasets import dataset_of, make_batches
from monoformer_jax.diffusion.gaussian import GaussianDiffusion
from monoformer_jax.model.build import param_count
from monoformer_jax.parallel import sharding
from monoformer_jax.text.tokenizer import tokenizer_of
from monoformer_jax.train.samples import write_samples
from monoformer_jax.train.state import (create_train_state, make_optimizer, state_from_params,
                                        state_shardings)
from monoformer_jax.train.step import make_train_step


def _check_config(config):
  dataset_of(config)   # raises for a dataset without an input pipeline
  if config.data.batch_size % jax.process_count():
    raise ValueError(f"data.batch_size={config.data.batch_size} must be divisible by the "
                     f"{jax.process_count()} processes")


def _append_metrics(workdir: str, row: dict):
  """One JSON line per logged step in workdir/metrics.jsonl (process 0)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(row) + "\n")


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so the last state is saved."""

  def __init__(self):
    self.requested = False
    try:
      signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker)
      pass

  def _handle(self, *_):
    self.requested = True


def _state_from_model(config, mesh, tx, path: str):
  """(graphdef, state, shardings): step 0, the raw params of the model
  checkpoint `path` (read straight into their shards), EMA = params, a fresh
  optimizer state."""
  graphdef, _, shardings = state_shardings(config, mesh, tx)
  saved, step = load_config(path)
  params, _, _ = load_params(path, weights="raw", config=config, step=step,
                             shardings=shardings["params"])
  differ = model_differences(saved, config)
  if differ:   # same shapes, other settings (e.g. rope_theta): worth a word
    logging.warning("train.init_from=%s was made with other model settings (%s); "
                    "training uses this config's", path, "; ".join(differ))
  return graphdef, state_from_params(params, tx, shardings), shardings


def train_and_evaluate(config, workdir: str, *, sample_at_end: bool = True):
  """Trains `config` in `workdir`; returns the final train state and last metrics."""
  # ---------------------------------------------------------------- set-up
  os.makedirs(workdir, exist_ok=True)
  _check_config(config)
  tokenizer = tokenizer_of(config)   # checks it fits model.vocab_size
  mesh = sharding.make_mesh(config.mesh)
  rules = config.sharding_rules
  logging.info("mesh %s on %d %s devices", dict(mesh.shape), jax.device_count(),
               jax.default_backend())

  with jax.set_mesh(mesh), sharding.logical_rules(rules):
    # --------------------------------------------------------------- model
    tx, schedule = make_optimizer(config.optim)
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"),
                        keep=config.train.keep_checkpoints,
                        save_every=config.train.checkpoint_every)
    latest = ckpt.latest_step()
    data_state = None
    init_from = config.train.get("init_from")
    if latest is None and init_from:
      graphdef, state, shardings = _state_from_model(config, mesh, tx, init_from)
      logging.info("started from %s: %s parameters", init_from,
                   f"{param_count(state['params']):,}")
    elif latest is None:
      graphdef, state, shardings = create_train_state(config, mesh, tx)
      logging.info("initialised %s parameters", f"{param_count(state['params']):,}")
    else:
      graphdef, abstract, shardings = state_shardings(config, mesh, tx)
      state, data_state = ckpt.restore(latest, abstract, shardings)
      logging.info("resumed from %s/checkpoints step %d", workdir, latest)

    # ---------------------------------------------------------------- data
    batches = make_batches(config, tokenizer, process_index=jax.process_index(),
                           process_count=jax.process_count(), state=data_state)
    batch_sh = sharding.batch_sharding(mesh, rules, 1)
    diffusion = GaussianDiffusion.create(config.diffusion.num_timesteps,
                                         config.diffusion.beta_schedule)
    train_step = make_train_step(graphdef, diffusion, config, tx, schedule, shardings,
                                 batch_sh)

    # ---------------------------------------------------------------- loop
    preemption = _Preemption()
    step = int(state["step"])
    num_steps = config.train.num_steps
    rows, length = config.data.batch_size, config.data.seq_len
    metrics = None
    t_last, step_last = time.perf_counter(), step
    while step < num_steps:
      local = next(batches)
      batch = sharding.global_batch(local, mesh, rules)
      state, metrics = train_step(state, batch)
      step += 1
      if step % config.train.log_every == 0 or step == num_steps:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        steps_per_s = (step - step_last) / (now - t_last)
        t_last, step_last = now, step
        _append_metrics(workdir, dict(step=step, **{k: float(v) for k, v in metrics.items()}))
        logging.info(
            "step %d/%d  loss %.4f  diff %.4f (mse %.4f vb %.4f)  lm %.3f  |g| %.2f  "
            "lr %.2e  %.2f steps/s  %s tokens/s",
            step, num_steps, metrics["loss"], metrics["diff"], metrics["mse"],
            metrics["vb"], metrics["lm"], metrics["grad_norm"], metrics["lr"],
            steps_per_s, f"{steps_per_s * rows * length:,.0f}")
        if not np.isfinite(metrics["loss"]):
          raise FloatingPointError(f"loss is {metrics['loss']} at step {step}")
      if ckpt.save(step, state, batches.get_state(), config, force=preemption.requested):
        logging.info("checkpoint saved at step %d", step)
      if preemption.requested:
        logging.warning("SIGTERM: saved step %d and stopping", step)
        break
    ckpt.save(step, state, batches.get_state(), config, force=True)
    ckpt.wait()
    ckpt.close()

    # ------------------------------------------------------------- samples
    # Every process runs the (sharded) sampler; process 0 writes the files.
    if sample_at_end and not preemption.requested:
      write_samples(nnx.merge(graphdef, state["ema"]), config, tokenizer,
                    os.path.join(workdir, "samples"))
  return state, metrics
