"""Image generation with a MonoFormer: DDPM ancestral sampling over packed rows.

Each row holds one example whose single image slot is generated (the layout of
`data.image_prompt_example`). With guidance, the conditional rows and the
null-prompt rows run as one doubled batch on the same noise, and
`apply_cfg` combines their outputs. This version recomputes the prompt at
every step, as the reference does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from monoformer_jax.diffusion.gaussian import apply_cfg, ddpm_sample


def sample_images(model, prompt_rows, diffusion, key, *, null_rows=None, cfg_scale=1.0,
                  guided_channels=None, progress=None):
  """x_0 [N, h, w, C] for N prompt rows; guidance when `null_rows` are given.

  `diffusion` is the (respaced) GaussianDiffusion whose steps are run;
  `prompt_rows`/`null_rows` are packed batches with one image per row;
  `progress(step)` is called on the host after each denoising step.
  """
  guided = null_rows is not None
  if guided and null_rows["tokens"].shape != prompt_rows["tokens"].shape:
    raise ValueError(f"null rows {null_rows['tokens'].shape} and prompt rows "
                     f"{prompt_rows['tokens'].shape} must have the same shape")
  rows = prompt_rows
  if guided:
    rows = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), prompt_rows, null_rows)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, rows, key):
    n = prompt_rows["tokens"].shape[0]
    key_init, key_loop = jax.random.split(key)
    x_T = jax.random.normal(key_init, (n,) + rows["latents"].shape[2:], jnp.float32)

    def denoise(x_t, t_model):
      # Merged inside the loop body: NNX modules may not cross trace levels.
      model = nnx.merge(graphdef, state)
      if guided:
        x_t, t_model = jnp.concatenate([x_t, x_t]), jnp.concatenate([t_model, t_model])
      x, t_emb = model.embed(rows["tokens"], rows["image_ids"], x_t[:, None], t_model[:, None])
      h = model.decoder(x, rows["positions"], rows["segment_ids"], rows["image_ids"])
      out = model.image_head(h, rows["image_ids"], t_emb)[:, 0]
      if guided:
        out = apply_cfg(out[:n], out[n:], cfg_scale, guided_channels)
      return out

    return ddpm_sample(denoise, x_T, key_loop, diffusion, progress=progress)

  return run(state, rows, key)
