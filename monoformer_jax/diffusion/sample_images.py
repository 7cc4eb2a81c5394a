"""Image generation with a MonoFormer: DDPM or DDIM over rows of prompts.

Rows hold one example each with one image slot to generate. With guidance
(`cfg_scale` set) the batch is doubled as in the reference: rows [0, N) are the
conditional prompts and rows [N, 2N) the null prompts, both halves run on the
same noise and `apply_cfg` combines their outputs into N images.

The prompt cache: prompt tokens never attend to image tokens, so their keys
and values are the same at every denoising step. With `use_cache` they are
computed once per sample (one prefill of the prompt columns into a KVCache)
and each step runs only the P image tokens against them. That needs the
layout of `data.prompt_rows` (prompts left-padded to `prompt_len` columns,
then the P image slots). Without the cache any packed rows with one image per
row work, and every step recomputes the whole row, as the reference does.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from monoformer_jax.diffusion.gaussian import apply_cfg, sample_loop
from monoformer_jax.model.llama import KVCache

ROW_KEYS = ("tokens", "segment_ids", "image_ids", "positions")


def _check_rows(rows, tokens_per_image: int, use_cache: bool, guided: bool):
  n_rows = rows["tokens"].shape[0]
  if guided and n_rows % 2:
    raise ValueError(f"guidance needs a doubled batch (N conditional rows, then N null "
                     f"rows) but got {n_rows} rows")
  images_per_row = (np.asarray(rows["image_ids"]) > 0).sum(axis=1)
  if not bool((images_per_row == tokens_per_image).all()):
    raise ValueError(f"each row must hold exactly one image of {tokens_per_image} slots; "
                     f"rows hold {sorted(set(images_per_row.tolist()))} image tokens")
  if use_cache:
    if "prompt_len" not in rows:
      raise ValueError("the prompt cache needs rows from data.prompt_rows (prompts "
                       "left-padded, then the image slots); pass use_cache=False for "
                       "other packed rows")
    lp = int(rows["prompt_len"])
    if rows["tokens"].shape[1] != lp + tokens_per_image:
      raise ValueError(f"rows of {rows['tokens'].shape[1]} columns are not "
                       f"prompt_len {lp} + {tokens_per_image} image slots")


def sample_images(model, rows, diffusion, key, *, cfg_scale=None, guided_channels=None,
                  sampler: str = "ddpm", eta: float = 0.0, use_cache: bool = True,
                  progress=None):
  """x_0 [N, h, w, C] float32 for the rows' prompts (N = rows, or half with guidance).

  `diffusion` is the (respaced) GaussianDiffusion whose steps are run;
  `sampler` 'ddpm' (learned variance, the reference) or 'ddim' with `eta`;
  `cfg_scale` turns on guidance over the doubled batch (see the module
  docstring), `guided_channels=3` guides only epsilon channels 0-2 as the
  reference does. The same `key` gives the same images; `progress(step)` is
  called on the host after each denoising step. Calls with the same shapes
  and settings reuse one compiled program.
  """
  guided = cfg_scale is not None
  _check_rows(rows, model.tokens_per_image, use_cache, guided)
  graphdef, state = nnx.split(model)
  arrays = {k: jnp.asarray(rows[k], jnp.int32) for k in ROW_KEYS}
  cfg = model.cfg
  settings = _Settings(graphdef, diffusion, int(rows["prompt_len"]) if use_cache else None,
                       (cfg.image_size, cfg.image_size, cfg.in_channels), guided,
                       guided_channels, sampler, float(eta), progress is not None)
  scale = jnp.float32(1.0 if cfg_scale is None else cfg_scale)
  with _progress_reporting(progress):
    x0 = jax.block_until_ready(_run(settings, state, arrays, scale, key))
    jax.effects_barrier()   # every progress callback has run
  return x0


class _Settings(NamedTuple):
  """What the compiled sampler is specialised on (hashable: a static argument)."""
  graphdef: Any
  diffusion: Any
  prompt_len: int | None   # None: no cache, recompute the whole row
  image_shape: tuple[int, int, int]
  guided: bool
  guided_channels: int | None
  sampler: str
  eta: float
  progress: bool


# The host callback of the call in flight: compiled samplers call `_report`
# (on a runtime thread), which forwards here, so a new progress bar needs no
# new compilation. One sampling call at a time reports progress.
_progress_callback = [None]
_progress_lock = threading.Lock()


@contextlib.contextmanager
def _progress_reporting(callback):
  if callback is None:
    yield
    return
  with _progress_lock:
    _progress_callback[0] = callback
    try:
      yield
    finally:
      _progress_callback[0] = None


def _report(step):
  callback = _progress_callback[0]
  if callback is not None:
    callback(step)


@functools.partial(jax.jit, static_argnums=0)
def _run(settings: _Settings, state, rows, cfg_scale, key):
  graphdef, prompt_len = settings.graphdef, settings.prompt_len
  seg, img, pos = rows["segment_ids"], rows["image_ids"], rows["positions"]
  n = seg.shape[0] // (2 if settings.guided else 1)
  if prompt_len is not None:
    prefill = nnx.merge(graphdef, state)
    cache = KVCache.zeros(prefill.cfg, seg.shape[0], seg.shape[1], prefill.dtype)
    _, cache = prefill.decoder(prefill.embed_text(rows["tokens"][:, :prompt_len]),
                               pos[:, :prompt_len], seg, img, cache=cache, offset=0)

  def denoise(x_t, t_model):
    # Merged inside the loop body: NNX modules may not cross trace levels.
    model = nnx.merge(graphdef, state)
    if settings.guided:
      x_t, t_model = jnp.concatenate([x_t, x_t]), jnp.concatenate([t_model, t_model])
    if prompt_len is not None:
      img_Bx1xPxE, t_emb = model.image_tokens(x_t[:, None], t_model[:, None])
      h_BxPxE, _ = model.decoder(img_Bx1xPxE[:, 0], pos[:, prompt_len:], seg, img,
                                 cache=cache, offset=prompt_len)
      out = model.diffusion_head(h_BxPxE[:, None], t_emb)[:, 0]
    else:
      x, t_emb = model.embed(rows["tokens"], img, x_t[:, None], t_model[:, None])
      h = model.decoder(x, pos, seg, img)
      out = model.image_head(h, img, t_emb)[:, 0]
    if settings.guided:
      out = apply_cfg(out[:n], out[n:], cfg_scale, settings.guided_channels)
    return out

  key_init, key_loop = jax.random.split(key)
  x_T = jax.random.normal(key_init, (n,) + settings.image_shape, jnp.float32)
  return sample_loop(denoise, x_T, key_loop, settings.diffusion, sampler=settings.sampler,
                     eta=settings.eta, progress=_report if settings.progress else None)
