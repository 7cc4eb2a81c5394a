"""The evaluators by metric name (big_vision's: a module per family, made by name).

A family's module holds `EVALUATORS`, {metric name: an `Evaluator` class}, and
is registered below by one line, imported only when one of its metrics is
asked for. Everything generic (`python -m monoformer_jax.evaluate`, the
evaluators inside training, the end-of-run samples, the config checks) asks
this module what a metric scores, which files it reads and whether it may run
inside training; none of it names a metric. Adding one: its module and its
line below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from etils import epath

from monoformer_jax.config.fields import fail, flag_of
from monoformer_jax.errors import ConfigError, PathError

# the module of each family -> the metric names it defines
FAMILIES = {
  "monoformer_jax.eval.image_metrics": ("fid", "sfid", "is", "precision_recall"),
  "monoformer_jax.eval.commonsense": ("commonsense",),
  "monoformer_jax.digits.evaluators": ("digits", "reading", "interleaved", "editing"),
}
METRICS = tuple(name for names in FAMILIES.values() for name in names)


class Evaluator:
  """The metrics of one class of a family, made for the names asked for.

  `settings` holds what the caller was given: the files (`files`, from
  config.evals in training, from flags for evaluate) and the evaluate flags
  its family reads. Loading (weights, reference batches) happens when it is
  made, before any sampling."""

  # "samples": uint8 class-conditional samples [N, H, W, C] and their labels
  # (`score_samples`); "model": the model itself (`score_model`).
  scores = "samples"
  in_training = True  # config.evals and sample.metrics may name it
  # The files it reads, {name: what it is}: config.evals.<name> inside
  # training, --<name> for `python -m monoformer_jax.evaluate`.
  files: dict[str, str] = {}
  folders: tuple[str, ...] = ()  # those of `files` that may be a folder instead
  num_samples = 1000  # evaluate's default sample count
  # Its sampling protocol (`sampling_protocol`): evaluate's default DDPM steps
  # and guidance scale (None: config.sample's), and the eps channels it guides,
  # [0, guided_channels) of a model with at least that many (None: every one).
  num_steps: int | None = None
  cfg_scale: float | None = None
  guided_channels: int | None = None
  # The class labels it reads lie in [0, num_classes); None: it reads none.
  num_classes: int | None = None

  def __init__(self, names: Sequence[str], settings: Mapping[str, Any]):
    self.names = tuple(names)

  @classmethod
  def check(cls, names: Sequence[str], settings: Mapping[str, Any], flag: Callable[[str], str]):
    """Its settings before anything is loaded; `flag(name)` is how the user
    sets one (`--inception`, `--config.evals.inception`)."""
    for name, what in cls.files.items():
      path = settings.get(name) or ""
      if not path:
        raise ConfigError(f"{list(names)} need {flag(name)}, {what}")
      where = epath.Path(path)  # local or on a bucket (gs://...)
      if not (where.is_file() or (name in cls.folders and where.is_dir())):
        kind = "a file or a folder" if name in cls.folders else "a file"
        raise PathError(f"{flag(name)}={path!r} is not {kind}: {list(names)} read {what} from it")

  @classmethod
  def problem(cls, name: str, config) -> str | None:
    """Why `name` cannot score a model trained with `config` (None: it can)."""
    return None

  @classmethod
  def at_end_of_run(cls, name: str, config) -> bool:
    """Whether a training run of `config` scores `name` at its end unasked
    (beside sample.metrics)."""
    return False

  @classmethod
  def min_samples(cls, names: Sequence[str]) -> int:
    """The fewest samples the metrics `names` are defined on."""
    return 1

  def check_samples(self, shape: tuple[int, ...], source: str) -> None:
    """Raises a FileFormatError naming `source` when it cannot score uint8
    samples of `shape` [N, H, W, C]. score.check_samples asks every evaluator
    (and checks the count and the labels) before any of them scores."""

  def score_samples(self, images_NxHxWxC, labels_N) -> dict:
    """Its metrics of uint8 samples and their class labels (None: not known)."""
    raise NotImplementedError

  def score_model(
    self,
    model,
    tokenizer,
    config,
    *,
    num_steps: int,
    cfg_scale: float | None,
    seed: int,
    outdir: str | None = None,
  ) -> dict:
    """{name: its metrics} of `model`, sampling with `num_steps` DDPM steps and
    guidance `cfg_scale`; with `outdir`, the files it shows its work in
    (written by the caller's process 0 only)."""
    raise NotImplementedError


def evaluator_class(name: str) -> type[Evaluator]:
  """The Evaluator class of the metric `name` (its family imported now)."""
  for module, names in FAMILIES.items():
    if name in names:
      return importlib.import_module(module).EVALUATORS[name]
  raise ConfigError(f"unknown metric {name!r}: choose among {METRICS}")


def check_metrics(names: Sequence[str], flag: str = "--metrics") -> tuple[str, ...]:
  """The metric names, checked (known, none twice, at least one)."""
  names = tuple(n.strip() for n in names if n.strip())
  if not names:
    raise ConfigError(f"{flag} is empty: name at least one of {METRICS}")
  unknown = [n for n in names if n not in METRICS]
  if unknown:
    raise ConfigError(f"{flag} names unknown metric(s) {unknown}: choose among {METRICS}")
  if len(set(names)) != len(names):
    raise ConfigError(f"{flag}={','.join(names)} names a metric twice")
  return names


def families(names: Sequence[str]) -> dict[type[Evaluator], tuple[str, ...]]:
  """{Evaluator class: the names among `names` it scores}, in the order asked."""
  out: dict[type[Evaluator], tuple[str, ...]] = {}
  for name in names:
    cls = evaluator_class(name)
    out[cls] = out.get(cls, ()) + (name,)
  return out


def make(names: Sequence[str], settings: Mapping[str, Any] | None = None) -> list[Evaluator]:
  """The evaluators of `names`, one per class, made (and their files loaded)."""
  return [cls(group, settings or {}) for cls, group in families(names).items()]


def sample_metrics(names: Sequence[str]) -> tuple[str, ...]:
  """Those of `names` that score samples (the rest score the model)."""
  return tuple(n for n in names if evaluator_class(n).scores == "samples")


def sampling_protocol(
  names: Sequence[str],
  config,
  *,
  num_steps: int | None = None,
  cfg_scale: float | None = None,
  guide_all_channels: bool = False,
) -> dict:
  """How the metrics `names` sample a model of `config`: {num_steps,
  cfg_scale, guided_channels}, their evaluators' protocol (`Evaluator.
  num_steps`, ...; the most steps any asks for, config.sample's where none
  says) unless `num_steps` or `cfg_scale` is given. The eps channels an
  evaluator guides (the Inception metrics: 0-2, as the reference's
  sample_ddp.py) are guided only on a model with that many;
  `guide_all_channels` guides every channel (None, as without guidance)."""
  classes = list(families(names))
  if num_steps is None:
    num_steps = (
      max((cls.num_steps for cls in classes if cls.num_steps), default=None)
      or config.sample.num_steps
    )
  if cfg_scale is None:
    cfg_scale = next(
      (cls.cfg_scale for cls in classes if cls.cfg_scale is not None), config.sample.cfg_scale
    )
  guided = None
  if cfg_scale and not guide_all_channels:  # no guidance guides no channel
    guided = min((cls.guided_channels for cls in classes if cls.guided_channels), default=None)
    if guided is not None and guided > int(config.model.in_channels):
      guided = None  # a model of fewer channels (the digits' 1) guides them all
  return dict(num_steps=int(num_steps), cfg_scale=cfg_scale, guided_channels=guided)


def training_settings(config, names: Sequence[str]) -> dict[str, str]:
  """The files the evaluators of `names` read inside training: config.evals' fields."""
  return {name: config.evals[name] for cls in families(names) for name in cls.files}


def check_training_metrics(config, field: str):
  """The metrics a training config names in `field` ("evals.metrics" or
  "sample.metrics"): known, allowed inside training, able to score this
  config's model, their files there (config.evals)."""
  section, _ = field.split(".")
  names = tuple(config[section].metrics)
  if not names:
    return
  names = check_metrics(names, field)
  for name in names:
    cls = evaluator_class(name)
    if not cls.in_training:
      fail(
        field,
        names,
        f"names {name}, which does not run inside training",
        f"run `python -m monoformer_jax.evaluate --metrics={name}` on a checkpoint",
      )
    problem = cls.problem(name, config)
    if problem:
      fail(field, names, f"names {problem}", f"leave {name} out")
  settings = training_settings(config, names)
  count = _training_sample_count(config, section)
  for cls, group in families(names).items():
    cls.check(group, settings, lambda name: flag_of(f"evals.{name}"))
    need = cls.min_samples(group) if cls.scores == "samples" else 0
    if count and count < need:
      fail(
        field,
        names,
        f"scores {count} samples, and {list(group)} need at least {need}",
        f"raise {flag_of('evals.num_samples' if section == 'evals' else 'sample.num_per_class')}",
      )


def _training_sample_count(config, section: str) -> int:
  """How many samples the sample metrics of `section` score inside training."""
  if section == "evals":
    return int(config.evals.num_samples)
  from monoformer_jax.data.datasets import class_names

  return int(config.sample.num_per_class) * len(class_names(config))


def end_of_run_metrics(config) -> tuple[str, ...]:
  """What a training run of `config` scores at its end: sample.metrics, then
  every metric whose evaluator asks to (`Evaluator.at_end_of_run`)."""
  asked = tuple(config.sample.metrics)
  return asked + tuple(
    n for n in METRICS if n not in asked and evaluator_class(n).at_end_of_run(n, config)
  )
