"""Checks that span config sections or read the disk, run by the entry points first.

Each field's own checks (its type, range, choices, its section's rules) are the
schema's (`config.complete`); these are the rest, before any compile or I/O:

    check_train_config(config)     everything `python -m monoformer_jax.train` reads: the
                                   complete config, its data, metrics and files
    check_batch_layout(config, mesh, process_count)
                                   the global batch against the processes and the mesh

A failure is a `ConfigError` naming the field, its value, what is allowed and
the fix.
"""

from __future__ import annotations

import math
import os

from monoformer_jax.config import complete
from monoformer_jax.config.fields import check_image_sampling, fail


def check_train_config(config, *, reads_data: bool = True):
  """`config` completed and checked for training (returned: use it); with
  `reads_data=False` the dataset's prepared folders are not looked at (an
  ahead-of-time compile reads no data)."""
  from monoformer_jax.data.datasets import check_data
  from monoformer_jax.eval.score import IMAGE_METRICS, SAMPLE_METRICS

  config = complete(config)
  if reads_data:
    check_data(config)   # a dataset with an input pipeline, its prepared folders
  accum = config.optim.grad_accum_steps
  if config.data.batch_size % accum:
    fail("data.batch_size", config.data.batch_size, f"must be divisible by "
         f"optim.grad_accum_steps={accum} (each micro-batch is batch_size / "
         "grad_accum_steps rows)")
  init_from = config.train.init_from
  if init_from and "://" not in init_from and not os.path.isdir(init_from):
    fail("train.init_from", init_from, "is not a folder", "pass a model checkpoint (e.g. "
         "the output of `python -m monoformer_jax.convert llama`), or '' for a random init")

  s = config.sample
  check_image_sampling(num_steps=s.num_steps, cfg_scale=s.cfg_scale,
                       num_timesteps=config.diffusion.num_timesteps, prefix="sample.")
  for name in s.metrics:
    if name not in SAMPLE_METRICS:
      fail("sample.metrics", name, f"must be one of {SAMPLE_METRICS}")
  _check_evals(config)
  if any(m in IMAGE_METRICS for m in s.metrics):
    _check_metric_files(config, "sample.metrics")
  return config


def _check_evals(config):
  """The evaluators inside training (`config.evals`)."""
  from monoformer_jax.data.datasets import class_names
  from monoformer_jax.eval.digits import model_metric_problem
  from monoformer_jax.eval.score import IMAGE_METRICS, MODEL_METRICS, check_metrics

  ev = config.evals
  if not ev.every or not ev.metrics:
    return
  metrics = check_metrics(ev.metrics, "evals.metrics")
  if "commonsense" in metrics:
    fail("evals.metrics", tuple(metrics), "may not name commonsense inside training",
         "run `python -m monoformer_jax.evaluate --metrics=commonsense` on a checkpoint")
  for name in metrics:
    problem = name in MODEL_METRICS and model_metric_problem(name, config)
    if problem:
      fail("evals.metrics", tuple(metrics), f"names {problem}", f"leave {name} out")
  if not class_names(config):
    fail("evals.metrics", tuple(metrics), f"needs class-conditional samples, but "
         f"data.name={config.data.name!r} has no classes", "set evals.every=0")
  check_image_sampling(num_steps=ev.num_steps, cfg_scale=ev.cfg_scale,
                       num_timesteps=config.diffusion.num_timesteps, prefix="evals.")
  if any(m in IMAGE_METRICS for m in metrics):
    _check_metric_files(config, "evals.metrics")


def _check_metric_files(config, field: str):
  """The files the Inception metrics named in `field` read."""
  for name in ("inception", "reference"):
    path = config.evals[name]
    if not path or not os.path.isfile(path):
      fail(f"evals.{name}", path, f"is not a file (the Inception metrics in {field} read it)",
           "give pytorch-fid's Inception weights (evals.inception) and a reference batch npz "
           "(evals.reference)")


def check_batch_layout(config, mesh, process_count: int = 1):
  """The global batch against the hosts and the mesh axes it is sharded over."""
  from monoformer_jax.parallel import sharding

  rows = config.data.batch_size
  if rows % process_count:
    fail("data.batch_size", rows, f"must be divisible by the {process_count} processes "
         "(each host reads batch_size / processes rows)")
  shards = config.data.shards
  if shards and (shards % process_count or rows % shards):
    fail("data.shards", shards, f"must be a multiple of the {process_count} processes and "
         f"divide data.batch_size={rows} (each shard packs batch_size / shards rows)",
         "0 gives one shard per process")
  spec = sharding.logical_to_spec(("batch",), config.sharding_rules)[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  shards = math.prod(mesh.shape[a] for a in axes)
  micro = rows // config.optim.grad_accum_steps
  if micro % shards:
    where = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
    fail("data.batch_size", rows, f"gives micro-batches of {micro} rows, which the "
         f"{shards} batch shards ({where}) do not divide",
         f"use a multiple of {shards * config.optim.grad_accum_steps} rows, or change "
         "config.mesh")
