"""The training run, top to bottom: mesh, data, model, step, loop, samples.

`train_and_evaluate(config, workdir)` is everything `python -m
monoformer_jax.train` does. It resumes from the latest checkpoint in
`workdir/checkpoints` (same data position, same RNG stream), logs loss, lr and
throughput every `train.log_every` steps, checkpoints every
`train.checkpoint_every` steps, on SIGTERM and at the end, and finally writes
samples from the EMA weights to `workdir/samples/`. A fresh workdir starts
from `train.init_from` (a model checkpoint, e.g. from `python -m
monoformer_jax.convert llama`) when it is set, else from a random init.

Before anything is compiled or written, every config field, the workdir and
the batch layout are checked (monoformer_jax/validate.py). A step whose loss
or gradient is not finite freezes the state on the devices (train/step.py);
the loop finds out at its next log or save, saves the last good step if it
is not on disk yet, and stops with `TrainingDiverged` naming the step, the
terms and the checkpoints kept. An unreadable latest checkpoint is moved
aside and the one before it resumed (checkpoints/orbax_io.py).
"""

from __future__ import annotations

import os
import signal
import time

import jax
from absl import logging
from flax import nnx

from monoformer_jax.checkpoints import TrainCheckpointer, load_params
from monoformer_jax.data.datasets import dataset_of, make_batches
from monoformer_jax.diffusion.gaussian import GaussianDiffusion
from monoformer_jax.errors import TrainingDiverged
from monoformer_jax.eval import finite_json
from monoformer_jax.model.build import param_count
from monoformer_jax.parallel import sharding
from monoformer_jax.text.tokenizer import tokenizer_of
from monoformer_jax.train.samples import write_samples
from monoformer_jax.train.state import (create_train_state, make_optimizer, state_from_params,
                                        state_shardings)
from monoformer_jax.train.step import WATCHED, healthy, make_train_step
from monoformer_jax.validate import check_batch_layout, check_train_config, writable_dir


def _append_metrics(workdir: str, row: dict):
  """One JSON line per logged step in workdir/metrics.jsonl (process 0)."""
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(finite_json(row) + "\n")


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


def initial_state(config, mesh, tx):
  """(graphdef, state, shardings) of step 0, straight in their shards: the raw
  params of the model checkpoint `train.init_from` (EMA = params, a fresh
  optimizer state) when it is set, else a random init."""
  init_from = config.train.get("init_from", "")
  if not init_from:
    graphdef, state, shardings = create_train_state(config, mesh, tx)
    logging.info("initialised %s parameters", f"{param_count(state['params']):,}")
    return graphdef, state, shardings
  graphdef, _, shardings = state_shardings(config, mesh, tx)
  params, _, _ = load_params(init_from, weights="raw", config=config,
                             shardings=shardings["params"],
                             allow_model_changes=config.train.get("allow_model_changes", False))
  state = state_from_params(params, tx, shardings)
  logging.info("started from %s: %s parameters", init_from, f"{param_count(params):,}")
  return graphdef, state, shardings


def _warn_if_too_short(config):
  need = dataset_of(config).steps_for_samples
  if need and config.train.num_steps < need:
    logging.warning(
        "train.num_steps=%d is below the ~%d steps after which this dataset's samples become "
        "recognisable at its default config: expect the end-of-run samples to look like noise",
        config.train.num_steps, need)


def _diverged(health, ckpt: TrainCheckpointer) -> TrainingDiverged:
  """The diagnosis of a run whose step `health["bad_step"]` was not finite."""
  bad = int(health["bad_step"])
  terms = [f"{name}={float(v):g}" for name, ok, v in
           zip(WATCHED, health["terms"], health["values"]) if not ok]
  kept = ckpt.steps()
  return TrainingDiverged(
      f"step {bad} is not finite ({', '.join(terms)}); the state stopped at step {bad - 1} "
      f"and no non-finite state was saved. Checkpoints kept in {ckpt.directory}: {kept}. "
      "Lower --config.optim.lr (or raise optim.warmup_steps) "
      f"and run again with the same --workdir to resume from step {kept[-1] if kept else 0}")


def train_and_evaluate(config, workdir: str, *, sample_at_end: bool = True):
  """Trains `config` in `workdir`; returns the final train state and last metrics."""
  # ---------------------------------------------------------------- set-up
  # Every field is checked before anything is compiled or written.
  check_train_config(config)
  workdir = writable_dir(workdir, "checkpoints, metrics and samples", "--workdir")
  tokenizer = tokenizer_of(config)   # checks it fits model.vocab_size
  mesh = sharding.make_mesh(config.mesh)
  check_batch_layout(config, mesh, jax.process_count())
  _warn_if_too_short(config)
  rules = config.sharding_rules
  logging.info("mesh %s on %d %s devices", dict(mesh.shape), jax.device_count(),
               jax.default_backend())

  with jax.set_mesh(mesh), sharding.logical_rules(rules):
    # --------------------------------------------------------------- model
    tx, schedule = make_optimizer(config.optim)
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"),
                             keep=config.train.keep_checkpoints,
                             save_every=config.train.checkpoint_every)
    graphdef, abstract, shardings = state_shardings(config, mesh, tx)
    resumed = ckpt.restore_latest(abstract, shardings, config)
    data_state = None
    if resumed is not None:
      latest, state, data_state = resumed
      logging.info("resumed from %s/checkpoints step %d", workdir, latest)
    else:
      graphdef, state, shardings = initial_state(config, mesh, tx)

    # ---------------------------------------------------------------- data
    batches = make_batches(config, tokenizer, process_index=jax.process_index(),
                           process_count=jax.process_count(), state=data_state)
    batch_sh = sharding.batch_sharding(mesh, rules, 1)
    diffusion = GaussianDiffusion.create(config.diffusion.num_timesteps,
                                         config.diffusion.beta_schedule)
    step = int(state["step"])
    num_steps = config.train.num_steps
    health = jax.device_put(healthy(), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    # The data position after each step since the last check, so the last good
    # state of a run that diverges is saved with the batches it had read.
    data_after = {step: batches.get_state()}
    batch = None
    if step < num_steps:
      batch = sharding.global_batch(next(batches), mesh, rules)
      logging.info("compiling the train step ...")
      t0 = time.perf_counter()
      train_step = make_train_step(graphdef, diffusion, config, tx, schedule, shardings,
                                   batch_sh).lower(state, batch, health).compile()
      logging.info("compiled the train step in %.1f s", time.perf_counter() - t0)

    # ---------------------------------------------------------------- loop
    preemption = _Preemption()
    rows, length = config.data.batch_size, config.data.seq_len
    metrics = None
    t_last, step_last = time.perf_counter(), step
    while step < num_steps:
      if batch is None:
        batch = sharding.global_batch(next(batches), mesh, rules)
      state, metrics, health = train_step(state, batch, health)
      batch = None
      step += 1
      data_after[step] = batches.get_state()
      log = step % config.train.log_every == 0 or step == num_steps
      save = step % config.train.checkpoint_every == 0 or preemption.requested
      if not (log or save):
        continue
      # Both sync with the devices anyway: read the health record first.
      health_now = jax.device_get(health)
      if health_now["bad_step"] >= 0:
        good = int(health_now["bad_step"]) - 1
        if good > 0:   # the state on the devices is that step's: keep it
          ckpt.save(good, state, data_after[good], config, force=True)
        ckpt.wait()
        ckpt.close()
        raise _diverged(health_now, ckpt)
      data_after = {step: data_after[step]}
      if log:
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
        ckpt.poll()
      if save:
        ckpt.save(step, state, data_after[step], config, force=preemption.requested)
      if preemption.requested:
        ckpt.wait()
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
