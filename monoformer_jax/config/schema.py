"""The config schema: every field a user may set, its type, its default, its checks.

This is the one home of the config. Each section is a dataclass below; a
field's type is its annotation, its default is the paper's setting (the 1.1B
ImageNet-256 model and recipe, as `configs/imagenet256.py` runs it), and its
bounds and help are in `spec(...)`. The command line stays ml_collections':

    base()          a locked ConfigDict holding every field at its default: what
                    each `configs/*.py` starts from, overriding only what differs
    complete(c)     `c` with every field: a missing field takes its default (a
                    config saved by an older version), an unknown one raises
                    naming the nearest known field, and each section's own
                    checks run (types, ranges, choices, the section's own rules)
    section(n, v)   one section completed and checked, for library functions
                    that take only their section (e.g. the mesh's)

Checks that span sections or read files (the batch against the mesh, metric
names, prepared data) are the entry points', in `monoformer_jax/train/checks.py`.
Old checkpoints load through `complete` like any config.
"""

import collections.abc
import dataclasses
import difflib
import typing
from collections.abc import Mapping
from typing import Any, Literal

import ml_collections

from monoformer_jax.config import fields
from monoformer_jax.errors import ConfigError

# -------------------------------------------------------------------- choices
# The names a field may take. Code that branches on them imports them from here.

Conditioning = Literal["adaln_before_decoder", "add_before_image_tokens"]
VisionEncoder = Literal["", "vae", "clip"]  # "": the model reads no image
AttentionImpl = Literal["xla", "pallas", "auto"]
Dtype = Literal["float32", "bfloat16", "float16"]
BetaSchedule = Literal["linear"]
# iddpm: the paper's (epsilon and a learned variance on 1000 steps); flow: a
# linear path from data (t = 0) to noise (t = 1), the model predicting the
# velocity noise - data (diffusion/flow.py).
Objective = Literal["iddpm", "flow"]
FlowTimes = Literal["logit_normal", "uniform"]  # the training times of flow
FlowWeighting = Literal["none", "cosmap"]  # flow's per-time weight of the velocity MSE
LrSchedule = Literal["constant", "cosine", "wsd"]  # train/schedule.py
DecayShape = Literal["linear", "cosine", "1-sqrt"]

CONDITIONING_MODES = typing.get_args(Conditioning)
CONDITIONING_TOKEN_MODE = "add_before_image_tokens"  # one timestep token per image
VISION_ENCODERS = typing.get_args(VisionEncoder)
ATTENTION_IMPLS = typing.get_args(AttentionImpl)
DTYPES = typing.get_args(Dtype)
BETA_SCHEDULES = typing.get_args(BetaSchedule)
OBJECTIVES = typing.get_args(Objective)
# The image samplers of each objective, its default first (what every entry
# point runs when no sampler is named, so a checkpoint samples as it was trained).
SAMPLERS = dict(iddpm=("ddpm", "ddim"), flow=("euler", "heun"))
ALL_SAMPLERS = tuple(name for names in SAMPLERS.values() for name in names)


def sampler_for(objective: str, sampler: str | None, name: str = "sampler") -> str:
  """The sampler to run for a model of `objective`: `sampler`, or the
  objective's default when None; one of another objective is refused."""
  if sampler is None:
    return SAMPLERS[objective][0]
  if sampler not in SAMPLERS[objective]:
    fields.fail(
      name,
      sampler,
      f"does not sample a diffusion.objective={objective!r} model; its samplers are "
      f"{SAMPLERS[objective]}",
      f"leave {name} out for {SAMPLERS[objective][0]!r}",
    )
  return sampler


def max_sampling_steps(diffusion) -> int | None:
  """The most sampling steps of a `diffusion` section: iddpm respaces its
  num_timesteps; flow's ODE takes any count (None)."""
  return None if diffusion.objective == "flow" else diffusion.num_timesteps


LR_SCHEDULES = typing.get_args(LrSchedule)

# Logical axis -> mesh axes (parallel/sharding.py): FSDP over ('data', 'fsdp') by
# default; tensor parallelism over 'tensor'.
SHARDING_RULES = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("layers", None),
  ("head_dim", None),
  ("length", None),
  ("patch", None),
  ("freq", None),
  # The frozen CLIP vision tower (model/clip.py) is replicated: no optimizer
  # state, 0.3B parameters for ViT-L/14. Map these names to shard it.
  ("clip_embed", None),
  ("clip_heads", None),
  ("clip_mlp", None),
  ("clip_patch", None),
  ("clip_channels", None),
  ("clip_positions", None),
)


def spec(default, *, low=None, high=None, low_open=False, high_open=False, fix=None):
  """A field's default and bounds (numbers: [low, high], an open end excluded)."""
  meta = dict(low=low, high=high, low_open=low_open, high_open=high_open, fix=fix)
  if isinstance(default, (dict, list)):
    return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
  return dataclasses.field(default=default, metadata=meta)


# ------------------------------------------------------------------- sections


@dataclasses.dataclass
class Model:
  """The decoder (a Llama), its image heads and how it reads images."""

  vocab_size: int = spec(32004, low=1)  # Llama's 32000 + <PAD>, <image>, <|im_start|>, <|im_end|>
  hidden_size: int = spec(2048, low=1)
  num_layers: int = spec(22, low=1)
  num_heads: int = spec(32, low=1)
  num_kv_heads: int = spec(4, low=1)
  head_dim: int = spec(64, low=1)
  mlp_dim: int = spec(5632, low=1)
  rms_norm_eps: float = spec(1e-5, low=0, low_open=True)
  rope_theta: float = spec(10000.0, low=0, low_open=True)
  image_size: int = spec(32, low=1)  # latent side: 256 pixels / the SD-VAE's factor 8
  in_channels: int = spec(4, low=1)
  patch_size: int = spec(2, low=1)  # 32x32 -> 16x16 = 256 image tokens
  learn_sigma: bool = True
  timestep_freq_dim: int = spec(256, low=1)
  conditioning: Conditioning = "adaln_before_decoder"
  vision_encoder: VisionEncoder = ""  # vae / clip: the model also READS images
  vision: Any = None  # clip: the tower's sizes (model.clip.clip_config_from_hf)
  read_bidirectional: bool = False  # read images causal like text (the reference) or one block
  attention_impl: AttentionImpl = "auto"  # Pallas kernels on TPU/GPU, dense XLA on CPU
  dtype: Dtype = "bfloat16"  # compute dtype; parameters are always float32
  remat: bool = True
  scan_unroll: int = spec(
    1, low=1, fix="1 scans the layers one at a time; model.num_layers unrolls them all"
  )

  def check(self):
    if self.num_heads % self.num_kv_heads:
      fields.fail(
        "model.num_heads",
        self.num_heads,
        f"must be a multiple of model.num_kv_heads={self.num_kv_heads} (grouped-query attention)",
      )
    if self.head_dim % 2:
      fields.fail("model.head_dim", self.head_dim, "must be even (RoPE rotates pairs of features)")
    if self.timestep_freq_dim % 2:
      fields.fail(
        "model.timestep_freq_dim", self.timestep_freq_dim, "must be even (cos and sin halves)"
      )
    if self.hidden_size % 4:
      fields.fail(
        "model.hidden_size",
        self.hidden_size,
        "must be a multiple of 4 (the 2-D sin-cos position embedding of image tokens)",
      )
    if self.image_size % self.patch_size:
      fields.fail(
        "model.image_size",
        self.image_size,
        f"must be a multiple of model.patch_size={self.patch_size}",
      )
    if self.vision_encoder == "clip" and not self.vision:
      fields.fail(
        "model.vision",
        self.vision,
        "is needed by model.vision_encoder='clip'",
        "set it from the CLIP folder: model.clip.read_clip_config(DIR)",
      )


@dataclasses.dataclass
class Diffusion:
  """The noise process images are trained and sampled with (diffusion/)."""

  # iddpm: the schedule's steps; flow: the scale of the time the network sees
  # (t in [0, 1] enters its embedding as t * num_timesteps, the same range).
  num_timesteps: int = spec(1000, low=2)
  beta_schedule: BetaSchedule = "linear"
  objective: Objective = "iddpm"
  # flow only: its training times, logit-normal (SD3: mean 0, scale 1) or uniform
  time_distribution: FlowTimes = "logit_normal"
  logit_mean: float = 0.0
  logit_scale: float = spec(1.0, low=0, low_open=True)
  # flow only: the sampling times t -> shift t / (1 + (shift - 1) t), more
  # steps at high noise for shift > 1 (SD3's resolution shift; 1: none)
  shift: float = spec(1.0, low=0, low_open=True)
  loss_weighting: FlowWeighting = "none"  # cosmap: SD3's 2 / (pi (1 - 2t + 2t^2))

  # The fields each setting shapes: a field set away from its default where
  # nothing reads it would be silently ignored, so it is refused.
  FLOW_FIELDS = ("time_distribution", "logit_mean", "logit_scale", "shift", "loss_weighting")
  LOGIT_FIELDS = ("logit_mean", "logit_scale")

  def check(self):
    default = Diffusion()
    for name in self.FLOW_FIELDS:
      value = getattr(self, name)
      if value == getattr(default, name):
        continue
      if self.objective != "flow":
        fields.fail(
          f"diffusion.{name}",
          value,
          f"shapes only diffusion.objective='flow', not {self.objective!r}, which would ignore it",
          f"set --config.diffusion.objective=flow, or leave diffusion.{name} at its "
          f"default {getattr(default, name)!r}",
        )
      if name in self.LOGIT_FIELDS and self.time_distribution != "logit_normal":
        fields.fail(
          f"diffusion.{name}",
          value,
          "shapes only diffusion.time_distribution='logit_normal', not "
          f"{self.time_distribution!r}, which would ignore it",
          f"set --config.diffusion.time_distribution=logit_normal, or leave "
          f"diffusion.{name} at its default {getattr(default, name)!r}",
        )


@dataclasses.dataclass
class Data:
  """What training reads and how rows are packed (data/)."""

  name: str = "imagenet"  # a dataset of data/sources/ (or "mix")
  dir: str = ""  # its prepared folder (`python -m monoformer_jax.data.prepare`)
  split: str = "train"
  tokenizer: str = ""  # "bytes", a tokenizer.model or a tokenizer.json
  # Columns per row. 288 holds the longest ImageNet class prompt with its 256
  # image tokens (277 with a Llama tokenizer): 7% padding (configs/imagenet256.py).
  seq_len: int = spec(288, low=2)
  # Global ROWS per step, not examples: a row holds as many examples as fit its
  # columns and max_images_per_row (one 256-token image per row at the default).
  batch_size: int = spec(256, low=1)
  max_images_per_row: int = spec(1, low=1)
  max_read_images_per_row: int = spec(0, low=0)
  text_fraction: float = spec(0.0, low=0, high=1)  # share of examples that are text-only
  read_fraction: float = spec(0.0, low=0, high=1)  # share that read an image and name it
  interleaved_fraction: float = spec(0.0, low=0, high=1)  # text with images drawn inline
  edit_fraction: float = spec(0.0, low=0, high=1)  # read an image, draw another
  cfg_drop_prob: float = spec(0.1, low=0, high=1)  # prompt dropped (empty) for guidance
  latent_sample: bool = True  # a fresh draw from each stored posterior; False: its mean
  random_flip: bool = True  # mirror half the images (when prepared with --flip)
  mix: Mapping[str, float] = spec({})  # name="mix": {dataset: weight}
  dirs: Mapping[str, str] = spec({})  # name="mix": {dataset: prepared folder}
  chat_template: str = "human_assistant"  # data/chat.py's templates
  train_on_source: bool = False  # chat: also the loss on the human's turns
  prefetch: int = spec(2, low=0)  # batches packed ahead in a thread
  workers: int = spec(8, low=0)  # processes that make the examples (0: in-process)
  shards: int = spec(0, low=0, fix="0 gives one shard per process")

  def check(self):
    for name, weight in self.mix.items():
      fields.real(f"data.mix.{name}", weight, low=0)
    for name, folder in self.dirs.items():
      fields.text(f"data.dirs.{name}", folder)


@dataclasses.dataclass
class Loss:
  w_diff: float = spec(1.0, low=0)
  w_lm: float = spec(0.01, low=0)
  # False: cross-entropy on text-only examples only (the reference);
  # True: also on the prompts and captions of image examples (Transfusion).
  text_on_image_examples: bool = False

  def check(self):
    if self.w_diff == 0 and self.w_lm == 0:
      fields.fail(
        "loss.w_diff", 0.0, "and loss.w_lm are both 0, so nothing is trained", "set one of them > 0"
      )


@dataclasses.dataclass
class Optim:
  """AdamW with a learning-rate schedule (train/schedule.py), a gradient-norm clip, an EMA."""

  lr: float = spec(1e-4, low=0, low_open=True, fix="the reference trains with 1e-4")
  # constant (the paper), cosine (the reference's use_lr_decay=True), wsd
  schedule: LrSchedule = spec(
    "constant",
    fix="the reference's use_lr_decay=True is 'cosine' (docs/architecture.md, the config)",
  )
  warmup_steps: int = spec(0, low=0)  # linear from 0 to lr (the reference's warmup_iters)
  # cosine: the update at which it reaches lr * min_lr_ratio, then kept (the
  # reference's lr_decay_iters); 0: train.num_steps
  decay_steps: int = spec(0, low=0)
  # cosine, wsd: the last lr as a share of lr (the reference's lr_decay_rate)
  min_lr_ratio: float = spec(0.1, low=0, high=1)
  # wsd: the share of train.num_steps, at the end, in which the lr falls, and how
  decay_fraction: float = spec(0.2, low=0, high=1, low_open=True)
  decay_shape: DecayShape = "1-sqrt"
  weight_decay: float = spec(0.0, low=0)
  b1: float = spec(0.9, low=0, high=1, high_open=True)
  b2: float = spec(0.999, low=0, high=1, high_open=True)
  eps: float = spec(1e-8, low=0, low_open=True)
  grad_clip: float = spec(2.0, low=0, low_open=True)
  ema_decay: float = spec(0.9999, low=0, high=1)
  grad_accum_steps: int = spec(1, low=1)

  # The schedules each field shapes: a field set away from its default under
  # another schedule would be silently ignored, so it is refused.
  SCHEDULE_FIELDS = dict(
    decay_steps=("cosine",),
    min_lr_ratio=("cosine", "wsd"),
    decay_fraction=("wsd",),
    decay_shape=("wsd",),
  )

  def check(self):
    default = Optim()
    for name, schedules in self.SCHEDULE_FIELDS.items():
      value = getattr(self, name)
      if self.schedule not in schedules and value != getattr(default, name):
        fields.fail(
          f"optim.{name}",
          value,
          f"shapes only optim.schedule={' or '.join(map(repr, schedules))}, "
          f"not optim.schedule={self.schedule!r}, which would ignore it",
          f"set --config.optim.schedule={schedules[0]}, or leave optim.{name} at its "
          f"default {getattr(default, name)!r}",
        )


@dataclasses.dataclass
class Mesh:
  """Mesh ('data', 'fsdp', 'tensor'); -1 takes the devices left over."""

  data: int = spec(1, low=-1)
  fsdp: int = spec(-1, low=-1)
  tensor: int = spec(1, low=-1)
  # Slices the data axis spans over the data-centre network (the sizes split one
  # slice): TPU slices of a multi-slice run; on GPUs JAX makes each host a slice.
  # -1: as many as the devices form (launch/gpu_slurm.sh passes it).
  dcn_data: int = spec(
    1,
    low=-1,
    fix="the number of slices (TPU slices, GPU hosts) the data axis spans, 1 for one "
    "slice, or -1 for as many as the devices form",
  )

  def check(self):
    sizes = dict(data=self.data, fsdp=self.fsdp, tensor=self.tensor)
    for axis, size in sizes.items():
      if size == 0:
        fields.fail(f"mesh.{axis}", size, "must be >= 1, or -1 for the devices left over")
    if list(sizes.values()).count(-1) > 1:
      fields.fail("mesh", sizes, "may have at most one axis of -1")
    if self.dcn_data == 0:
      fields.fail("mesh.dcn_data", 0, "must be >= 1, or -1 for one per slice the devices form")


@dataclasses.dataclass
class Train:
  num_steps: int = spec(500_000, low=1)
  log_every: int = spec(100, low=1)
  checkpoint_every: int = spec(5_000, low=1)
  keep_checkpoints: int = spec(
    3, low=1, fix="keep at least the newest checkpoint: --config.train.keep_checkpoints=1"
  )
  init_from: str = ""  # a model checkpoint to start from (`convert llama`)
  # Resuming or starting from a checkpoint made with other model settings
  # (rope_theta, eps, ...) is an error unless this is True.
  allow_model_changes: bool = False
  tensorboard: bool = True  # metrics also as TensorBoard events in workdir/tensorboard
  profile_steps: int = spec(0, low=0)  # > 0: a jax.profiler trace of that many steps
  debug_nan_step: int = spec(0, low=0)  # > 0: that step's loss and gradients made NaN


@dataclasses.dataclass
class Sample:
  """The end-of-run samples (train/samples.py) and the samplers' defaults."""

  num_per_class: int = spec(4, low=0)
  num_classes: int = spec(16, low=0)  # the first classes at the end of a run (0: all)
  num_steps: int = spec(20, low=1)  # sampling steps (iddpm: respaced; flow: ODE steps)
  cfg_scale: float = spec(1.5, low=0, fix="0 turns guidance off")
  text_prompts: tuple = ("The capital of France is", "A recipe for pancakes:")
  # Image prompts of free text (text-to-image), one end-of-run image each; or ONE
  # entry ending in .txt: a text file (local or gs://) of one prompt per line
  # (data/prompts.py read_prompts; read and checked when a run starts).
  prompts: tuple = ()
  max_new_tokens: int = spec(256, low=1)
  metrics: tuple = ()  # what the samples are scored with (eval/)

  def check(self):
    for i, prompt in enumerate(self.prompts):
      if not prompt.strip():
        fields.fail(
          f"sample.prompts[{i}]",
          prompt,
          "is empty",
          "give each image prompt some text, or a .txt file of them",
        )


@dataclasses.dataclass
class Evals:
  """Evaluators inside training: every `every` steps, metrics of `num_samples`
  class-balanced samples from the EMA weights, logged as eval/... They sample
  as the reference's sample_ddp.py (the Inception metrics' protocol,
  eval/image_metrics.py): 20 DDPM steps, guidance 1.5, on eps channels 0-2
  of a model of 3 or more channels unless `guide_all_channels`."""

  every: int = spec(10_000, low=0, fix="0 turns the evaluators off")
  metrics: tuple = ()
  num_samples: int = spec(1_000, low=2)  # FID-1K: biased upwards against FID-50K, for trends
  num_steps: int = spec(20, low=1)
  cfg_scale: float = spec(1.5, low=0, fix="0 turns guidance off")
  guide_all_channels: bool = False  # True: guide every eps channel, not the metrics' 0-2
  inception: str = ""  # pytorch-fid's Inception weights (fid, is, ...)
  reference: str = ""  # and a reference batch npz


@dataclasses.dataclass
class Vae:
  path: str = ""  # SD-VAE (a diffusers AutoencoderKL) decoding samples


SECTIONS: dict[str, type] = dict(
  model=Model,
  diffusion=Diffusion,
  data=Data,
  loss=Loss,
  optim=Optim,
  mesh=Mesh,
  train=Train,
  sample=Sample,
  evals=Evals,
  vae=Vae,
)
TOP_LEVEL = dict(seed=0, sharding_rules=SHARDING_RULES)


# ------------------------------------------------------------------- building


def defaults(section: type) -> dict[str, Any]:
  """A section's fields at their defaults."""
  return {f.name: getattr(section(), f.name) for f in dataclasses.fields(section)}


def base() -> ml_collections.ConfigDict:
  """Every field at its default, locked: unknown fields raise, known ones take
  any value of their type (`complete` checks them)."""
  c = ml_collections.ConfigDict(dict(TOP_LEVEL))
  for name, section in SECTIONS.items():
    c[name] = ml_collections.ConfigDict(defaults(section))
  c.lock()
  return c


def complete(config, where: str = "the config") -> ml_collections.ConfigDict:
  """`config` (a ConfigDict or a dict) with every field of the schema, checked.

  A missing field or section takes its default (so configs saved by older
  versions load); an unknown one raises naming the nearest known field.
  Returns a new locked ConfigDict; `config` is not changed."""
  raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  _unknown(raw, list(TOP_LEVEL) + list(SECTIONS), "", where)
  out = {name: raw.get(name, value) for name, value in TOP_LEVEL.items()}
  fields.integer("seed", out["seed"], low=0)
  out["sharding_rules"] = _rules(out["sharding_rules"])
  for name in SECTIONS:
    out[name] = _section_values(name, raw.get(name) or {}, where)
  _check_across(out)
  c = ml_collections.ConfigDict(out)
  c.lock()
  return c


def _check_across(values: dict):
  """The rules between sections that every use of a config needs (the rest,
  those of training or reading files, are monoformer_jax/train/checks.py's)."""
  if values["diffusion"]["objective"] == "flow" and values["model"]["learn_sigma"]:
    # The head's channels follow the objective: a flow model predicts the
    # velocity alone, and channels nothing trains would be silently dead.
    fields.fail(
      "model.learn_sigma",
      True,
      "is IDDPM's learned variance; diffusion.objective='flow' predicts the velocity alone",
      "set --config.model.learn_sigma=False with --config.diffusion.objective=flow",
    )


def section(name: str, values, where: str = "the config") -> ml_collections.ConfigDict:
  """One section (e.g. "mesh") completed and checked, for a library function
  that takes only its section and may be given a partial mapping."""
  if isinstance(values, ml_collections.ConfigDict):
    values = values.to_dict()
  c = ml_collections.ConfigDict(_section_values(name, values, where))
  c.lock()
  return c


def _section_values(name: str, given, where: str) -> dict[str, Any]:
  section = SECTIONS[name]
  if not isinstance(given, Mapping):
    fields.fail(name, given, "must be a section of fields (a ConfigDict)")
  _unknown(given, [f.name for f in dataclasses.fields(section)], f"{name}.", where)
  values = dict(defaults(section), **given)
  for f in dataclasses.fields(section):
    values[f.name] = _checked(f"{name}.{f.name}", values[f.name], f)
  checked = section(**values)
  if hasattr(checked, "check"):
    checked.check()
  return values


def _unknown(given: Mapping, known: list[str], prefix: str, where: str):
  for key in given:
    if key not in known:
      raise not_a_field(f"{prefix}{key}", known, where)


def field_paths() -> list[str]:
  """Every field's dotted name ("seed", "train.num_steps", ...)."""
  return list(TOP_LEVEL) + [
    f"{name}.{f.name}" for name, section in SECTIONS.items() for f in dataclasses.fields(section)
  ]


def not_a_field(path: str, known: list[str], where: str) -> ConfigError:
  """The error for the dotted `path`, whose last name is not among `known` (the
  names beside it): it names the nearest of those, else the fields of that name
  in other sections (`num_steps` -> train.num_steps, sample.num_steps, ...)."""
  prefix, _, key = path.rpartition(".")
  close = difflib.get_close_matches(key, known, n=1)
  elsewhere = [p for p in field_paths() if p.rpartition(".")[2] == key]
  if close:
    hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
  elif elsewhere:
    hint = f"did you mean {' or '.join(elsewhere)}?"
  else:
    hint = f"the fields there are {sorted(known)}"
  return ConfigError(
    f"{path} is not a config field ({where}): {hint} (every "
    "field and its default: monoformer_jax/config/schema.py)"
  )


def _checked(name: str, value, f: dataclasses.Field):
  """`value` checked against the field's type and bounds, as that type."""
  kind, bounds = f.type, dict(f.metadata)
  if typing.get_origin(kind) is Literal:
    return fields.one_of(name, value, typing.get_args(kind), fix=bounds.get("fix"))
  if kind is int:
    return fields.integer(
      name, value, low=bounds.get("low"), high=bounds.get("high"), fix=bounds.get("fix")
    )
  if kind is float:
    return fields.real(
      name,
      value,
      low=bounds.get("low"),
      high=bounds.get("high"),
      low_open=bounds.get("low_open", False),
      high_open=bounds.get("high_open", False),
      fix=bounds.get("fix"),
    )
  if kind is bool:
    return fields.boolean(name, value)
  if kind is str:
    return fields.text(name, value)
  if kind is tuple:
    return fields.strings(name, value)
  if typing.get_origin(kind) is collections.abc.Mapping:
    if not isinstance(value, Mapping):
      fields.fail(
        name,
        value,
        "must be a mapping of names",
        f"e.g. {fields.flag_of(name)}=\"{{'chat': 1.0}}\"",
      )
    return dict(value)
  return value  # Any: checked by its owner (model.vision: model/clip.py)


def _rules(rules) -> tuple:
  """sharding_rules as a tuple of (logical name, mesh axes) pairs."""
  try:
    pairs = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
  except (TypeError, ValueError):
    fields.fail(
      "sharding_rules",
      rules,
      "must be (logical axis, mesh axes) pairs",
      "see SHARDING_RULES in monoformer_jax/config/schema.py",
    )
  return pairs
