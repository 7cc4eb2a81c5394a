"""Scores of a model or of its samples, by metric name, for every caller:
`python -m monoformer_jax.evaluate`, the evaluators inside training
(`config.evals`, `TrainingEvals`) and the end-of-run samples (train/samples.py).

The metrics are the registry's (eval/registry.py): a metric scores uint8
class-conditional samples (`score_images`) or the model itself
(`Evaluator.score_model`). The evaluators' numbers become the training log's
`eval/...` row (`eval_row`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from monoformer_jax.errors import FileFormatError
from monoformer_jax.eval import registry


def check_samples(
  shape: tuple[int, ...],
  labels_N: np.ndarray | None,
  evaluators: Sequence[registry.Evaluator],
  source: str = "the samples",
) -> None:
  """Whether the sample evaluators among `evaluators` can score uint8 images
  of `shape` [N, H, W, C] with these class labels (None when not known),
  before any of them scores (so one that cannot does not throw away the
  others' work): enough images for every metric, one integer label per
  image, within the classes of each evaluator that reads them, and each
  evaluator's own needs (`Evaluator.check_samples`). A FileFormatError names
  `source`, the value and the fix."""
  scoring = [e for e in evaluators if e.scores == "samples"]
  if not scoring:
    return
  n = shape[0]
  least, names = max((e.min_samples(e.names), e.names) for e in scoring)
  if n < least:
    raise FileFormatError(
      f"{source} holds {n} image(s), but {list(names)} need at least {least}: "
      f"score at least {least} samples"
    )
  if labels_N is not None:
    labels = np.asarray(labels_N)
    if labels.shape != (n,):
      raise FileFormatError(
        f"{source}: the labels have shape {list(labels.shape)} for {n} images; "
        f"save one class label per image, shape [{n}]"
      )
    if not np.issubdtype(labels.dtype, np.integer):
      raise FileFormatError(
        f"{source}: the labels are {labels.dtype}, not integers (e.g. "
        f"{labels[:3].tolist()}); save the class indices as integers"
      )
  for evaluator in scoring:
    k = evaluator.num_classes
    if k is None:
      continue
    if labels_N is None:
      raise FileFormatError(
        f"{source} has no labels, but {list(evaluator.names)} score each image "
        "against its class: save each image's class (ADM's arr_1)"
      )
    outside = np.unique(labels[(labels < 0) | (labels >= k)])
    if outside.size:
      raise FileFormatError(
        f"{source}: labels {outside[:5].tolist()}{' ...' if outside.size > 5 else ''} "
        f"({int(np.isin(labels, outside).sum())} of {n}) lie outside the classes 0..{k - 1} "
        f"that {list(evaluator.names)} score: save class indices from 0"
        + (" (labels - 1, as they count from 1)" if labels.min() == 1 else "")
      )
  for evaluator in scoring:
    evaluator.check_samples(tuple(shape), source)


def score_images(
  images_NxHxWxC: np.ndarray,
  labels_N: np.ndarray | None,
  evaluators: Sequence[registry.Evaluator],
  source: str = "the samples",
) -> dict:
  """The metrics of the sample evaluators among `evaluators` (registry.make)
  of uint8 images and their class labels (None when not known), all checked
  first (`check_samples`; errors name `source`)."""
  images = np.asarray(images_NxHxWxC)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise FileFormatError(
      f"{source} must be uint8 [N, H, W, C] (ADM's arr_0), not {images.dtype} {images.shape}"
    )
  check_samples(images.shape, labels_N, evaluators, source)
  results = {}
  for evaluator in evaluators:
    if evaluator.scores == "samples":
      results.update(evaluator.score_samples(images, labels_N))
  return results


def score_model(
  evaluators: Sequence[registry.Evaluator],
  model,
  tokenizer,
  config,
  *,
  num_steps: int,
  cfg_scale: float | None,
  seed: int,
  outdir: str | None = None,
) -> dict:
  """{name: metrics} of the model evaluators among `evaluators`."""
  results = {}
  for evaluator in evaluators:
    if evaluator.scores == "model":
      results.update(
        evaluator.score_model(
          model,
          tokenizer,
          config,
          num_steps=num_steps,
          cfg_scale=cfg_scale,
          seed=seed,
          outdir=outdir,
        )
      )
  return results


class TrainingEvals:
  """The evaluators inside training (big_vision's habit): `config.evals`
  names metrics run every `evals.every` steps on the EMA weights (sample
  metrics on `evals.num_samples` class-balanced samples, `evals.num_steps`
  DDPM steps, guidance `evals.cfg_scale` on the eps channels the metrics'
  protocol guides, every one with `evals.guide_all_channels`:
  `protocol`), logged with the training metrics as `eval/<metric>`. The files that the metrics read (config.evals) and the
  VAE are read once, when training starts."""

  def __init__(self, config):
    from monoformer_jax import inference
    from monoformer_jax.data.datasets import class_names
    from monoformer_jax.eval.sampling import class_labels

    self.config = config
    ev = config.evals
    self.every = int(ev.every) if ev.metrics else 0
    if not self.every:
      return
    # The fields are checked with the training config (registry.check_training_metrics).
    self.metrics = tuple(ev.metrics)
    self.evaluators = registry.make(self.metrics, registry.training_settings(config, self.metrics))
    self.labels = None
    if registry.sample_metrics(self.metrics):
      self.labels = class_labels(
        ev.num_samples, len(class_names(config)), seed=config.seed, balanced=True
      )
    self.vae = inference.load_vae_of(config)
    self.guided_channels = training_protocol(config)["guided_channels"]

  def due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def __call__(self, model, tokenizer) -> dict[str, float]:
    """The metrics of `model` (the EMA weights) as flat `eval/...` numbers."""
    from monoformer_jax.eval.sampling import sample_classes

    ev, config = self.config.evals, self.config
    t0 = time.perf_counter()
    results = {}
    if self.labels is not None:
      images = sample_classes(
        model,
        config,
        tokenizer,
        self.labels,
        num_steps=ev.num_steps,
        cfg_scale=ev.cfg_scale,
        guided_channels=self.guided_channels,
        seed=config.seed,
        vae=self.vae,
      )
      results = score_images(images, self.labels, self.evaluators)
    flat = eval_row(
      results,
      score_model(
        self.evaluators,
        model,
        tokenizer,
        config,
        num_steps=ev.num_steps,
        cfg_scale=ev.cfg_scale,
        seed=config.seed,
      ),
    )
    flat["eval/seconds"] = time.perf_counter() - t0
    return flat


def training_protocol(config) -> dict:
  """How the evaluators inside training sample (registry.sampling_protocol):
  config.evals' steps and scale, the eps channels its metrics guide unless
  `evals.guide_all_channels`."""
  ev = config.evals
  return registry.sampling_protocol(
    tuple(ev.metrics),
    config,
    num_steps=ev.num_steps,
    cfg_scale=ev.cfg_scale,
    guide_all_channels=ev.guide_all_channels,
  )


def eval_row(image_scores: dict, model_scores: dict) -> dict[str, float]:
  """The evaluators' eval/ numbers of `score_images`' results and of the
  model metrics' ({'reading': {'reading_accuracy': ...}}):
  eval/digits_classifier_accuracy, eval/reading_accuracy, ... (lists and
  strings, e.g. per-class shares, left out)."""
  results = dict(image_scores)
  for name, values in model_scores.items():
    results[name] = {k.removeprefix(f"{name}_"): v for k, v in values.items()}
  return {f"eval/{k}": v for k, v in flat_numbers(results).items()}


def end_samples_score_evals(config) -> bool:
  """Whether the end-of-run samples (train/samples.py) compute every metric of
  `config.evals` with the evaluator's settings: as many samples of every
  class (the evaluator's are class-balanced), its DDPM steps and guidance
  (on every channel, as the end-of-run samples guide), the same sample metrics (so their scores are the evaluator's row) and its
  model metrics among theirs. The evaluator at the last step would then
  repeat their work (14-28 s of the digits main job), so the training loop
  logs their numbers as that step's eval/ row instead (`eval_row_of_samples`).
  The two differ only in their random draws (seeds, the order of the labels)."""
  from monoformer_jax.data.datasets import class_names

  ev, sc = config.evals, config.sample
  if not ev.every or not ev.metrics:
    return False
  classes = len(class_names(config))
  if (
    sc.num_classes not in (0, classes)
    or not classes
    or ev.num_samples != sc.num_per_class * classes
    or ev.num_steps != sc.num_steps
    or ev.cfg_scale != sc.cfg_scale
    or training_protocol(config)["guided_channels"] is not None
  ):
    return False
  scored = registry.end_of_run_metrics(config)
  return set(registry.sample_metrics(ev.metrics)) == set(registry.sample_metrics(scored)) and set(
    ev.metrics
  ) <= set(scored)


def eval_row_of_samples(config, image_scores: dict, model_scores: dict) -> dict[str, float]:
  """The end-of-run samples' scores (train/samples.py: those of its samples,
  {name: metrics} of the model) as the eval/ row the evaluator would log for
  `config.evals.metrics` (TrainingEvals' keys)."""
  return eval_row(
    image_scores, {n: model_scores[n] for n in config.evals.metrics if n in model_scores}
  )


def flat_numbers(results: dict) -> dict[str, float]:
  """`score_images`' numbers as one level (lists left out):
  {'digits_classifier_accuracy': ..., 'fid': ...}."""
  flat = {}
  for name, value in results.items():
    if isinstance(value, dict):
      flat.update(
        {f"{name}_{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))}
      )
    else:
      flat[name] = float(value)
  return flat
