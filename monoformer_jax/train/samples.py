"""End-of-training samples: a class-conditional grid, its arrays, text, scores.

    samples/{data.name}.png   a row per class, guided by its class prompt
    samples/{data.name}.npz   `images` float32 [B, h, w, C] in [0, 1], `labels` int [B]
    samples/text.txt          greedy completions of `sample.text_prompts`
    samples/summary.json      what `sample.metrics` say of the images (eval/score.py), as
                              uint8 images like ADM's sample files; for the digits
                              with a vision encoder, the reading accuracy on held-out
                              digits (eval/digits.reading_accuracy); with interleaved
                              and editing examples in training, their shares too
    samples/interleaved.html  the digits trained with interleaved examples: answers to
                              "here is a" with their drawings inline, the classifier's
                              label under each (PNGs in interleaved/, pieces in
                              interleaved.json)
    samples/editing.png       the digits trained with edits: held-out real digits (top)
                              redrawn as "the next digit:" (below)

The classes are the dataset's (`data.class_names`), `sample.num_per_class`
images each; latent models are decoded with the SD-VAE at `vae.path`.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from monoformer_jax import inference
from monoformer_jax.data import prompts
from monoformer_jax.data.datasets import class_names
from monoformer_jax.eval import finite_json
from monoformer_jax.data.digits import INTERLEAVED_PROMPT
from monoformer_jax.eval.digits import (editing_accuracy, end_of_run_model_metrics,
                                        interleaved_accuracy, reading_accuracy)
from monoformer_jax.eval.sampling import quantize
from monoformer_jax.eval.score import metric_files, score_images


def write_samples(model, config, tokenizer, outdir: str, seed: int = 0):
  """Samples with `model` on every process; process 0 writes `outdir`.
  Returns (images, labels, metrics)."""
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(outdir, exist_ok=True)
  sc = config.sample
  classes = class_names(config)
  if sc.get("num_classes", 0):
    classes = classes[:sc.num_classes]
  images = labels = None
  metrics = {}
  if classes and sc.num_per_class:
    labels = np.repeat(np.arange(len(classes)), sc.num_per_class)
    vae = inference.load_vae_of(config)
    t0 = time.perf_counter()
    logging.info("sampling %d images of %d classes: %d DDPM steps, guidance %.1f",
                 len(labels), len(classes), sc.num_steps, sc.cfg_scale)
    with tqdm.tqdm(total=sc.num_steps, desc="DDPM steps", disable=not writer) as bar:
      x0 = inference.generate_images(
          model, tokenizer, [prompts.class_prompt(classes[k]) for k in labels],
          num_steps=sc.num_steps, cfg_scale=sc.cfg_scale, seed=seed,
          diffusion=config.diffusion, progress=lambda _: bar.update(1))
    x0 = multihost_utils.process_allgather(x0, tiled=True)
    images = inference.to_pixels(x0, config, vae)
    logging.info("sampled in %.1fs", time.perf_counter() - t0)
    if sc.get("metrics", ()):
      inception, reference = metric_files(config, sc.metrics)
      metrics = score_images(quantize(images), labels, sc.metrics, inception=inception,
                             reference=reference)
    if metrics:
      logging.info("sample metrics: %s", finite_json(metrics))
  elif classes:
    logging.info("sample.num_per_class=0: no class-conditional samples")
  else:
    logging.info("data.name=%r has no class names: no class-conditional samples",
                 config.data.name)

  scored = end_of_run_model_metrics(config)
  if "reading" in scored:
    t0 = time.perf_counter()
    reading = reading_accuracy(model, tokenizer, config)
    logging.info("reading: %.1f%% of %d held-out digits named right (%.1fs)",
                 100 * reading["reading_accuracy"], reading["reading_count"],
                 time.perf_counter() - t0)
    metrics = dict(metrics, **reading)
  answers = edits = None
  if "interleaved" in scored:
    t0 = time.perf_counter()
    interleaved, answers, drawn = interleaved_accuracy(
        model, tokenizer, config, num_steps=sc.num_steps, cfg_scale=sc.cfg_scale, seed=seed)
    logging.info("interleaved: %.1f%% of %d drawings show the digit named before them "
                 "(%.1fs)", 100 * interleaved["interleaved_accuracy"],
                 interleaved["interleaved_images"], time.perf_counter() - t0)
    metrics = dict(metrics, **interleaved)
  if "editing" in scored:
    t0 = time.perf_counter()
    editing, sources, edited, source_labels = editing_accuracy(model, tokenizer, config,
                                                num_steps=sc.num_steps,
                                                cfg_scale=sc.cfg_scale, seed=seed)
    logging.info("editing: %.1f%% of %d held-out digits redrawn as the next digit (%.1fs)",
                 100 * editing["editing_accuracy"], editing["editing_count"],
                 time.perf_counter() - t0)
    metrics = dict(metrics, **editing)
    edits = sources, edited, source_labels

  text_prompts = list(sc.text_prompts)
  completions = inference.complete_text(model, tokenizer, text_prompts,
                                        max_new_tokens=sc.max_new_tokens, temperature=0.0,
                                        seed=seed) if text_prompts else []
  lines = [f"{p!r} -> {c!r}" for p, c in zip(text_prompts, completions)]
  if not writer:
    return images, labels, metrics
  if images is not None:
    name = config.data.name
    np.savez(os.path.join(outdir, f"{name}.npz"), images=images, labels=labels)
    inference.image_grid(images, rows=len(classes), scale=max(1, 32 // images.shape[1])
                         ).save(os.path.join(outdir, f"{name}.png"))
  if answers is not None:
    page = inference.write_interleaved_page(
        answers, [INTERLEAVED_PROMPT] * len(answers), outdir,
        labels=[[f"drawn: {d}" for d in row] for row in drawn])
    logging.info("wrote %s", page)
  if edits is not None:
    grid = _edit_grid(*edits)
    grid.save(os.path.join(outdir, "editing.png"))
  with open(os.path.join(outdir, "text.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  for line in lines:
    logging.info("text: %s", line)
  with open(os.path.join(outdir, "summary.json"), "w") as f:
    f.write(finite_json(dict(metrics, num_samples=0 if labels is None else len(labels),
                             steps=sc.num_steps, cfg_scale=sc.cfg_scale, text=lines),
                        indent=1))
  return images, labels, metrics


def _edit_grid(sources, edited, labels, per_class: int = 2):
  """Two rows: `per_class` held-out digits of each class, and their edits below."""
  picked = np.concatenate([np.flatnonzero(labels == d)[:per_class] for d in range(10)])
  return inference.image_grid(np.concatenate([sources[picked], edited[picked]]), rows=2,
                              scale=4)
