"""End-of-training samples for the digits default: a PNG grid, an .npz, text.

    samples/digits.png   a row per digit 0..9, guided by its class prompt
    samples/digits.npz   images float32 [N, 8, 8] in [0, 1], labels int [N]
    samples/text.txt     a few greedy text completions
    samples/summary.json how many samples a real-digit classifier recognises
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image

from monoformer_jax.data.digits import class_prompt, image_prompt_example, row_spec, to_unit_range
from monoformer_jax.data.packing import pack_examples
from monoformer_jax.diffusion.gaussian import GaussianDiffusion
from monoformer_jax.diffusion.sample_images import sample_images
from monoformer_jax.eval.digits import prompted_accuracy
from monoformer_jax.text.generate import generate


def prompt_rows(prompts, config, tokenizer):
  """Packed rows, one example (prompt + one image slot) per row, as short as
  the longest prompt allows (the image cannot see what follows it anyway)."""
  spec = row_spec(config, tokenizer)
  examples = [image_prompt_example(p, tokenizer, spec.image_shape) for p in prompts]
  longest = max(len(e.ids) for e in examples) + spec.tokens_per_image - 1
  spec = dataclasses.replace(spec, max_images=1, seq_len=-(-longest // 8) * 8)
  return pack_examples(examples, spec, one_per_row=True)


def image_grid(images_NxHxW, rows: int, scale: int = 4, pad: int = 1) -> Image.Image:
  n, h, w = images_NxHxW.shape
  cols = n // rows
  cell_h, cell_w = h * scale + pad, w * scale + pad
  grid = np.ones((rows * cell_h + pad, cols * cell_w + pad), np.float32)
  for i in range(rows * cols):
    r, c = divmod(i, cols)
    big = np.kron(images_NxHxW[i], np.ones((scale, scale), np.float32))
    grid[pad + r * cell_h: pad + r * cell_h + h * scale,
         pad + c * cell_w: pad + c * cell_w + w * scale] = big
  return Image.fromarray((np.clip(grid, 0, 1) * 255).astype(np.uint8))


def write_samples(model, config, tokenizer, outdir: str, seed: int = 0):
  """Samples with `model` on every process; process 0 writes `outdir`."""
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(outdir, exist_ok=True)
  sc = config.sample
  per = sc.num_per_class
  labels = np.repeat(np.arange(10), per)
  diffusion = GaussianDiffusion.create(config.diffusion.num_timesteps,
                                       config.diffusion.beta_schedule,
                                       respacing=str(sc.num_steps))
  both = prompt_rows([class_prompt(int(d)) for d in labels] + [None] * len(labels),
                     config, tokenizer)
  cond = {k: v[:len(labels)] for k, v in both.items()}
  null = {k: v[len(labels):] for k, v in both.items()}
  t0 = time.perf_counter()
  logging.info("sampling %d digits: %d DDPM steps, guidance %.1f", len(labels),
               sc.num_steps, sc.cfg_scale)
  with tqdm.tqdm(total=sc.num_steps, desc="DDPM steps", disable=not writer) as bar:
    x0 = sample_images(model, cond, diffusion, jax.random.PRNGKey(seed), null_rows=null,
                       cfg_scale=sc.cfg_scale, progress=lambda _: bar.update(1))
  x0 = multihost_utils.process_allgather(x0, tiled=True)
  images = to_unit_range(np.asarray(x0))[..., 0].astype(np.float32)
  logging.info("sampled in %.1fs", time.perf_counter() - t0)

  accuracy, per_digit = prompted_accuracy(images, labels)
  logging.info("a real-digit classifier recognises %.1f%% of the samples (per digit: %s)",
               100 * accuracy, " ".join(f"{d}:{a:.2f}" for d, a in enumerate(per_digit)))

  prompts = list(sc.text_prompts)
  completions = generate(model, [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts],
                         max_new_tokens=sc.max_new_tokens, eos_id=tokenizer.eos_id,
                         pad_id=tokenizer.pad_id, key=jax.random.PRNGKey(seed))
  lines = [f"{p!r} -> {tokenizer.decode(c)!r}" for p, c in zip(prompts, completions)]
  if not writer:
    return images, labels, accuracy
  np.savez(os.path.join(outdir, "digits.npz"), images=images, labels=labels)
  image_grid(images, rows=10).save(os.path.join(outdir, "digits.png"))
  with open(os.path.join(outdir, "text.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  for line in lines:
    logging.info("text: %s", line)
  with open(os.path.join(outdir, "summary.json"), "w") as f:
    json.dump(dict(classifier_accuracy=accuracy, per_digit=per_digit.tolist(),
                   num_samples=len(labels), steps=sc.num_steps, cfg_scale=sc.cfg_scale,
                   text=lines), f, indent=1)
  return images, labels, accuracy
