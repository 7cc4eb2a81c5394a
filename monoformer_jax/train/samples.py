"""End-of-training samples: a class-conditional grid, its arrays, text, scores.

    samples/{data.name}.png   a row per class, guided by its class prompt
    samples/{data.name}.npz   `images` float32 [B, h, w, C] in [0, 1], `labels` int [B]
    samples/prompts.png       one image per prompt of `sample.prompts` (free text,
                              or a .txt file of them), in rows of up to 8
    samples/prompts.npz       `images` float32 [N, h, w, C] in [0, 1], `prompts` [N]
    samples/text.txt          greedy completions of `sample.text_prompts`
    samples/summary.json      what `sample.metrics` say of the images (as uint8
                              images like ADM's sample files), and the numbers of
                              the model metrics the run is scored with at its end
                              (eval/registry.py `end_of_run_metrics`: e.g. the
                              digits default's reading accuracy)
    samples/...               what those evaluators show their work in (e.g. the
                              digits default's interleaved.html and editing.png)

The classes are the dataset's (`data.class_names`), `sample.num_per_class`
images each; the free prompts are drawn with the same steps and guidance;
latent models are decoded with the SD-VAE at `vae.path`.
A folder in a bucket (`gs://...`) is written locally first, then each file
uploaded (through etils.epath) once all are written.
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
from monoformer_jax.eval import finite_json, registry
from monoformer_jax.eval.sampling import quantize
from monoformer_jax.eval.score import score_images, score_model
from monoformer_jax.paths import is_local, staged_folder


def _classes_drawn(config) -> tuple[str, ...]:
  """The classes the end-of-run samples draw (none: they draw no image)."""
  sc = config.sample
  classes = class_names(config) if sc.num_per_class else ()
  return tuple(classes[: sc.num_classes] if sc.num_classes else classes)


# Images per row of samples/prompts.png.
PROMPT_GRID_COLUMNS = 8


def check_samples(config, tokenizer):
  """What the end-of-run samples need, checked when the run starts rather
  than when it ends (a long run must not fail at its end for a reason known at
  its start): each of `sample.text_prompts` and `sample.max_new_tokens`
  tokens within the rows the model trains on, `sample.prompts` (its file
  there and holding prompts) each with its image within those rows, and the
  SD-VAE that decodes a latent model's images (`vae.path`: there, readable, a
  VAE of the model's latents), loaded now and let go. The evaluators' files
  are checked with the config (registry.check_training_metrics)."""
  image_prompts = prompts.read_prompts(config.sample.prompts) if config.sample.prompts else []
  if image_prompts:
    inference.check_budget(config, tokenizer, "images", image_prompts, label="sample.prompts[{}]")
  if _classes_drawn(config) or image_prompts:
    inference.load_vae_of(config)
  if config.sample.text_prompts:
    inference.check_budget(
      config,
      tokenizer,
      "text",
      list(config.sample.text_prompts),
      max_new_tokens=config.sample.max_new_tokens,
      prefix="sample.",
      label="sample.text_prompts[{}]",
    )


def write_samples(model, config, tokenizer, outdir: str, seed: int = 0):
  """Samples with `model` on every process; process 0 writes `outdir`.
  Returns (images, labels, the samples' scores, {name: metrics} of the model
  metrics)."""
  if jax.process_index() != 0:
    return _write_samples(model, config, tokenizer, None, seed)
  with staged_folder(outdir) as local:  # a bucket's files are uploaded at the end
    result = _write_samples(model, config, tokenizer, local, seed)
  if not is_local(outdir):
    logging.info("uploaded the samples to %s", outdir)
  return result


def _write_samples(model, config, tokenizer, outdir: str | None, seed: int):
  writer = outdir is not None
  sc = config.sample
  scored = registry.end_of_run_metrics(config)
  evaluators = registry.make(scored, registry.training_settings(config, scored))
  classes = _classes_drawn(config)
  images = labels = None
  image_scores = {}
  if classes:
    labels = np.repeat(np.arange(len(classes)), sc.num_per_class)
    vae = inference.load_vae_of(config)
    t0 = time.perf_counter()
    logging.info(
      "sampling %d images of %d classes: %d DDPM steps, guidance %.1f",
      len(labels),
      len(classes),
      sc.num_steps,
      sc.cfg_scale,
    )
    with tqdm.tqdm(total=sc.num_steps, desc="DDPM steps", disable=not writer) as bar:
      x0 = inference.generate_images(
        model,
        tokenizer,
        [prompts.class_prompt(classes[k]) for k in labels],
        num_steps=sc.num_steps,
        cfg_scale=sc.cfg_scale,
        seed=seed,
        config=config,
        progress=lambda _: bar.update(1),
      )
    x0 = multihost_utils.process_allgather(x0, tiled=True)
    images = inference.to_pixels(x0, config, vae)
    logging.info("sampled in %.1fs", time.perf_counter() - t0)
    image_scores = score_images(quantize(images), labels, evaluators)
    if image_scores:
      logging.info("sample metrics: %s", finite_json(image_scores))
  elif not sc.num_per_class:
    logging.info("sample.num_per_class=0: no class-conditional samples")
  else:
    logging.info("data.name=%r has no class names: no class-conditional samples", config.data.name)
  free = _prompt_images(model, config, tokenizer, seed)
  # The model metrics write what they show (e.g. pages of answers) from process 0.
  model_scores = score_model(
    evaluators,
    model,
    tokenizer,
    config,
    num_steps=sc.num_steps,
    cfg_scale=sc.cfg_scale,
    seed=seed,
    outdir=outdir if writer else None,
  )

  text_prompts = list(sc.text_prompts)
  completions = (
    inference.complete_text(
      model,
      tokenizer,
      text_prompts,
      config=config,
      max_new_tokens=sc.max_new_tokens,
      temperature=0.0,
      seed=seed,
    )
    if text_prompts
    else []
  )
  lines = [f"{p!r} -> {c!r}" for p, c in zip(text_prompts, completions)]
  if not writer:
    return images, labels, image_scores, model_scores
  if images is not None:
    name = config.data.name
    np.savez(os.path.join(outdir, f"{name}.npz"), images=images, labels=labels)
    inference.image_grid(images, rows=len(classes), scale=max(1, 32 // images.shape[1])).save(
      os.path.join(outdir, f"{name}.png")
    )
  if free is not None:
    free_prompts, free_images = free
    np.savez(os.path.join(outdir, "prompts.npz"), images=free_images, prompts=free_prompts)
    inference.image_grid(
      free_images,
      rows=-(-len(free_images) // PROMPT_GRID_COLUMNS),
      scale=max(1, 32 // free_images.shape[1]),
    ).save(os.path.join(outdir, "prompts.png"))
  with open(os.path.join(outdir, "text.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  for line in lines:
    logging.info("text: %s", line)
  summary = dict(image_scores)
  for values in model_scores.values():
    summary.update(values)
  with open(os.path.join(outdir, "summary.json"), "w") as f:
    f.write(
      finite_json(
        dict(
          summary,
          num_samples=0 if labels is None else len(labels),
          prompt_images=0 if free is None else len(free[0]),  # sample.prompts'
          steps=sc.num_steps,
          cfg_scale=sc.cfg_scale,
          text=lines,
        ),
        indent=1,
      )
    )
  return images, labels, image_scores, model_scores


def _prompt_images(model, config, tokenizer, seed: int):
  """(prompts [N] as a numpy array, images float32 [N, h, w, C] in [0, 1]): one
  image per prompt of `sample.prompts`; None without them."""
  sc = config.sample
  if not sc.prompts:
    return None
  free = prompts.read_prompts(sc.prompts)
  vae = inference.load_vae_of(config)
  logging.info(
    "sampling %d images of sample.prompts: %d DDPM steps, guidance %.1f",
    len(free),
    sc.num_steps,
    sc.cfg_scale,
  )
  x0 = inference.generate_images(
    model,
    tokenizer,
    free,
    num_steps=sc.num_steps,
    cfg_scale=sc.cfg_scale,
    seed=seed,
    config=config,
    batch_size=max(1, config.data.batch_size // config.optim.grad_accum_steps),
  )
  x0 = multihost_utils.process_allgather(x0, tiled=True)
  return np.array(free), inference.to_pixels(x0, config, vae)
