"""What a user may set, checked before any compile or I/O: one home per entry point.

    check_model(config)          the model fields (also checked when loading)
    check_train_config(config)   everything `python -m monoformer_jax.train` reads
    check_batch_layout(config, mesh)
                                 the batch against the mesh and the processes
    check_image_sampling(...)    image sampling arguments (CLI flags and the API)
    check_text_sampling(...)     text generation arguments
    writable_dir(path, ...)      a folder that is one (or can be made) and is writable
    fresh_output_dir(path, ...)  an output folder that holds nothing it would overwrite

Each failure is a `ConfigError` (or a `PathError`) whose message names the
field, its value, what is allowed and the fix. The modules that compute keep
their own sanity checks; these are the ones a person hits first.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from typing import Any, Iterable

from monoformer_jax.errors import ConfigError, PathError

DTYPES = ("float32", "bfloat16", "float16")


# ------------------------------------------------------------------- values

def _fail(field: str, value: Any, allowed: str, fix: str | None = None):
  raise ConfigError(f"{field}={value!r}: {allowed}" + (f"; {fix}" if fix else ""))


def _flag(field: str) -> str:
  """How a user sets `field`: `--config.x.y=` for config fields, as given for flags."""
  return field if field.startswith("--") else f"--config.{field}"


def integer(field: str, value, *, low: int | None = None, high: int | None = None,
            fix: str | None = None) -> int:
  """`value` as an int in [low, high]; raises naming `field` otherwise."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    _fail(field, value, "must be an integer", fix)
  if (low is not None and value < low) or (high is not None and value > high):
    bounds = (f">= {low}" if high is None else f"<= {high}" if low is None
              else f"in [{low}, {high}]")
    _fail(field, value, f"must be {bounds}", fix or f"pass e.g. {_flag(field)}="
          f"{low if low is not None and value < low else high}")
  return int(value)


def real(field: str, value, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False, fix: str | None = None) -> float:
  """`value` as a finite float in the interval; raises naming `field` otherwise."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    _fail(field, value, "must be a number", fix)
  value = float(value)
  if not math.isfinite(value):
    _fail(field, value, "must be a finite number", fix)
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and (value >= high if high_open else value > high)
  if too_low or too_high:
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    interval = (f"in {lo}, {hi}" if lo and hi else f"{'>' if low_open else '>='} {low:g}"
                if lo else f"{'<' if high_open else '<='} {high:g}")
    _fail(field, value, f"must be {interval}", fix)
  return value


def boolean(field: str, value) -> bool:
  if not isinstance(value, bool):
    _fail(field, value, "must be True or False")
  return value


def one_of(field: str, value, allowed: Iterable, fix: str | None = None):
  allowed = tuple(allowed)
  if value not in allowed:
    _fail(field, value, f"must be one of {allowed}", fix)
  return value


def _section(config, name: str):
  if name not in config:
    raise ConfigError(f"the config has no `{name}` section; start from configs/digits.py "
                      "or configs/imagenet256.py")
  return config[name]


# ------------------------------------------------------------------- config

def check_model(config):
  """The model fields: types, ranges and the divisibilities the model needs."""
  from monoformer_jax.config.schema import CONDITIONING_MODES
  from monoformer_jax.ops.attention import IMPLS

  m = _section(config, "model")
  for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "mlp_dim", "image_size", "in_channels", "patch_size",
               "timestep_freq_dim"):
    integer(f"model.{name}", m[name], low=1)
  real("model.rms_norm_eps", m.rms_norm_eps, low=0, low_open=True)
  real("model.rope_theta", m.rope_theta, low=0, low_open=True)
  boolean("model.learn_sigma", m.learn_sigma)
  boolean("model.remat", m.remat)
  integer("model.scan_unroll", m.get("scan_unroll", 1), low=1,
          fix="1 scans the layers one at a time; model.num_layers unrolls them all")
  one_of("model.conditioning", m.conditioning, CONDITIONING_MODES)
  from monoformer_jax.config.schema import VISION_ENCODERS
  one_of("model.vision_encoder", m.get("vision_encoder", ""), VISION_ENCODERS)
  boolean("model.read_bidirectional", m.get("read_bidirectional", False))
  if m.get("vision_encoder", "") == "clip":
    if not m.get("vision"):
      _fail("model.vision", None, "is needed by model.vision_encoder='clip'",
            "set it from the CLIP folder: model.clip.read_clip_config(DIR)")
    from monoformer_jax.model.clip import check_config
    check_config(m.vision)
  one_of("model.attention_impl", m.attention_impl, IMPLS)
  one_of("model.dtype", m.dtype, DTYPES)
  if m.num_heads % m.num_kv_heads:
    _fail("model.num_heads", m.num_heads, f"must be a multiple of model.num_kv_heads="
          f"{m.num_kv_heads} (grouped-query attention)")
  if m.head_dim % 2:
    _fail("model.head_dim", m.head_dim, "must be even (RoPE rotates pairs of features)")
  if m.timestep_freq_dim % 2:
    _fail("model.timestep_freq_dim", m.timestep_freq_dim, "must be even (cos and sin halves)")
  if m.hidden_size % 4:
    _fail("model.hidden_size", m.hidden_size, "must be a multiple of 4 (the 2-D sin-cos "
          "position embedding of image tokens)")
  if m.image_size % m.patch_size:
    _fail("model.image_size", m.image_size, f"must be a multiple of model.patch_size="
          f"{m.patch_size}")


def check_train_config(config, *, reads_data: bool = True):
  """Every field training reads, before the mesh, the data or the model exist;
  `reads_data=False` leaves out the dataset and its prepared folders (an
  ahead-of-time compile reads no data)."""
  from monoformer_jax.data.datasets import check_data
  from monoformer_jax.eval.score import IMAGE_METRICS, SAMPLE_METRICS

  check_model(config)
  integer("seed", config.seed, low=0)
  d = _section(config, "diffusion")
  integer("diffusion.num_timesteps", d.num_timesteps, low=2)
  one_of("diffusion.beta_schedule", d.beta_schedule, ("linear",))

  data = _section(config, "data")
  if reads_data:
    check_data(config)   # a dataset with an input pipeline, its prepared folders
  integer("data.prefetch", data.get("prefetch", 2), low=0)
  integer("data.workers", data.get("workers", 0), low=0)
  integer("data.shards", data.get("shards", 0), low=0, fix="0 gives one shard per process")
  integer("data.seq_len", data.seq_len, low=2)
  integer("data.batch_size", data.batch_size, low=1)
  integer("data.max_images_per_row", data.max_images_per_row, low=1)
  integer("data.max_read_images_per_row", data.get("max_read_images_per_row", 0), low=0)
  real("data.read_fraction", data.get("read_fraction", 0.0), low=0, high=1)
  real("data.text_fraction", data.text_fraction, low=0, high=1)
  real("data.cfg_drop_prob", data.cfg_drop_prob, low=0, high=1)

  loss = _section(config, "loss")
  real("loss.w_diff", loss.w_diff, low=0)
  real("loss.w_lm", loss.w_lm, low=0)
  if loss.w_diff == 0 and loss.w_lm == 0:
    _fail("loss.w_diff", 0.0, "and loss.w_lm are both 0, so nothing is trained",
          "set one of them > 0")
  boolean("loss.text_on_image_examples", loss.text_on_image_examples)

  o = _section(config, "optim")
  real("optim.lr", o.lr, low=0, low_open=True, fix="the reference trains with 1e-4")
  integer("optim.warmup_steps", o.warmup_steps, low=0)
  real("optim.weight_decay", o.weight_decay, low=0)
  real("optim.b1", o.b1, low=0, high=1, high_open=True)
  real("optim.b2", o.b2, low=0, high=1, high_open=True)
  real("optim.eps", o.eps, low=0, low_open=True)
  real("optim.grad_clip", o.grad_clip, low=0, low_open=True)
  real("optim.ema_decay", o.ema_decay, low=0, high=1)
  accum = integer("optim.grad_accum_steps", o.grad_accum_steps, low=1)
  if data.batch_size % accum:
    _fail("data.batch_size", data.batch_size, f"must be divisible by "
          f"optim.grad_accum_steps={accum} (each micro-batch is batch_size / grad_accum_steps "
          "rows)")

  mesh = _section(config, "mesh")
  for axis in ("data", "fsdp", "tensor"):
    size = integer(f"mesh.{axis}", mesh[axis], low=-1)
    if size == 0:
      _fail(f"mesh.{axis}", size, "must be >= 1, or -1 for the devices left over")
  if [mesh[a] for a in ("data", "fsdp", "tensor")].count(-1) > 1:
    _fail("mesh", dict(mesh), "may have at most one axis of -1")
  integer("mesh.dcn_data", mesh.get("dcn_data", 1), low=1,
          fix="the number of slices (TPU multi-slice) the data axis spans; 1 for one slice")

  t = _section(config, "train")
  integer("train.num_steps", t.num_steps, low=1)
  integer("train.log_every", t.log_every, low=1)
  integer("train.checkpoint_every", t.checkpoint_every, low=1)
  integer("train.keep_checkpoints", t.keep_checkpoints, low=1,
          fix="keep at least the newest checkpoint: --config.train.keep_checkpoints=1")
  init_from = t.get("init_from", "")
  if init_from and "://" not in init_from and not os.path.isdir(init_from):
    _fail("train.init_from", init_from, "is not a folder", "pass a model checkpoint "
          "(e.g. the output of `python -m monoformer_jax.convert llama`), or '' for a "
          "random init")
  boolean("train.allow_model_changes", t.get("allow_model_changes", False))
  boolean("train.tensorboard", t.get("tensorboard", True))
  integer("train.profile_steps", t.get("profile_steps", 0), low=0)
  integer("train.debug_nan_step", t.get("debug_nan_step", 0), low=0)

  s = _section(config, "sample")
  integer("sample.num_per_class", s.num_per_class, low=0)
  check_image_sampling(num_steps=s.num_steps, cfg_scale=s.cfg_scale,
                       num_timesteps=d.num_timesteps, prefix="sample.")
  check_text_sampling(max_new_tokens=s.max_new_tokens, prefix="sample.")
  if isinstance(s.text_prompts, str) or not all(isinstance(p, str) for p in s.text_prompts):
    _fail("sample.text_prompts", s.text_prompts, "must be a list of strings")
  for name in s.get("metrics", ()):
    one_of("sample.metrics", name, SAMPLE_METRICS)
  if "evals" in config:
    check_evals(config)
  if any(m in IMAGE_METRICS for m in s.get("metrics", ())):
    check_metric_files(config, "sample.metrics")


def check_evals(config):
  """The evaluators inside training (`config.evals`, eval/score.py)."""
  from monoformer_jax.data.datasets import class_names
  from monoformer_jax.eval.score import IMAGE_METRICS, MODEL_METRICS, check_metrics

  ev = config.evals
  every = integer("evals.every", ev.every, low=0, fix="0 turns the evaluators off")
  if not every or not ev.metrics:
    return
  metrics = check_metrics(ev.metrics, "evals.metrics")
  if "commonsense" in metrics:
    _fail("evals.metrics", tuple(metrics), "may not name commonsense inside training",
          "run `python -m monoformer_jax.evaluate --metrics=commonsense` on a checkpoint")
  from monoformer_jax.eval.digits import model_metric_problem
  for name in metrics:
    problem = name != "commonsense" and name in MODEL_METRICS and model_metric_problem(name, config)
    if problem:
      _fail("evals.metrics", tuple(metrics), f"names {problem}", f"leave {name} out")
  if not class_names(config):
    _fail("evals.metrics", tuple(metrics), f"needs class-conditional samples, but "
          f"data.name={config.data.name!r} has no classes", "set evals.every=0")
  integer("evals.num_samples", ev.num_samples, low=2)
  check_image_sampling(num_steps=ev.num_steps, cfg_scale=ev.cfg_scale,
                       num_timesteps=config.diffusion.num_timesteps, prefix="evals.")
  if any(m in IMAGE_METRICS for m in metrics):
    check_metric_files(config, "evals.metrics")


def check_metric_files(config, field: str):
  """The files the Inception metrics named in `field` read."""
  ev = config.get("evals", {})
  for name in ("inception", "reference"):
    path = ev.get(name, "")
    if not path or not os.path.isfile(path):
      _fail(f"evals.{name}", path, f"is not a file (the Inception metrics in {field} read it)",
            "give pytorch-fid's Inception weights (evals.inception) and a reference batch npz "
            "(evals.reference)")


def check_batch_layout(config, mesh, process_count: int = 1):
  """The global batch against the hosts and the mesh axes it is sharded over."""
  from monoformer_jax.parallel import sharding

  rows = config.data.batch_size
  if rows % process_count:
    _fail("data.batch_size", rows, f"must be divisible by the {process_count} processes "
          "(each host reads batch_size / processes rows)")
  shards = int(config.data.get("shards", 0))
  if shards and (shards % process_count or rows % shards):
    _fail("data.shards", shards, f"must be a multiple of the {process_count} processes and "
          f"divide data.batch_size={rows} (each shard packs batch_size / shards rows)",
          "0 gives one shard per process")
  spec = sharding.logical_to_spec(("batch",), config.sharding_rules)[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  shards = math.prod(mesh.shape[a] for a in axes)
  micro = rows // config.optim.grad_accum_steps
  if micro % shards:
    where = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
    _fail("data.batch_size", rows, f"gives micro-batches of {micro} rows, which the "
          f"{shards} batch shards ({where}) do not divide",
          f"use a multiple of {shards * config.optim.grad_accum_steps} rows, or change "
          "config.mesh")


def check_image_sampling(*, num_steps, cfg_scale, num_timesteps: int, eta: float = 0.0,
                         num_samples: int = 1, prefix: str = ""):
  """Image sampling arguments (`prefix` is how the caller names them: 'sample.'
  for config fields, '--' for flags, '' for keyword arguments)."""
  name = lambda n: f"{prefix}{n}"
  integer(name("num_steps"), num_steps, low=1, high=num_timesteps,
          fix=f"the schedule has diffusion.num_timesteps={num_timesteps} steps to respace")
  if cfg_scale is not None:
    real(name("cfg_scale"), cfg_scale, low=0, fix="0 (or None in Python) turns guidance off")
  real(name("eta"), eta, low=0, fix="DDIM's eta: 0 is deterministic, 1 the posterior noise")
  integer(name("num_samples"), num_samples, low=1)


def check_text_sampling(*, max_new_tokens, temperature: float = 0.0, top_k: int = 0,
                        top_p: float = 1.0, prefix: str = ""):
  name = lambda n: f"{prefix}{n}"
  integer(name("max_new_tokens"), max_new_tokens, low=1)
  real(name("temperature"), temperature, low=0, fix="0 is greedy")
  integer(name("top_k"), top_k, low=0, fix="0 keeps every token")
  real(name("top_p"), top_p, low=0, high=1, low_open=True, fix="1 keeps every token")


def check_prompts(prompts, what: str = "prompts"):
  """A list of strings (or None for the null prompt), never one string."""
  if isinstance(prompts, str):
    raise ConfigError(f"{what} must be a list of strings, got the string {prompts!r}; "
                      f"pass [{prompts!r}]")
  prompts = list(prompts)
  bad = [p for p in prompts if p is not None and not isinstance(p, str)]
  if bad:
    raise ConfigError(f"{what} must be strings (or None for the empty prompt), got {bad[:3]}")
  if not prompts:
    raise ConfigError(f"{what} is empty: give at least one")
  return prompts


# -------------------------------------------------------------------- paths

def writable_dir(path: str, what: str, flag: str) -> str:
  """`path` as a folder that exists (made if need be) and can be written to;
  raises naming `flag` otherwise. Cloud paths (`gs://...`) are left to their
  library."""
  path = os.fspath(path)
  if "://" in path:
    return path
  if os.path.exists(path) and not os.path.isdir(path):
    raise PathError(f"{flag}={path!r} is a file, not a folder; pass a folder for the "
                    f"{what} (it is made if missing)")
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
      pass
  except OSError as e:
    raise PathError(f"{flag}={path!r}: cannot write the {what} there ({e.strerror or e}); "
                    "pass a folder you can write to") from e
  return path


def fresh_output_dir(path: str, outputs: Iterable[str], flag: str,
                     overwrite: bool = False) -> str:
  """A writable `path` that holds none of `outputs` (unless `overwrite`)."""
  path = writable_dir(path, "outputs", flag)
  there = [name for name in outputs if os.path.exists(os.path.join(path, name))]
  if there and not overwrite:
    raise PathError(f"{flag}={path!r} already holds {there}; pass another {flag} "
                    "or --overwrite to replace them")
  return path


def new_folder_beside(base: str) -> str:
  """`base`, or `base-2`, `base-3`, ... : the first that does not exist yet."""
  candidate, k = base, 1
  while os.path.exists(candidate):
    k += 1
    candidate = f"{base}-{k}"
  return candidate
