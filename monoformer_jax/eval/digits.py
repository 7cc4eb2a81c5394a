"""Are generated digits recognisable, and do they look like the real ones?
A classifier fitted on the real digits says.

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

import numpy as np


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
  per_digit = np.array([(pred[labels_B == d] == d).mean() if (labels_B == d).any()
                        else np.nan for d in range(10)])
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
  from monoformer_jax.eval.fid import frechet_distance as distance, statistics
  return distance(statistics(classifier_features(images_Bx8x8)), _real_statistics())


def real_frechet_distance(labels_B, seed: int = 0) -> float:
  """What real digits score: a subset of the real digits with these label
  counts (without replacement; a class asked for more often than it has real
  digits takes all of them) against all of them."""
  images, targets = _real_digits()
  rng = np.random.default_rng(seed)
  labels_B = np.asarray(labels_B)
  picked = [rng.choice(np.flatnonzero(targets == d),
                       min(int((labels_B == d).sum()), int((targets == d).sum())),
                       replace=False) for d in range(10)]
  return frechet_distance(images[np.concatenate(picked)])


def sample_metrics(images_BxhxwxC, labels_B) -> dict:
  """The `digits_classifier` sample metric: the share of samples recognised as
  their prompted digit, overall and per digit, and the Fréchet distance in the
  classifier's feature space (with the real digits' score at this count)."""
  accuracy, per_digit = prompted_accuracy(images_BxhxwxC, labels_B)
  return dict(classifier_accuracy=accuracy, per_digit=per_digit.tolist(),
              frechet_distance=frechet_distance(images_BxhxwxC),
              real_frechet_distance=real_frechet_distance(labels_B))


def reading_accuracy(model, tokenizer, config, *, max_new_tokens: int = 16) -> dict:
  """The share of held-out real digits (data/digits.reading_split) that the
  model names right by greedy text generation after reading the digit: the
  prompt "<s> <|im_start|> <image> <|im_end|> \\n which digit is this?", the
  answer parsed as "it is {name}."; chance is 10%. Also the per-digit shares
  and the share of answers that name no digit at all."""
  from monoformer_jax.data import digits as digits_data
  from monoformer_jax.data import prompts
  from monoformer_jax.layout import row_spec
  from monoformer_jax.text.generate import generate

  _, held = digits_data.reading_split(digits_data.digit_records(config))
  records = [held[i] for i in range(len(held))]
  labels_B = np.array([int(r["label"]) for r in records])
  examples = [prompts.read_prompt_example(digits_data.READ_PROMPT,
                                          np.asarray(r["image"], np.float32), tokenizer)
              for r in records]
  ids = generate(model, examples, max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_id,
                 stop_ids=[tokenizer.eos_id], spec=row_spec(config, tokenizer))
  said_B = np.array([digits_data.answer_label(tokenizer.decode(t)) for t in ids])
  right_B = said_B == labels_B
  per_digit = [float(right_B[labels_B == k].mean()) if (labels_B == k).any() else float("nan")
               for k in range(10)]
  return dict(reading_accuracy=float(right_B.mean()), reading_per_digit=per_digit,
              reading_unparsed=float((said_B < 0).mean()), reading_count=int(len(labels_B)))


def interleaved_accuracy(model, tokenizer, config, *, num_prompts: int = 20,
                         num_steps: int = 50, cfg_scale: float | None = 2.0,
                         max_new_tokens: int = 256, temperature: float = 1.0,
                         seed: int = 0, max_wait: int | None = None,
                         progress=None) -> tuple[dict, list, list]:
  """Interleaved answers to the prompt "here is a" (data/digits.py), sampled
  at `temperature` so the rows name different digits: the share of their
  images that the classifier labels with the digit named in the text just
  before each one. Returns (metrics, the answers, the classifier's labels of
  each answer's images). `max_wait` and `progress`: generate_interleaved's."""
  from monoformer_jax.data import digits as digits_data
  from monoformer_jax.inference import generate_interleaved

  answers = generate_interleaved(
      model, tokenizer, [digits_data.INTERLEAVED_PROMPT] * num_prompts, config=config,
      max_new_tokens=max_new_tokens, num_steps=num_steps, cfg_scale=cfg_scale,
      temperature=temperature, top_k=0, top_p=1.0, seed=seed, max_wait=max_wait,
      progress=progress)
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
    got = (digit_classifier().predict(np.stack(images).reshape(len(images), -1)).tolist()
           if images else [])
    named += said
    drawn += got
    labels.append(got)
  named, drawn = np.asarray(named, int), np.asarray(drawn, int)
  counted = named >= 0
  metrics = dict(
      interleaved_accuracy=float((named[counted] == drawn[counted]).mean()) if counted.any()
      else float("nan"),
      interleaved_images=int(len(named)),
      interleaved_unnamed=int((~counted).sum()),
      interleaved_answers_without_image=int(sum(not x for x in labels)),
      interleaved_out_of_tokens=int(sum(a.stop != "stop" for a in answers)))
  return metrics, answers, labels


def editing_accuracy(model, tokenizer, config, *, num_steps: int = 50,
                     cfg_scale: float | None = 2.0, guidance: str | None = "both",
                     seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
  """Each held-out real digit (data/digits.reading_split) READ and redrawn
  by "the next digit:": the share of the drawings the classifier labels with
  the next digit (3 -> 4, 9 -> 0). Returns (metrics, the sources [N, 8, 8, 1]
  and the drawings, both in [0, 1], the sources' labels [N])."""
  from monoformer_jax.data import digits as digits_data
  from monoformer_jax.data import prompts
  from monoformer_jax.data.images import to_unit_range
  from monoformer_jax.layout import row_spec
  from monoformer_jax.diffusion.gaussian import from_config
  from monoformer_jax.diffusion.sample_images import sample_images
  import jax

  _, held = digits_data.reading_split(digits_data.digit_records(config))
  records = [held[i] for i in range(len(held))]
  sources = np.stack([np.asarray(r["image"], np.float32) for r in records])
  labels_B = np.array([int(r["label"]) for r in records])
  want_B = np.array([digits_data.next_digit(k) for k in labels_B])
  if not cfg_scale:
    guidance = cfg_scale = None
  rows = prompts.edit_rows(list(sources), [digits_data.EDIT_PROMPT] * len(records), tokenizer,
                           row_spec(config, tokenizer), guidance=guidance)
  diffusion = from_config(config.diffusion, respacing=str(num_steps))
  x0 = sample_images(model, rows, diffusion, jax.random.PRNGKey(seed), cfg_scale=cfg_scale)
  drawn = to_unit_range(np.asarray(x0))
  accuracy, per_digit = prompted_accuracy(drawn, want_B)
  metrics = dict(editing_accuracy=accuracy, editing_per_digit=per_digit.tolist(),
                 editing_count=int(len(want_B)), editing_guidance=str(guidance))
  return metrics, to_unit_range(sources), drawn, labels_B


DIGITS_MODEL_METRICS = ("reading", "interleaved", "editing")   # of the digits model itself


def model_metric_problem(name: str, config) -> str | None:
  """Why the digits model metric `name` cannot score a model of `config`
  (None: it can)."""
  encoder = config.model.get("vision_encoder", "")
  if config.data.name != "digits":
    return f"{name} scores the digits model, but data.name={config.data.name!r}"
  if name in ("reading", "editing") and not encoder:
    return (f"{name} needs a model that reads images, but model.vision_encoder="
            f"{encoder!r}")
  return None


def end_of_run_model_metrics(config) -> tuple[str, ...]:
  """The digits model metrics the end-of-run samples (train/samples.py) score
  for `config`: each that can score its model, interleaved and editing only
  when training had such examples."""
  trained = dict(reading=True, interleaved=bool(config.data.get("interleaved_fraction", 0)),
                 editing=bool(config.data.get("edit_fraction", 0)))
  return tuple(m for m in DIGITS_MODEL_METRICS
               if trained[m] and not model_metric_problem(m, config))


def model_metrics(model, tokenizer, config, names, *, num_steps: int = 50,
                  cfg_scale: float | None = 2.0) -> dict:
  """{name: metrics} of the digits model metrics among `names` (without the
  answers and images they draw)."""
  out = {}
  if "reading" in names:
    out["reading"] = reading_accuracy(model, tokenizer, config)
  if "interleaved" in names:
    out["interleaved"] = interleaved_accuracy(model, tokenizer, config, num_steps=num_steps,
                                              cfg_scale=cfg_scale, seed=config.seed)[0]
  if "editing" in names:
    out["editing"] = editing_accuracy(model, tokenizer, config, num_steps=num_steps,
                                      cfg_scale=cfg_scale, seed=config.seed)[0]
  return out
