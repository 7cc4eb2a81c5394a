"""Image generation with a MonoFormer: DDPM or DDIM (iddpm), Euler or Heun
(flow) over rows of prompts.

Rows hold one example each with one image slot to generate. With guidance
(`cfg_scale` set) the batch is doubled as in the reference: rows [0, B) are the
conditional prompts and rows [B, 2B) the null prompts, both halves run on the
same noise and `apply_cfg` combines their outputs into B images. A tuple of
scales guides over G = len + 1 groups of B rows, each dropping more of the
prompt than the one before (`apply_guidance`; e.g. editing's [instruction and
image, image only, nothing] with (text scale, image scale), InstructPix2Pix).

The prompt cache: prompt tokens never attend to image tokens, so their keys
and values are the same at every denoising step. With `use_cache` the model
prefills them once per call (`MonoFormer.prefill`) and each step runs only the
P image tokens against them (`MonoFormer.extend_image`). That needs rows from
`layout.prompt_rows` (`data.prompts.image_rows`), whose layout says where the
prompt ends. Without the cache any packed rows with one image per row work,
and every step recomputes the whole row, as the reference does.

The steps run from the host, one compiled program per step (the same program
for every step), so `progress` is a plain callback and runs as each step ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.diffusion.gaussian import apply_guidance, sample_step
from monoformer_jax.layout import PromptLayout, PromptRows, Row, check_one_image_per_row
from monoformer_jax.model.build import compiled


class SamplerSettings(NamedTuple):
  """What the compiled steps are specialised on (hashable: a static argument;
  the interleaved sampler builds one too)."""

  diffusion: Any
  layout: PromptLayout | None  # None: no cache, recompute the whole row
  groups: int  # G: 1 unguided, 2 classifier-free guidance, ...
  guided_channels: int | None
  sampler: str
  eta: float


def guidance_scales(cfg_scale) -> tuple[float, ...]:
  """The scales of `cfg_scale` (None: none; a number: one; a sequence: a chain)."""
  if cfg_scale is None:
    return ()
  scales = tuple(
    float(s) for s in (cfg_scale if isinstance(cfg_scale, (tuple, list)) else (cfg_scale,))
  )
  if not scales:
    raise ValueError("cfg_scale=() guides nothing; pass None for no guidance")
  return scales


def sample_images(
  model,
  rows: PromptRows | Row,
  diffusion,
  key,
  *,
  cfg_scale=None,
  guided_channels=None,
  sampler: str | None = None,
  eta: float = 0.0,
  use_cache: bool = True,
  progress: Callable[[int], Any] | None = None,
):
  """x_0 [B, h, w, C] float32 for the rows' prompts (B = rows, or half with guidance).

  `diffusion` is the process whose steps are run (`from_config`'s, respaced);
  `sampler` one of its SAMPLERS (iddpm: 'ddpm', learned variance, the
  reference, or 'ddim' with `eta`; flow: 'euler' or 'heun'), None its default;
  `cfg_scale` turns on guidance over the doubled batch, a tuple of G - 1
  scales over G groups of rows (see the module docstring); `guided_channels=3`
  guides only epsilon channels 0-2 as the reference does. The same `key` gives the same images; `progress(step)` is
  called after each denoising step has finished. Calls with the same shapes
  and settings reuse the compiled programs.
  """
  scales = guidance_scales(cfg_scale)
  groups = len(scales) + 1
  sampler = sampler or diffusion.SAMPLERS[0]
  if sampler not in diffusion.SAMPLERS:
    raise ValueError(f"sampler={sampler!r}: this model samples with one of {diffusion.SAMPLERS}")
  if use_cache and not isinstance(rows, PromptRows):
    raise ValueError(
      "the prompt cache needs rows from layout.prompt_rows (prompts "
      "left-padded, then the image slots; data.prompts.image_rows builds "
      "them); pass use_cache=False for other packed rows"
    )
  row = rows.row if isinstance(rows, PromptRows) else rows
  check_one_image_per_row(row, model.tokens_per_image)
  length = row.tokens.shape[1]
  has_token = row.cond_columns is not None and bool((np.asarray(row.cond_columns) < length).all())
  if has_token != model.cond_token:
    raise ValueError(
      f"the model's conditioning is {model.cfg.conditioning!r} but the rows "
      f"{'have' if has_token else 'lack'} a timestep token before the image; "
      f"build them with cond_token={model.cond_token} "
      "(data.prompts.image_rows(..., cond_token=model.cond_token))"
    )
  n_rows = row.tokens.shape[0]
  if n_rows % groups:
    raise ValueError(
      f"guidance with {len(scales)} scale(s) needs {groups} groups of B rows"
      + (
        " (a doubled batch: B conditional rows, then B null rows)"
        if groups == 2
        else " (the conditional rows, then each weaker condition's)"
      )
      + f" but got {n_rows} rows"
    )
  settings = SamplerSettings(
    diffusion, rows.layout if use_cache else None, groups, guided_channels, sampler, float(eta)
  )
  read = getattr(rows, "read_images", None)  # the images the prompts read, if any
  read = None if read is None else jnp.asarray(read)
  row = Row(*(None if x is None else jnp.asarray(x) for x in row))
  scale = jnp.asarray(scales, jnp.float32)
  cfg = model.cfg
  n = n_rows // groups
  key_init, key_loop = jax.random.split(key)
  x_t = jax.random.normal(
    key_init, (n, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32
  )
  cache = _prefill(model, settings, row, read) if use_cache else None
  step = _step.bind(model)  # the model split once, not at every step
  for i in range(diffusion.num_timesteps):
    x_t = step(settings, row, cache, x_t, jnp.int32(i), key_loop, scale, read)
    if progress is not None:
      jax.block_until_ready(x_t)
      progress(i)
  return x_t


@compiled
def _prefill(model, settings: SamplerSettings, row: Row, read_images=None):
  """The cache of every layer holding the prompt columns' keys and values
  (the images the prompt reads included)."""
  layout = settings.layout
  _, cache = model.prefill(
    layout.prompt(row.tokens),
    layout.prompt(row.positions),
    row.segment_ids,
    row.image_ids,
    model.init_cache(*row.tokens.shape),
    row,
    read_images,
  )
  return cache


@compiled
def _step(model, settings: SamplerSettings, row: Row, cache, x_t, i, key, scales, read_images=None):
  """x_{t-1} of step i: the model's output at x_t (guided), then the sampler's update."""
  layout = settings.layout
  if layout is not None:
    run = lambda x, t: model.extend_image(
      x, t, layout.new(row.positions), row.segment_ids, row.image_ids, cache, layout.new_column(0)
    )[0]
  else:
    run = lambda x, t: model(row, x[:, None], t[:, None], read_images)[1][:, 0]
  return guided_step(run, settings, x_t, i, key, scales)


def guided_step(run, settings, x_t, i, key, scales, row_keys: bool = False):
  """x_{t-1} of step i for B images x_t from `run(x [G*B], t [G*B]) -> outputs`
  over the G groups of rows (`settings.groups`), combined by `apply_guidance`."""
  groups = settings.groups

  def denoise(x_t, t_model):
    out = run(jnp.concatenate([x_t] * groups), jnp.concatenate([t_model] * groups))
    if groups == 1:
      return out
    outs = jnp.split(out, groups)
    return apply_guidance(
      outs,
      [scales[g] for g in range(groups - 1)],
      settings.guided_channels,
      settings.diffusion.prediction_channels(out.shape[-1]),
    )

  return sample_step(
    denoise,
    x_t,
    i,
    key,
    settings.diffusion,
    sampler=settings.sampler,
    eta=settings.eta,
    row_keys=row_keys,
  )
