"""The embedded default's evaluators: are its digits recognisable, does it read,
interleave and edit? A classifier fitted on the real digits says.

    digits       samples: the share the classifier labels with the prompted
                 digit, and a Fréchet distance in its feature space
    reading      the model READING held-out real digits: the share it names
                 right by greedy text (`reading_accuracy`)
    interleaved  the model writing text with images inline: the share of its
                 drawings labelled with the digit its text names just before
                 (`interleaved_accuracy`; at the end of a run, interleaved.html)
    editing      the model redrawing held-out real digits as "the next digit:"
                 (`editing_accuracy`; at the end of a run, editing.png)
The model metrics score the digits model only; a run that trained with
reading, interleaved or edit examples scores them at its end unasked.

The classifier (logistic regression on scikit-learn's 8x8 digits, pixels in
[0, 1]) labels held-out real digits right ~93% of the time (5-fold);
`prompted_accuracy` is the share of generated images it labels with the
digit they were prompted with. Accuracy misses a generator that draws one
good seven every time; `frechet_distance` does not: FID's Fréchet distance
between Gaussians fitted to the classifier's 10 decision values (its feature
space: one log-odds per digit) of the samples and of all 1,797 real digits.
Its floor is not 0 at a finite sample count, so `real_frechet_distance`
gives what real digits score: a subset of the real digits with the samples'
label counts, drawn without replacement, against all of them.
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
from absl import logging

from monoformer_jax.digits import source as digits_data
from monoformer_jax.errors import FileFormatError
from monoformer_jax.eval.registry import Evaluator


@functools.lru_cache(maxsize=1)
def _real_digits():
  """scikit-learn's 1,797 digits: pixels [N, 64] in [0, 1], labels [N]."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  return digits.images.reshape(len(digits.images), -1) / 16.0, digits.target


@functools.lru_cache(maxsize=1)
def digit_classifier():
  from sklearn.linear_model import LogisticRegression

  clf = LogisticRegression(max_iter=2000, C=0.5)
  clf.fit(*_real_digits())
  return clf


def prompted_accuracy(images_Bx8x8, labels_B) -> tuple[float, np.ndarray]:
  """(accuracy, per-digit accuracy [10]) of images in [0, 1] against prompts."""
  pred = digit_classifier().predict(np.asarray(images_Bx8x8).reshape(len(labels_B), -1))
  labels_B = np.asarray(labels_B)
  per_digit = np.array(
    [(pred[labels_B == d] == d).mean() if (labels_B == d).any() else np.nan for d in range(10)]
  )
  return float((pred == labels_B).mean()), per_digit


def classifier_features(images_Bx8x8) -> np.ndarray:
  """The classifier's decision values [B, 10] of images in [0, 1]."""
  flat = np.asarray(images_Bx8x8, np.float64).reshape(len(images_Bx8x8), -1)
  return digit_classifier().decision_function(flat)


@functools.lru_cache(maxsize=1)
def _real_statistics():
  from monoformer_jax.eval.fid import statistics

  return statistics(classifier_features(_real_digits()[0]))


def frechet_distance(images_Bx8x8) -> float:
  """Fréchet distance of the images' classifier features to the real digits'."""
  from monoformer_jax.eval.fid import frechet_distance as distance
  from monoformer_jax.eval.fid import statistics

  return distance(statistics(classifier_features(images_Bx8x8)), _real_statistics())


def real_frechet_distance(labels_B, seed: int = 0) -> float:
  """What real digits score: a subset of the real digits with these label
  counts (without replacement; a class asked for more often than it has real
  digits takes all of them) against all of them."""
  images, targets = _real_digits()
  rng = np.random.default_rng(seed)
  labels_B = np.asarray(labels_B)
  picked = [
    rng.choice(
      np.flatnonzero(targets == d),
      min(int((labels_B == d).sum()), int((targets == d).sum())),
      replace=False,
    )
    for d in range(10)
  ]
  return frechet_distance(images[np.concatenate(picked)])


def sample_metrics(images_BxhxwxC, labels_B) -> dict:
  """The `digits_classifier` sample metric: the share of samples recognised as
  their prompted digit, overall and per digit, and the Fréchet distance in the
  classifier's feature space (with the real digits' score at this count)."""
  accuracy, per_digit = prompted_accuracy(images_BxhxwxC, labels_B)
  return dict(
    classifier_accuracy=accuracy,
    per_digit=per_digit.tolist(),
    frechet_distance=frechet_distance(images_BxhxwxC),
    real_frechet_distance=real_frechet_distance(labels_B),
  )


def reading_accuracy(model, tokenizer, config, *, max_new_tokens: int = 16) -> dict:
  """The share of held-out real digits (source.reading_split) that the
  model names right by greedy text generation after reading the digit: the
  prompt "<s> <|im_start|> <image> <|im_end|> \\n which digit is this?", the
  answer parsed as "it is {name}."; chance is 10%. Also the per-digit shares
  and the share of answers that name no digit at all."""
  from monoformer_jax.data import prompts
  from monoformer_jax.layout import row_spec
  from monoformer_jax.text.generate import generate

  _, held = digits_data.reading_split(digits_data.digit_records(config))
  records = [held[i] for i in range(len(held))]
  labels_B = np.array([int(r["label"]) for r in records])
  examples = [
    prompts.read_prompt_example(
      digits_data.READ_PROMPT, np.asarray(r["image"], np.float32), tokenizer
    )
    for r in records
  ]
  ids = generate(
    model,
    examples,
    max_new_tokens=max_new_tokens,
    pad_id=tokenizer.pad_id,
    stop_ids=[tokenizer.eos_id],
    spec=row_spec(config, tokenizer),
  )
  said_B = np.array([digits_data.answer_label(tokenizer.decode(t)) for t in ids])
  right_B = said_B == labels_B
  per_digit = [
    float(right_B[labels_B == k].mean()) if (labels_B == k).any() else float("nan")
    for k in range(10)
  ]
  return dict(
    reading_accuracy=float(right_B.mean()),
    reading_per_digit=per_digit,
    reading_unparsed=float((said_B < 0).mean()),
    reading_count=int(len(labels_B)),
  )


def interleaved_accuracy(
  model,
  tokenizer,
  config,
  *,
  num_prompts: int = 20,
  num_steps: int = 50,
  cfg_scale: float | None = 2.0,
  max_new_tokens: int = 256,
  temperature: float = 1.0,
  seed: int = 0,
  max_wait: int | None = None,
  progress=None,
) -> tuple[dict, list, list]:
  """Interleaved answers to the prompt "here is a" (digits/source.py), sampled
  at `temperature` so the rows name different digits: the share of their
  images that the classifier labels with the digit named in the text just
  before each one. Returns (metrics, the answers, the classifier's labels of
  each answer's images). `max_wait` and `progress`: generate_interleaved's."""
  from monoformer_jax.inference import generate_interleaved

  answers = generate_interleaved(
    model,
    tokenizer,
    [digits_data.INTERLEAVED_PROMPT] * num_prompts,
    config=config,
    max_new_tokens=max_new_tokens,
    num_steps=num_steps,
    cfg_scale=cfg_scale,
    temperature=temperature,
    top_k=0,
    top_p=1.0,
    seed=seed,
    max_wait=max_wait,
    progress=progress,
  )
  named, drawn, labels = [], [], []
  for answer in answers:
    texts, images, text = [], [], digits_data.INTERLEAVED_PROMPT
    for kind, value in answer.pieces:
      if kind == "text":
        text += value
      else:
        texts.append(text)
        images.append(value)
        text = ""
    said = digits_data.named_digits(texts)
    got = (
      digit_classifier().predict(np.stack(images).reshape(len(images), -1)).tolist()
      if images
      else []
    )
    named += said
    drawn += got
    labels.append(got)
  named, drawn = np.asarray(named, int), np.asarray(drawn, int)
  counted = named >= 0
  metrics = dict(
    interleaved_accuracy=float((named[counted] == drawn[counted]).mean())
    if counted.any()
    else float("nan"),
    interleaved_images=int(len(named)),
    interleaved_unnamed=int((~counted).sum()),
    interleaved_answers_without_image=int(sum(not x for x in labels)),
    interleaved_out_of_tokens=int(sum(a.stop != "stop" for a in answers)),
  )
  return metrics, answers, labels


def editing_accuracy(
  model,
  tokenizer,
  config,
  *,
  num_steps: int = 50,
  cfg_scale: float | None = 2.0,
  guidance: str | None = "both",
  seed: int = 0,
) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
  """Each held-out real digit (source.reading_split) READ and redrawn
  by "the next digit:": the share of the drawings the classifier labels with
  the next digit (3 -> 4, 9 -> 0). Returns (metrics, the sources [N, 8, 8, 1]
  and the drawings, both in [0, 1], the sources' labels [N])."""
  import jax

  from monoformer_jax.data import prompts
  from monoformer_jax.diffusion.gaussian import from_config
  from monoformer_jax.diffusion.sample_images import sample_images
  from monoformer_jax.layout import row_spec
  from monoformer_jax.vision.pixels import to_unit_range

  _, held = digits_data.reading_split(digits_data.digit_records(config))
  records = [held[i] for i in range(len(held))]
  sources = np.stack([np.asarray(r["image"], np.float32) for r in records])
  labels_B = np.array([int(r["label"]) for r in records])
  want_B = np.array([digits_data.next_digit(k) for k in labels_B])
  if not cfg_scale:
    guidance = cfg_scale = None
  rows = prompts.edit_rows(
    list(sources),
    [digits_data.EDIT_PROMPT] * len(records),
    tokenizer,
    row_spec(config, tokenizer),
    guidance=guidance,
  )
  diffusion = from_config(config.diffusion, respacing=str(num_steps))
  x0 = sample_images(model, rows, diffusion, jax.random.PRNGKey(seed), cfg_scale=cfg_scale)
  drawn = to_unit_range(np.asarray(x0))
  accuracy, per_digit = prompted_accuracy(drawn, want_B)
  metrics = dict(
    editing_accuracy=accuracy,
    editing_per_digit=per_digit.tolist(),
    editing_count=int(len(want_B)),
    editing_guidance=str(guidance),
  )
  return metrics, to_unit_range(sources), drawn, labels_B


# ------------------------------------------------------------------- evaluators


class Classifier(Evaluator):
  """`digits`: `sample_metrics` of 8x8 grayscale samples and their prompted digits."""

  num_classes = len(digits_data.CLASS_NAMES)

  @classmethod
  def min_samples(cls, names) -> int:
    return 2  # the Fréchet distance fits a covariance

  def check_samples(self, shape, source):
    if tuple(shape[1:]) != (8, 8, 1):
      raise FileFormatError(
        f"the digits metric scores 8x8 grayscale digits [N, 8, 8, 1]; "
        f"{source} holds {list(shape[1:])} images: sample the digits "
        "model (configs/digits.py), or ask for the Inception metrics"
      )

  def score_samples(self, images_NxHxWxC, labels_N) -> dict:
    """(score.check_samples has checked the images and the labels.)"""
    images = np.asarray(images_NxHxWxC, np.float32) / 255.0
    return {"digits": sample_metrics(images, np.asarray(labels_N))}


class _ModelMetric(Evaluator):
  """A metric of the digits model itself."""

  scores = "model"
  needs_reader = False  # it reads digits: the model needs a vision encoder
  trained_by = ""  # the data field whose examples teach it ("": always trained)

  @classmethod
  def problem(cls, name, config) -> str | None:
    if config.data.name != digits_data.SOURCE.name:
      return f"{name} scores the digits model, but data.name={config.data.name!r}"
    if cls.needs_reader and not config.model.vision_encoder:
      return (
        f"{name} needs a model that reads images, but model.vision_encoder="
        f"{config.model.vision_encoder!r}"
      )
    return None

  @classmethod
  def at_end_of_run(cls, name, config) -> bool:
    """Each that can score the run's model, interleaved and editing only when
    training had such examples."""
    trained = not cls.trained_by or bool(config.data[cls.trained_by])
    return trained and not cls.problem(name, config)


class Reading(_ModelMetric):
  needs_reader = True

  def score_model(
    self, model, tokenizer, config, *, num_steps, cfg_scale, seed, outdir=None
  ) -> dict:
    t0 = time.perf_counter()
    reading = reading_accuracy(model, tokenizer, config)
    logging.info(
      "reading: %.1f%% of %d held-out digits named right (%.1fs)",
      100 * reading["reading_accuracy"],
      reading["reading_count"],
      time.perf_counter() - t0,
    )
    return {"reading": reading}


class Interleaved(_ModelMetric):
  trained_by = "interleaved_fraction"

  def score_model(
    self, model, tokenizer, config, *, num_steps, cfg_scale, seed, outdir=None
  ) -> dict:
    """With `outdir`, outdir/interleaved.html: the answers with their drawings
    inline and the classifier's label under each (PNGs in interleaved/, the
    pieces in interleaved.json)."""
    from monoformer_jax import inference

    t0 = time.perf_counter()
    metrics, answers, drawn = interleaved_accuracy(
      model, tokenizer, config, num_steps=num_steps, cfg_scale=cfg_scale, seed=seed
    )
    logging.info(
      "interleaved: %.1f%% of %d drawings show the digit named before them (%.1fs)",
      100 * metrics["interleaved_accuracy"],
      metrics["interleaved_images"],
      time.perf_counter() - t0,
    )
    if outdir:
      page = inference.write_interleaved_page(
        answers,
        [digits_data.INTERLEAVED_PROMPT] * len(answers),
        outdir,
        labels=[[f"drawn: {d}" for d in row] for row in drawn],
      )
      logging.info("wrote %s", page)
    return {"interleaved": metrics}


class Editing(_ModelMetric):
  needs_reader = True
  trained_by = "edit_fraction"

  def score_model(
    self, model, tokenizer, config, *, num_steps, cfg_scale, seed, outdir=None
  ) -> dict:
    """With `outdir`, outdir/editing.png: held-out real digits (top) redrawn as
    "the next digit:" (below)."""
    t0 = time.perf_counter()
    metrics, sources, edited, labels = editing_accuracy(
      model, tokenizer, config, num_steps=num_steps, cfg_scale=cfg_scale, seed=seed
    )
    logging.info(
      "editing: %.1f%% of %d held-out digits redrawn as the next digit (%.1fs)",
      100 * metrics["editing_accuracy"],
      metrics["editing_count"],
      time.perf_counter() - t0,
    )
    if outdir:
      edit_grid(sources, edited, labels).save(os.path.join(outdir, "editing.png"))
    return {"editing": metrics}


def edit_grid(sources, edited, labels, per_class: int = 2):
  """Two rows: `per_class` held-out digits of each class, and their edits below."""
  from monoformer_jax import inference

  picked = np.concatenate(
    [np.flatnonzero(labels == d)[:per_class] for d in range(len(digits_data.CLASS_NAMES))]
  )
  return inference.image_grid(np.concatenate([sources[picked], edited[picked]]), rows=2, scale=4)


EVALUATORS = dict(digits=Classifier, reading=Reading, interleaved=Interleaved, editing=Editing)
