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
the batch layout are checked (config/schema.py, checks.py). A step whose loss
or gradient is not finite freezes the state on the devices (train/step.py);
the loop finds out at its next log or save, saves the last good step if it
is not on disk yet, and stops with `TrainingDiverged` naming the step, the
terms and the checkpoints kept. An unreadable latest checkpoint is moved
aside and the one before it resumed (checkpoints/orbax_io.py).

One run per workdir: a second one refuses before writing anything, naming the
first (lock.py). However the run ends (the end, an error, SIGTERM, Ctrl-C), the
saves in flight are waited for and the lock is released. A SIGTERM stops the
run in any phase: during the set-up before its first step (nothing new to
save), in the loop after saving the step it reached, during the end-of-run
samples at once (the checkpoint is saved). A run that starts at step S moves
the metrics rows an earlier run logged past S to metrics_replaced.jsonl, so a
killed and resumed run logs each step once.

The workdir may be a bucket (`--workdir=gs://bucket/run`): checkpoints go
through Orbax (TensorStore), the lock is an object created only if absent
(lock.py), TensorBoard events are written locally and each event file uploaded whole
at every log (what tensorboardX's own GCS writer does, minus its retries of
two minutes per file when the process exits after the bucket is gone), the
end-of-run samples are written to a local folder, then uploaded. An object
cannot be appended to, so there `metrics.jsonl` is kept in memory for the run
and the whole object rewritten at each log (one upload: a reader sees the
rows before or after it, never part of one); on a local disk rows are
appended as they come.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Any, NamedTuple

import jax
from absl import logging
from etils import epath
from flax import nnx
from google.api_core.exceptions import GoogleAPIError

from monoformer_jax import perf
from monoformer_jax.checkpoints import TrainCheckpointer, load_params, resolve_steps
from monoformer_jax.data.datasets import class_prompt_rows, make_batches, source_of
from monoformer_jax.data.sharded import data_state_of, merge_data_states
from monoformer_jax.diffusion.gaussian import from_config
from monoformer_jax.errors import PathError, TrainingDiverged
from monoformer_jax.eval import finite_json
from monoformer_jax.eval.score import TrainingEvals, end_samples_score_evals, eval_row_of_samples
from monoformer_jax.layout import useful_work
from monoformer_jax.lock import workdir_lock
from monoformer_jax.model.build import param_count, train_flops_counter
from monoformer_jax.parallel import distributed, sharding
from monoformer_jax.paths import is_local, staged_folder, whole_file, writable_dir
from monoformer_jax.text.tokenizer import tokenizer_of
from monoformer_jax.train.checks import check_batch_layout, check_train_config
from monoformer_jax.train.samples import check_samples, write_samples
from monoformer_jax.train.state import (
  create_train_state,
  make_optimizer,
  state_from_params,
  state_shardings,
)
from monoformer_jax.train.step import WATCHED, healthy, make_train_step


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports
  torch, when it is installed, only to accept torch tensors (about 2 s on
  Colab, where it is; the run logs floats). `torch` is held off for that one
  import and a later `import torch` works as ever."""
  if "torch" in sys.modules:  # already imported (or already held off)
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class _Metrics:
  """Logged steps as JSON lines in workdir/metrics.jsonl and, with
  train.tensorboard, as TensorBoard scalars in workdir/tensorboard (tensorboardX:
  clu's writers need TensorFlow). Process 0 writes; the others do nothing.

  A run that starts at step S replaces what an earlier run logged past S (it
  went further than its last checkpoint, then was killed): those rows move to
  workdir/metrics_replaced.jsonl, and TensorBoard is told to hide the events
  past S (a purge record at S+1), so each step is logged once. In a bucket
  the rows are kept in `lines` and the object rewritten whole at each write."""

  def __init__(self, workdir: str, tensorboard: bool, first_step: int):
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.lines: list[str] | None = None  # a cloud object's lines, rewritten whole
    self.writer = None
    self.local_events: tempfile.TemporaryDirectory | None = None
    self.active = jax.process_index() == 0
    if not self.active:
      return
    try:  # before the compile, not at the first log
      _set_aside_rows_after(self.path, first_step, epath.Path(workdir) / REPLACED_METRICS)
      if not is_local(workdir):
        self.lines = self.path.read_text().splitlines(True) if self.path.exists() else []
        self.path.write_text("".join(self.lines))
      else:
        open(self.path, "a").close()
      if tensorboard:
        SummaryWriter = _summary_writer()
        self.events = epath.Path(workdir) / "tensorboard"
        if not is_local(workdir):  # written here, uploaded whole at each flush
          self.local_events = tempfile.TemporaryDirectory(prefix="tensorboard_")
        logdir = self.local_events.name if self.local_events else os.fspath(self.events)
        self.writer = SummaryWriter(logdir, purge_step=first_step + 1)
    except _IO_ERRORS as e:
      raise self._failed(e) from e

  def _failed(self, e: BaseException) -> PathError:
    where = getattr(e, "filename", None) or self.path
    why = getattr(e, "strerror", None) or " ".join(str(e).split())[:200]
    fix = (
      "make its folder one you can write to (or move what is there away), or pass another --workdir"
      if is_local(self.path)
      else "check that the bucket can be reached and written from this machine (network, "
      "credentials, quota), then run again: it resumes from its last checkpoint"
    )
    return PathError(f"cannot write the metrics to {where} ({type(e).__name__}: {why}): {fix}")

  def write(self, step: int, row: dict):
    if not self.active:
      return
    line = finite_json(dict(step=step, **row)) + "\n"
    try:
      if self.lines is None:
        with open(self.path, "a") as f:
          f.write(line)
      else:
        self.lines.append(line)
        self.path.write_text("".join(self.lines))
      if self.writer is not None:
        for name, value in row.items():
          self.writer.add_scalar(name, value, step)
        self.writer.flush()
        self._upload_events()
    except _IO_ERRORS as e:
      raise self._failed(e) from e

  def _upload_events(self):
    """Copies this run's event file, whole, to the bucket (one upload each:
    a reader sees the file of a flush before or after it)."""
    if self.local_events is None:
      return
    for path in pathlib.Path(self.local_events.name).glob("events.out.tfevents.*"):
      (self.events / path.name).write_bytes(path.read_bytes())

  def close(self):
    if self.writer is not None:
      writer, self.writer = self.writer, None
      writer.close()
    if self.local_events is not None:
      try:
        self._upload_events()
      except _IO_ERRORS as e:  # the run's own outcome is on its way out
        logging.error("could not upload the TensorBoard events to %s: %s", self.events, e)
      finally:
        self.local_events.cleanup()
        self.local_events = None


REPLACED_METRICS = "metrics_replaced.jsonl"
# What writing to a folder or a bucket raises (gcsfs raises OSErrors; the
# google-cloud-storage client, which tensorboardX uses, its own).
_IO_ERRORS = (OSError, GoogleAPIError)


def _set_aside_rows_after(path, step: int, aside_path):
  """Moves the rows of `path` logged past `step`, and any line that is not a
  row (cut short by a kill mid-write), to the end of `aside_path`; `path` is
  rewritten atomically (a renamed file, or one upload), after the rows are
  safe aside."""
  path, aside_path = epath.Path(path), epath.Path(aside_path)
  try:
    lines = path.read_text().splitlines()
  except FileNotFoundError:
    return
  keep, aside = [], []
  for line in lines:
    try:
      at = json.loads(line)["step"]
      past = not isinstance(at, (int, float)) or at > step
    except (ValueError, TypeError, KeyError):
      past = True
    (aside if past else keep).append(line + "\n")
  if not aside:
    return
  if not is_local(path):  # no append, and a single upload is atomic
    before = aside_path.read_text() if aside_path.exists() else ""
    aside_path.write_text(before + "".join(aside))
  else:
    with open(aside_path, "a") as f:
      f.writelines(aside)
      f.flush()
      os.fsync(f.fileno())
  with whole_file(path) as f:
    f.write("".join(keep).encode())
  logging.warning(
    "%s: moved %d rows past step %d, where this run starts (an earlier run logged them "
    "after its last checkpoint, or before its checkpoints were removed), to %s",
    path,
    len(aside),
    step,
    aside_path,
  )


class _Profile:
  """A jax.profiler trace of train.profile_steps steps into workdir/profile,
  from the third step this run takes (after the compile and a warm step). The
  profiler writes local files only: for a bucket the trace is written to a
  local folder and uploaded when it stops."""

  def __init__(self, workdir: str, first_step: int, steps: int):
    self.dir = os.path.join(workdir, "profile")
    self.start, self.stop = first_step + 2, first_step + 2 + steps
    self.staged: contextlib.ExitStack | None = None
    self.enabled = steps > 0

  def before(self, step: int):
    if self.enabled and step == self.start:
      self.staged = contextlib.ExitStack()
      jax.profiler.start_trace(self.staged.enter_context(staged_folder(self.dir)))

  def after(self, step: int, state):
    if self.staged is not None and step >= self.stop:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.staged, staged = None, self.staged
      staged.close()  # uploads a bucket's trace
      logging.info("profiled steps %d..%d into %s", self.start + 1, step, self.dir)


def initial_state(config, mesh, tx):
  """(graphdef, state, shardings) of step 0, straight in their shards: the raw
  params of the model checkpoint `train.init_from` (EMA = params, a fresh
  optimizer state) when it is set, else a random init."""
  init_from = config.train.init_from
  if not init_from:
    graphdef, state, shardings = create_train_state(config, mesh, tx)
    logging.info("initialised %s parameters", f"{param_count(state['params']):,}")
    return graphdef, state, shardings
  graphdef, _, shardings = state_shardings(config, mesh, tx)
  params, _, _ = load_params(
    init_from,
    weights="raw",
    config=config,
    shardings=shardings["params"],
    allow_model_changes=config.train.allow_model_changes,
  )
  state = state_from_params(params, tx, shardings)
  logging.info("started from %s: %s parameters", init_from, f"{param_count(params):,}")
  return graphdef, state, shardings


def _warn_if_too_short(config):
  need = source_of(config).steps_for_samples
  if need and config.train.num_steps < need:
    logging.warning(
      "train.num_steps=%d is below the ~%d steps after which this dataset's samples become "
      "recognisable at its default config: expect the end-of-run samples to look like noise",
      config.train.num_steps,
      need,
    )


def _diverged(health, ckpt: TrainCheckpointer) -> TrainingDiverged:
  """The diagnosis of a run whose step `health["bad_step"]` was not finite."""
  bad = int(health["bad_step"])
  terms = [
    f"{name}={float(v):g}"
    for name, ok, v in zip(WATCHED, health["terms"], health["values"])
    if not ok
  ]
  kept = ckpt.steps()
  return TrainingDiverged(
    f"step {bad} is not finite ({', '.join(terms)}); the state stopped at step {bad - 1} "
    f"and no non-finite state was saved. Checkpoints kept in {ckpt.directory}: {kept}. "
    "Lower --config.optim.lr (or raise optim.warmup_steps) "
    f"and run again with the same --workdir to resume from step {kept[-1] if kept else 0}"
  )


@contextlib.contextmanager
def _workdir_held(workdir: str):
  """The workdir's lock (lock.py) for the length of the run. Process 0 takes
  it and every process learns the outcome, so none waits in a collective for
  a process 0 that refused."""
  lock = workdir_lock(workdir) if jax.process_index() == 0 else None
  refused = None
  if lock is not None:
    try:
      lock.acquire()
    except Exception as e:  # told to the other processes, raised below
      refused = e
  told = distributed.all_gather_json(None if refused is None else str(refused))[0]
  if refused is not None:
    raise refused
  if told is not None:
    raise PathError(f"process 0 could not lock the workdir: {told}")
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def _check_not_a_checkpoints_folder(workdir: str):
  """Refuses a run's checkpoints/ folder given as its workdir: the run would
  start afresh in checkpoints/checkpoints instead of resuming."""
  steps = resolve_steps(workdir)
  if steps and not (epath.Path(workdir) / "checkpoints").is_dir():
    parent = (
      workdir.rstrip("/").rpartition("/")[0]
      if not is_local(workdir)
      else os.path.dirname(os.path.abspath(workdir))
    )
    raise PathError(
      f"--workdir={workdir!r} holds checkpoint steps {steps} itself: it is a run's "
      f"checkpoints folder, and a run there would start afresh; pass the run's workdir "
      f"(--workdir={parent}) to resume it"
    )


class Trained(NamedTuple):
  """What a run ends with. `preempted`: it stopped early for a SIGTERM (its last
  step saved, or the end-of-run samples cut short) and rerunning resumes it; the
  entry point then exits with `distributed.RESUMABLE` so that a launcher's
  supervisor (launch/) restarts it."""

  state: Any
  metrics: Any
  preempted: bool


def train_and_evaluate(config, workdir: str, *, sample_at_end: bool = True) -> Trained:
  """Trains `config` in `workdir`; returns the final train state, the last
  metrics and whether a preemption stopped it."""
  # ---------------------------------------------------------------- set-up
  # Every field is checked before anything is compiled or written.
  config = check_train_config(config)
  tokenizer = tokenizer_of(config)  # checks it fits model.vocab_size
  row_use = class_prompt_rows(config, tokenizer)  # raises if a class prompt fits no row
  if row_use is not None:
    logging.info("class-prompted images: %s", row_use.describe())
  if sample_at_end:
    check_samples(config, tokenizer)  # their text fits the rows, their VAE loads
  workdir = writable_dir(workdir, "checkpoints, metrics and samples", "--workdir")
  _check_not_a_checkpoints_folder(workdir)
  mesh = sharding.make_mesh(config.mesh)
  check_batch_layout(config, mesh, jax.process_count())
  rules = config.sharding_rules

  # Whatever ends the run (the end, an error, a divergence, SIGTERM, Ctrl-C),
  # these unwind in reverse: the metrics closed, the saves in flight waited
  # for, the SIGTERM handler put back, the lock released.
  with contextlib.ExitStack() as cleanup:
    cleanup.enter_context(_workdir_held(workdir))  # before anything is written
    preemption = cleanup.enter_context(distributed.Preemption())
    _warn_if_too_short(config)
    logging.info(
      "mesh %s on %d %s devices", dict(mesh.shape), jax.device_count(), jax.default_backend()
    )
    cleanup.enter_context(jax.set_mesh(mesh))
    cleanup.enter_context(sharding.logical_rules(rules))
    # --------------------------------------------------------------- model
    tx, schedule = make_optimizer(config.optim, config.model, config.train.num_steps)
    # Closed on every exit, waiting for the save in flight; a failed save is
    # raised, or logged when another error is already on its way out.
    ckpt = cleanup.enter_context(
      TrainCheckpointer(
        os.path.join(workdir, "checkpoints"),
        keep=config.train.keep_checkpoints,
        save_every=config.train.checkpoint_every,
      )
    )
    graphdef, abstract, shardings = state_shardings(config, mesh, tx)
    resumed = ckpt.restore_latest(abstract, shardings, config, data_state_of)
    data_state = None
    if resumed is not None:
      latest, state, data_state = resumed
      logging.info("resumed from %s/checkpoints step %d", workdir, latest)
    else:
      graphdef, state, shardings = initial_state(config, mesh, tx)
    step = int(state["step"])
    metrics_out = _Metrics(workdir, config.train.tensorboard, first_step=step)
    cleanup.callback(metrics_out.close)

    # ---------------------------------------------------------------- data
    batches = make_batches(
      config,
      tokenizer,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      state=data_state,
    )
    batch_sh = sharding.batch_sharding(mesh, rules, 1)
    diffusion = from_config(config.diffusion)
    num_steps = config.train.num_steps
    health = jax.device_put(
      healthy(), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    )
    # The data position after each step since the last check, so the last good
    # state of a run that diverges is saved with the batches it had read.
    data_after = {step: batches.get_state()}
    # This host's rows since the last log: their columns, the columns holding an
    # example, the query-key pairs inside examples (what the model FLOPs count)
    # and the examples cut to fit a row.
    useful = dict(columns=0, tokens=0, attended=0, cut=0)
    clock = dict(data=0.0, checkpoint=0.0)  # seconds since the last log

    def next_batch():
      t0 = time.perf_counter()
      local = next(batches)
      tokens, attended = useful_work(local["segment_ids"])
      useful["columns"] += local["segment_ids"].size
      useful["tokens"] += tokens
      useful["attended"] += attended
      useful["cut"] += int(local.pop("examples_cut").sum())  # the log's, not the model's
      out = sharding.global_batch(local, mesh, rules)
      clock["data"] += time.perf_counter() - t0
      return out

    def save(at: int, **kw):
      """Saves step `at` with every process's data position (a collective)."""
      t0 = time.perf_counter()
      data = merge_data_states(distributed.all_gather_json(data_after[at]))
      ckpt.save(at, state, data, config, **kw)
      clock["checkpoint"] += time.perf_counter() - t0

    # The evaluators' files and VAE are loaded before the compile: a bad one
    # stops the run now, not at its first evaluation.
    evals = TrainingEvals(config)

    # A SIGTERM during the set-up (restore, data, compile) stops the run at its
    # first step boundary, before the compile when it came before it.
    stopped = step < num_steps and preemption.reached(step)
    batch = None
    compile_s = 0.0
    if step < num_steps and not stopped:
      batch = next_batch()
      logging.info("compiling the train step ...")
      t0 = time.perf_counter()
      train_step = (
        make_train_step(graphdef, diffusion, config, tx, schedule, shardings, batch_sh)
        .lower(state, batch, health)
        .compile()
      )
      compile_s = time.perf_counter() - t0
      logging.info("compiled the train step in %.1f s", compile_s)
      stopped = preemption.reached(step)
    if stopped:
      logging.warning(
        "preempted (SIGTERM) before the first step: stopping with nothing new to save%s",
        f" (step {step} is on disk)" if step else "",
      )

    # ---------------------------------------------------------------- loop
    # The evaluator's last run would repeat the end-of-run samples' work.
    evals_from_samples = sample_at_end and end_samples_score_evals(config)
    profile = _Profile(workdir, step, config.train.profile_steps)
    # Model FLOPs of the non-padding tokens (model/build.py: XLA's count sees a
    # scanned layer once) and the chip's peak, for MFU; None on a CPU or an
    # unlisted chip.
    flops_of = train_flops_counter(config.model)
    chip = perf.chip_of(jax.devices()[0])
    metrics = None
    t_last, step_last = time.perf_counter(), step
    t_first, step_first = t_last, step
    clock["data"] = 0.0  # the first batch belongs to the compile
    while step < num_steps and not stopped:
      if batch is None:
        batch = next_batch()
      profile.before(step)
      state, metrics, health = train_step(state, batch, health)
      batch = None
      step += 1
      profile.after(step, state)
      data_after[step] = batches.get_state()
      stopped = preemption.reached(step)
      log = step % config.train.log_every == 0 or step == num_steps
      saving = step % config.train.checkpoint_every == 0 or stopped
      evaluating = (
        evals.due(step) and not stopped and not (evals_from_samples and step == num_steps)
      )
      if not (log or saving or evaluating):
        continue
      # Both sync with the devices anyway: read the health record first.
      health_now = jax.device_get(health)
      if health_now["bad_step"] >= 0:
        good = int(health_now["bad_step"]) - 1
        if good > 0:  # the state on the devices is that step's: keep it
          save(good, force=True)
        ckpt.wait()  # so that the diagnosis lists the committed steps
        raise _diverged(health_now, ckpt)
      data_after = {step: data_after[step]}
      if log:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        step_time = (now - t_last) / (step - step_last)
        # This host's useful work over its devices' time: padding counts for nothing.
        device_seconds = (now - t_last) * jax.local_device_count()
        tokens_per_device = useful["tokens"] / device_seconds
        achieved = flops_of(useful["tokens"], useful["attended"]) / device_seconds
        row = {k: float(v) for k, v in metrics.items()}
        # Every host's (a collective: all log at the same steps).
        cut = sum(distributed.all_gather_json(useful["cut"]))
        row.update(
          examples_cut=cut,
          step_time_s=step_time,
          tokens_per_s_per_device=tokens_per_device,
          padding=1.0 - useful["tokens"] / max(useful["columns"], 1),
          tflops_per_device=achieved / 1e12,
          data_wait_s=clock["data"],
          checkpoint_s=clock["checkpoint"],
        )
        if chip is not None:
          row["mfu"] = achieved / (chip.bf16_tflops * 1e12)
        metrics_out.write(step, row)
        logging.info(
          "step %d/%d  loss %.4f  diff %.4f (mse %.4f vb %.4f)  lm %.3f  |g| %.2f  "
          "lr %.2e  %.3f s/step  %s tokens/s/device  %s (non-padding tokens: %.1f%% "
          "padding)  data %.2f s  ckpt %.2f s%s",
          step,
          num_steps,
          metrics["loss"],
          metrics["diff"],
          metrics["mse"],
          metrics["vb"],
          metrics["lm"],
          metrics["grad_norm"],
          metrics["lr"],
          step_time,
          f"{tokens_per_device:,.0f}",
          f"MFU {row['mfu']:.1%}" if chip else f"{achieved / 1e9:,.1f} GFLOP/s/device",
          100 * row["padding"],
          clock["data"],
          clock["checkpoint"],
          f"  {cut:,} examples cut to fit a row since the last line" if cut else "",
        )
        t_last, step_last = now, step
        useful.update(columns=0, tokens=0, attended=0, cut=0)
        clock.update(data=0.0, checkpoint=0.0)
        ckpt.poll()
      if evaluating:
        results = evals(nnx.merge(graphdef, state["ema"]), tokenizer)
        metrics_out.write(step, results)
        logging.info(
          "step %d evals (EMA weights): %s",
          step,
          "  ".join(f"{k[5:]} {v:.4g}" for k, v in results.items()),
        )
        t_last += results["eval/seconds"]  # the evals' time is not the steps'
      if saving:
        save(step, force=stopped)
      if stopped:
        ckpt.wait()
        logging.warning("preempted (SIGTERM): saved step %d on every host and stopping", step)
    if not stopped:
      save(step, force=True)
    ckpt.wait()
    ckpt.close()  # the samples need none of its threads (closing twice is safe)
    trained_s = time.perf_counter() - t_first

    # ------------------------------------------------------------- samples
    # Every process runs the (sharded) sampler; process 0 writes the files. The
    # checkpoint is committed: a SIGTERM now stops the samples at once.
    sample_s = None
    if sample_at_end and not stopped:
      t0 = time.perf_counter()
      try:
        with preemption.interrupting():
          _, _, image_scores, model_scores = write_samples(
            nnx.merge(graphdef, state["ema"]), config, tokenizer, os.path.join(workdir, "samples")
          )
      except distributed.Preempted:
        stopped = True
        logging.warning(
          "preempted (SIGTERM) during the end-of-run samples: stopped them; step %d is "
          "saved, and rerunning the same command writes the samples",
          step,
        )
      else:
        sample_s = time.perf_counter() - t0
        if evals_from_samples and evals.due(step) and step > step_first:
          results = eval_row_of_samples(config, image_scores, model_scores)
          metrics_out.write(step, results)
          logging.info(
            "step %d evals (EMA weights, the end-of-run samples'): %s",
            step,
            "  ".join(f"{k[5:]} {v:.4g}" for k, v in results.items()),
          )
  if step > step_first:
    logging.info(
      "done: compile %.1f s, %d steps in %.1f s (%.3f s/step with the logging and checkpoints)%s",
      compile_s,
      step - step_first,
      trained_s,
      trained_s / (step - step_first),
      f", samples {sample_s:.1f} s" if sample_s is not None else "",
    )
  return Trained(state, metrics, preempted=stopped)
