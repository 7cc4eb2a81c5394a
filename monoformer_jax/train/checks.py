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

from etils import epath

from monoformer_jax.config import complete
from monoformer_jax.config.fields import check_image_sampling, fail
from monoformer_jax.config.schema import max_sampling_steps
from monoformer_jax.data.datasets import check_data, class_names
from monoformer_jax.eval import registry
from monoformer_jax.parallel import sharding
from monoformer_jax.train.schedule import phases


def check_train_config(config, *, reads_data: bool = True):
  """`config` completed and checked for training (returned: use it); with
  `reads_data=False` the dataset's prepared folders are not looked at (an
  ahead-of-time compile reads no data)."""
  config = complete(config)
  if reads_data:
    check_data(config)  # a dataset with an input pipeline, its prepared folders
  accum = config.optim.grad_accum_steps
  if config.data.batch_size % accum:
    fail(
      "data.batch_size",
      config.data.batch_size,
      f"must be divisible by "
      f"optim.grad_accum_steps={accum} (each micro-batch is batch_size / "
      "grad_accum_steps rows)",
    )
  phases(config.optim, config.train.num_steps)  # the lr schedule fits the run
  init_from = config.train.init_from
  if init_from and not epath.Path(init_from).is_dir():  # on this machine or a bucket
    fail(
      "train.init_from",
      init_from,
      "is not a folder",
      "pass a model checkpoint (e.g. "
      "the output of `python -m monoformer_jax.convert llama`), or '' for a random init",
    )
  check_image_sampling(
    num_steps=config.sample.num_steps,
    cfg_scale=config.sample.cfg_scale,
    num_timesteps=max_sampling_steps(config.diffusion),
    prefix="sample.",
  )
  # Known, allowed inside training, able to score this model, their files there.
  registry.check_training_metrics(config, "sample.metrics")
  _check_evals(config)
  return config


def _check_evals(config):
  """The evaluators inside training (`config.evals`): every `every` steps, on
  class-conditional samples of the EMA weights."""
  ev = config.evals
  if not ev.every or not ev.metrics:
    return
  registry.check_training_metrics(config, "evals.metrics")
  if registry.sample_metrics(ev.metrics) and not class_names(config):
    fail(
      "evals.metrics",
      tuple(ev.metrics),
      f"needs class-conditional samples, but data.name={config.data.name!r} has no classes",
      "set evals.every=0",
    )
  check_image_sampling(
    num_steps=ev.num_steps,
    cfg_scale=ev.cfg_scale,
    num_timesteps=max_sampling_steps(config.diffusion),
    prefix="evals.",
  )


def check_batch_layout(config, mesh, process_count: int = 1):
  """The global batch against the hosts and the mesh axes it is sharded over."""
  rows = config.data.batch_size
  if rows % process_count:
    fail(
      "data.batch_size",
      rows,
      f"must be divisible by the {process_count} processes "
      "(each host reads batch_size / processes rows)",
    )
  shards = config.data.shards
  if shards and (shards % process_count or rows % shards):
    fail(
      "data.shards",
      shards,
      f"must be a multiple of the {process_count} processes and "
      f"divide data.batch_size={rows} (each shard packs batch_size / shards rows)",
      "0 gives one shard per process",
    )
  spec = sharding.logical_to_spec(("batch",), config.sharding_rules)[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  shards = math.prod(mesh.shape[a] for a in axes)
  micro = rows // config.optim.grad_accum_steps
  if micro % shards:
    where = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
    fail(
      "data.batch_size",
      rows,
      f"gives micro-batches of {micro} rows, which the "
      f"{shards} batch shards ({where}) do not divide",
      f"use a multiple of {shards * config.optim.grad_accum_steps} rows, or change config.mesh",
    )
