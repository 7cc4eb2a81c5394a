"""Diffusion: the IDDPM schedule, losses, respacing, DDPM/DDIM sampling and guidance.

`from_config(config.diffusion, respacing)` builds a model's process; nothing
else should call `GaussianDiffusion.create` but tests of the math."""

from monoformer_jax.diffusion.gaussian import (
  BETAS,
  SAMPLERS,
  GaussianDiffusion,
  apply_cfg,
  apply_guidance,
  from_config,
  sample_loop,
  sample_step,
  space_timesteps,
)

__all__ = [
  "BETAS",
  "SAMPLERS",
  "GaussianDiffusion",
  "apply_cfg",
  "apply_guidance",
  "from_config",
  "sample_loop",
  "sample_step",
  "space_timesteps",
]
