"""Scores of a model or of its samples, by metric name: what `python -m
monoformer_jax.evaluate` and the evaluators inside training (`config.evals`)
both call.

    fid, sfid, is, precision_recall   ADM's evaluator's metrics of uint8 samples against a
                                      reference batch, on the FID Inception's features
                                      (eval/inception.py, eval/fid.py)
    digits                            the embedded default: the share of samples a classifier
                                      fitted on the real digits labels with the prompted
                                      digit, and a Fréchet distance in its feature space
                                      (eval/digits.py)
    commonsense                       zero-shot multiple choice by log-likelihood
                                      (eval/commonsense.py); needs the model, not samples
    reading                           the digits model READING held-out real digits: the
                                      share it names right by greedy text
                                      (eval/digits.reading_accuracy); needs the model
    interleaved                       the digits model writing text with images inline: the
                                      share of its drawings labelled with the digit its text
                                      names just before (eval/digits.interleaved_accuracy)
    editing                           the digits model redrawing held-out real digits as
                                      "the next digit:" (eval/digits.editing_accuracy)
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging

from monoformer_jax.errors import ConfigError, FileFormatError
from monoformer_jax.eval.digits import DIGITS_MODEL_METRICS
from monoformer_jax.eval.fid import METRICS as IMAGE_METRICS
SAMPLE_METRICS = IMAGE_METRICS + ("digits",)    # computed from samples
MODEL_METRICS = ("commonsense",) + DIGITS_MODEL_METRICS   # computed from the model itself
METRICS = SAMPLE_METRICS + MODEL_METRICS


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


def _inception_features(images, inception, what: str, batch_size: int):
  from monoformer_jax.eval.inception import inception_features
  import tqdm
  t0 = time.perf_counter()
  writer = jax.process_index() == 0
  # This host's devices: the scores are computed by one process (process 0).
  local = jax.sharding.Mesh(np.array(jax.local_devices()), ("batch",))
  with tqdm.tqdm(total=len(images), unit="img", desc=f"Inception ({what})",
                 disable=not writer) as bar:
    features = inception_features(inception, images, batch_size=batch_size, mesh=local,
                                  progress=lambda done: bar.update(done - bar.n))
  logging.info("Inception features of %d %s in %.1f s", len(images), what,
               time.perf_counter() - t0)
  return features


def score_images(images_NxHxWxC: np.ndarray, labels_N: np.ndarray | None,
                 metrics: Sequence[str], *, inception=None, reference=None,
                 batch_size: int = 200) -> dict:
  """The sample metrics among `metrics` of uint8 images (and their class
  labels, for `digits`). Image metrics need `inception` (an InceptionV3 from
  `inception.load_inception`) and `reference` (a `fid.ReferenceBatch`)."""
  images = np.asarray(images_NxHxWxC)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise FileFormatError(f"samples must be uint8 [N, H, W, C] (ADM's arr_0), not "
                          f"{images.dtype} {images.shape}")
  results = {}
  if "digits" in metrics:
    from monoformer_jax.eval import digits
    if labels_N is None:
      raise FileFormatError("the digits metric needs each sample's prompted digit: the "
                            "samples npz has no labels (arr_1, or `labels`)")
    if images.shape[1:] != (8, 8, 1):
      raise FileFormatError(f"the digits metric scores 8x8 grayscale digits [N, 8, 8, 1]; "
                            f"these samples are {list(images.shape[1:])}: sample the digits "
                            "model (configs/digits.py), or ask for the Inception metrics")
    if len(labels_N) != len(images):
      raise FileFormatError(f"{len(images)} samples but {len(labels_N)} labels: the npz's "
                            "arr_1 must hold one prompted digit per image")
    results["digits"] = digits.sample_metrics(images.astype(np.float32) / 255.0, labels_N)
  wanted = [m for m in metrics if m in IMAGE_METRICS]
  if wanted:
    from monoformer_jax.eval import fid
    if inception is None or reference is None:
      raise ConfigError(f"{wanted} need the Inception weights (--inception=pt_inception-"
                        "2015-12-05-6726825d.pth, pytorch-fid's file) and a reference batch "
                        "(--reference=VIRTUAL_imagenet256_labeled.npz)")
    if images.shape[-1] != 3:
      raise FileFormatError(f"Inception metrics need RGB samples; these have "
                            f"{images.shape[-1]} channel(s) (the digits model's are "
                            "grayscale: use --metrics=digits)")
    if reference.resolution is not None and reference.resolution != images.shape[1]:
      raise FileFormatError(
          f"the samples are {images.shape[1]}x{images.shape[2]} but the reference batch is "
          f"{reference.resolution}x{reference.resolution}: sample at the reference's "
          "resolution (or give the reference batch of this resolution)")
    sample_features = _inception_features(images, inception, "samples", batch_size)
    needs_reference_images = ("precision_recall" in wanted
                              or ("fid" in wanted and reference.fid is None)
                              or ("sfid" in wanted and reference.sfid is None))
    reference_features = None
    if needs_reference_images and reference.images is not None:
      reference_features = _inception_features(np.asarray(reference.images), inception,
                                                "reference", batch_size)
    results.update(fid.image_metrics(sample_features, reference_features, reference, wanted))
  return results



class TrainingEvals:
  """The evaluators inside training (big_vision's habit): `config.evals`
  names sample metrics run every `evals.every` steps on the EMA weights,
  on `evals.num_samples` class-balanced samples (`evals.num_steps` DDPM steps,
  guidance `evals.cfg_scale`), logged with the training metrics as
  `eval/<metric>`. The Inception weights, reference batch and VAE that the
  metrics need are read once, when training starts."""

  def __init__(self, config):
    from monoformer_jax import inference
    from monoformer_jax.data.datasets import class_names
    from monoformer_jax.eval.sampling import class_labels
    self.config = config
    ev = config.get("evals", None)
    self.every = int(ev.every) if ev is not None and ev.metrics else 0
    if not self.every:
      return
    # The fields are checked with the training config (checks.py).
    self.metrics = tuple(ev.metrics)
    self.labels = class_labels(ev.num_samples, len(class_names(config)), seed=config.seed,
                               balanced=True)
    self.inception, self.reference = metric_files(config, self.metrics)
    self.vae = inference.load_vae_of(config)

  def due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def __call__(self, model, tokenizer) -> dict[str, float]:
    """The metrics of `model` (the EMA weights) as flat `eval/...` numbers."""
    from monoformer_jax.eval.sampling import sample_classes
    ev, config = self.config.evals, self.config
    t0 = time.perf_counter()
    results = {}
    sample_metrics = [m for m in self.metrics if m in SAMPLE_METRICS]
    if sample_metrics:
      images = sample_classes(model, config, tokenizer, self.labels, num_steps=ev.num_steps,
                              cfg_scale=ev.cfg_scale, seed=config.seed, vae=self.vae)
      results = score_images(images, self.labels, sample_metrics, inception=self.inception,
                             reference=self.reference)
    from monoformer_jax.eval.digits import model_metrics
    flat = eval_row(results, model_metrics(model, tokenizer, config, self.metrics,
                                           num_steps=ev.num_steps, cfg_scale=ev.cfg_scale))
    flat["eval/seconds"] = time.perf_counter() - t0
    return flat


def eval_row(image_scores: dict, model_scores: dict) -> dict[str, float]:
  """The evaluators' eval/ numbers of `score_images`' results and of the
  digits model metrics' ({'reading': {'reading_accuracy': ...}}):
  eval/digits_classifier_accuracy, eval/reading_accuracy, ... (lists and
  strings, e.g. the per-digit shares, left out)."""
  results = dict(image_scores)
  for name, values in model_scores.items():
    results[name] = {k.removeprefix(f"{name}_"): v for k, v in values.items()}
  return {f"eval/{k}": v for k, v in flat_numbers(results).items()}


def end_samples_score_evals(config) -> bool:
  """Whether the end-of-run samples (train/samples.py) compute every metric of
  `config.evals` with the evaluator's settings: as many samples of every
  class (the evaluator's are class-balanced), its DDPM steps and guidance.
  The evaluator at the last step would then repeat their work (14-28 s of the
  digits main job), so the training loop logs their numbers as that step's
  eval/ row instead (`eval_row_of_samples`). The two differ only in their
  random draws (seeds, the order of the labels)."""
  from monoformer_jax.data.datasets import class_names
  from monoformer_jax.eval.digits import end_of_run_model_metrics
  ev, sc = config.get("evals", None), config.sample
  if ev is None or not ev.every or not ev.metrics:
    return False
  classes = len(class_names(config))
  if (sc.get("num_classes", 0) not in (0, classes) or not classes
      or ev.num_samples != sc.num_per_class * classes
      or ev.num_steps != sc.num_steps or ev.cfg_scale != sc.cfg_scale):
    return False
  scored = set(sc.get("metrics", ())) | set(end_of_run_model_metrics(config))
  return all(m in scored for m in ev.metrics)


def eval_row_of_samples(config, metrics: dict) -> dict[str, float]:
  """The end-of-run samples' `metrics` (train/samples.py) as the eval/ row the
  evaluator would log for `config.evals.metrics` (TrainingEvals' keys): the
  model metrics' keys are prefixed with their name in both."""
  names = config.evals.metrics
  return eval_row({n: metrics[n] for n in names if n in SAMPLE_METRICS},
                  {n: {k: v for k, v in metrics.items() if k.startswith(f"{n}_")}
                   for n in names if n not in SAMPLE_METRICS})


def flat_numbers(results: dict) -> dict[str, float]:
  """`score_images`' numbers as one level (digits' per-digit list left out):
  {'digits_classifier_accuracy': ..., 'fid': ...}."""
  flat = {}
  for name, value in results.items():
    if isinstance(value, dict):
      flat.update({f"{name}_{k}": float(v) for k, v in value.items()
                   if isinstance(v, (int, float))})
    else:
      flat[name] = float(value)
  return flat


def metric_files(config, metrics: Sequence[str]):
  """(InceptionV3, ReferenceBatch) that `metrics` need, from `config.evals`
  (None, None when no Inception metric is named)."""
  if not any(m in IMAGE_METRICS for m in metrics):
    return None, None
  from monoformer_jax.eval.fid import ReferenceBatch
  from monoformer_jax.eval.inception import load_inception
  return load_inception(config.evals.inception), ReferenceBatch(config.evals.reference)
