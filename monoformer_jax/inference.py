"""Inference in a few calls: images from prompts or class names, text completions.

What `python -m monoformer_jax.sample`, the notebooks and the training run's
end-of-run samples call. Prompts are strings; `data.prompts` turns them into
the reference's rows (`<s> prompt <|im_start|>` then the image's P slots);
samples come back in the model's space (SD-VAE latents, or [-1, 1] pixels for
a pixel model) and `to_pixels` makes [0, 1] images of them.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import numpy as np
from PIL import Image

from monoformer_jax.data import prompts as prompt_format
from monoformer_jax.data.datasets import class_by_name, draws_pixels
from monoformer_jax.data.images import to_unit_range
from monoformer_jax.data.packing import row_spec
from monoformer_jax.diffusion.gaussian import SAMPLERS, GaussianDiffusion
from monoformer_jax.errors import ConfigError
from monoformer_jax.diffusion.sample_images import sample_images
from monoformer_jax.text.generate import generate
from monoformer_jax.text.tokenizer import tokenizer_of  # noqa: F401 (for notebooks)
from monoformer_jax.validate import check_image_sampling, check_prompts, check_text_sampling
from monoformer_jax.vae import decode_latents, load_vae
from monoformer_jax.vision.inputs import read_inputs


def class_name_prompt(name: str, config=None) -> str:
  """The reference's first template for a class name ("Please generate an
  image of {name}."); a class of the config's dataset may also be given by
  its index ("7" for "seven")."""
  return prompt_format.class_prompt(name if config is None else class_by_name(name, config))


def generate_images(model, tokenizer, prompts: Sequence[str | None], *, num_steps: int = 20,
                    sampler: str = "ddpm", eta: float = 0.0, cfg_scale: float | None = 1.5,
                    guided_channels: int | None = None, seed: int = 0,
                    use_cache: bool = True, num_timesteps: int = 1000,
                    progress: Callable | None = None):
  """x_0 [B, h, w, C] in the model's space (latents, or [-1, 1] pixels) for B
  prompts (a list: None is the empty prompt); guidance unless `cfg_scale` is
  None or 0; `num_steps` respaced steps of the `num_timesteps` schedule."""
  prompts = check_prompts(prompts)
  check_image_sampling(num_steps=num_steps, cfg_scale=cfg_scale, eta=eta,
                       num_timesteps=num_timesteps)
  if sampler not in SAMPLERS:
    raise ConfigError(f"sampler={sampler!r}: choose one of {SAMPLERS}")
  cfg_scale = cfg_scale or None   # 0 is no guidance
  diffusion = GaussianDiffusion.create(num_timesteps, "linear", respacing=str(num_steps))
  rows = prompt_format.image_rows(prompts, tokenizer, model.tokens_per_image,
                                  guidance=cfg_scale is not None, cond_token=model.cond_token)
  return sample_images(model, rows, diffusion, jax.random.PRNGKey(seed),
                       cfg_scale=cfg_scale, guided_channels=guided_channels,
                       sampler=sampler, eta=eta, use_cache=use_cache, progress=progress)


def complete_text(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 256,
                  temperature: float = 0.7, top_k: int = 50, top_p: float = 0.95,
                  seed: int = 0, use_cache: bool = True) -> list[str]:
  """Completions of `prompts`, a list of strings (bos is prepended; generation
  stops at eos)."""
  prompts = check_prompts(prompts)
  if None in prompts:
    raise ConfigError("text prompts must be strings; None (the empty prompt) is for images")
  check_text_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p)
  ids = generate(model, [prompt_format.text_prompt_ids(p, tokenizer) for p in prompts],
                 max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_id,
                 stop_ids=[tokenizer.eos_id], key=jax.random.PRNGKey(seed),
                 temperature=temperature, top_k=top_k, top_p=top_p, use_cache=use_cache)
  return [tokenizer.decode(t) for t in ids]


def describe_images(model, tokenizer, images, prompt: str | Sequence[str] = "Describe the image.",
                    *, config, vae=None, max_new_tokens: int = 128, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    use_cache: bool = True) -> list[str]:
  """The model's answers about `images` (a list: paths, PIL images or arrays),
  one per image, to `prompt` (one string, or one per image). The image is
  read by the model's vision encoder (a latent model's `vae` encodes it) and
  cached with the prompt; greedy by default, stopping at eos."""
  if isinstance(images, (str, os.PathLike)) or not len(images):
    raise ConfigError("images must be a non-empty list (paths, PIL images or arrays)")
  questions = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
  if len(questions) != len(images):
    raise ConfigError(f"{len(questions)} prompts for {len(images)} images; give one prompt, "
                      "or one per image")
  check_text_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p)
  inputs = read_inputs(images, config, vae)
  spec = row_spec(config, tokenizer)
  examples = [prompt_format.read_prompt_example(q, x, tokenizer)
              for q, x in zip(questions, inputs)]
  ids = generate(model, examples, max_new_tokens=max_new_tokens, pad_id=tokenizer.pad_id,
                 stop_ids=[tokenizer.eos_id], key=jax.random.PRNGKey(seed),
                 temperature=temperature, top_k=top_k, top_p=top_p, spec=spec,
                 use_cache=use_cache)
  return [tokenizer.decode(t) for t in ids]


def _needs_a_vae(config) -> ConfigError:
  return ConfigError(
      f"this model draws {config.model.in_channels}-channel latents; decode them with "
      "the SD-VAE: pass --vae=DIR (a diffusers AutoencoderKL folder such as "
      "sd-vae-ft-mse) or set config.vae.path")


def load_vae_of(config, path: str | None = None):
  """The SD-VAE that decodes a latent model's samples (`path`, else the
  config's `vae.path`); None for a pixel model. Raises, naming the fix, for a
  latent model without one."""
  path = path or config.get("vae", {}).get("path")
  if path:
    return load_vae(path)
  if not draws_pixels(config):
    raise _needs_a_vae(config)
  return None


def to_pixels(x0, config, vae=None) -> np.ndarray:
  """Samples as float32 [B, h, w, C] images in [0, 1]: latents decoded by
  `vae` (see `load_vae_of`), or the pixels of a pixel model."""
  if vae is not None:
    x0 = decode_latents(vae, np.asarray(x0, np.float32))
  elif not draws_pixels(config):
    raise _needs_a_vae(config)
  return to_unit_range(x0)


def image_grid(images_BxhxwxC, rows: int, scale: int = 1, pad: int = 1):
  """A PIL image of `rows` rows of samples on a white background."""
  n, h, w, c = images_BxhxwxC.shape
  cols = -(-n // rows)
  images = np.kron(images_BxhxwxC, np.ones((1, scale, scale, 1), np.float32))
  h, w = h * scale, w * scale
  grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
  for i in range(n):
    r, col = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
  pixels = (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
  return Image.fromarray(pixels[..., 0] if c == 1 else pixels)


