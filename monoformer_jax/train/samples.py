"""End-of-training samples for the digits default: a PNG grid, an .npz, text.

    samples/digits.png   a row per digit 0..9, guided by its class prompt
    samples/digits.npz   images float32 [N, 8, 8] in [0, 1], labels int [N]
    samples/text.txt     a few greedy text completions
    samples/summary.json how many samples a real-digit classifier recognises
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from monoformer_jax.data.digits import class_prompt, to_unit_range
from monoformer_jax.eval.digits import prompted_accuracy
from monoformer_jax.inference import complete_text, generate_images, image_grid


def write_samples(model, config, tokenizer, outdir: str, seed: int = 0):
  """Samples with `model` on every process; process 0 writes `outdir`."""
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(outdir, exist_ok=True)
  sc = config.sample
  labels = np.repeat(np.arange(10), sc.num_per_class)
  t0 = time.perf_counter()
  logging.info("sampling %d digits: %d DDPM steps, guidance %.1f", len(labels),
               sc.num_steps, sc.cfg_scale)
  with tqdm.tqdm(total=sc.num_steps, desc="DDPM steps", disable=not writer) as bar:
    x0 = generate_images(model, tokenizer, [class_prompt(int(d)) for d in labels],
                         num_steps=sc.num_steps, cfg_scale=sc.cfg_scale, seed=seed,
                         num_timesteps=config.diffusion.num_timesteps,
                         progress=lambda _: bar.update(1))
  x0 = multihost_utils.process_allgather(x0, tiled=True)
  images = to_unit_range(np.asarray(x0))[..., 0].astype(np.float32)
  logging.info("sampled in %.1fs", time.perf_counter() - t0)

  accuracy, per_digit = prompted_accuracy(images, labels)
  logging.info("a real-digit classifier recognises %.1f%% of the samples (per digit: %s)",
               100 * accuracy, " ".join(f"{d}:{a:.2f}" for d, a in enumerate(per_digit)))

  prompts = list(sc.text_prompts)
  completions = complete_text(model, tokenizer, prompts, max_new_tokens=sc.max_new_tokens,
                              temperature=0.0, seed=seed)
  lines = [f"{p!r} -> {c!r}" for p, c in zip(prompts, completions)]
  if not writer:
    return images, labels, accuracy
  np.savez(os.path.join(outdir, "digits.npz"), images=images, labels=labels)
  image_grid(images[..., None], rows=10, scale=4).save(os.path.join(outdir, "digits.png"))
  with open(os.path.join(outdir, "text.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  for line in lines:
    logging.info("text: %s", line)
  with open(os.path.join(outdir, "summary.json"), "w") as f:
    json.dump(dict(classifier_accuracy=accuracy, per_digit=per_digit.tolist(),
                   num_samples=len(labels), steps=sc.num_steps, cfg_scale=sc.cfg_scale,
                   text=lines), f, indent=1)
  return images, labels, accuracy
