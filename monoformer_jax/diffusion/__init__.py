"""Diffusion: the IDDPM schedule, losses, respacing, DDPM/DDIM sampling and guidance;
flow matching (diffusion.objective='flow'), its loss and Euler/Heun sampling.

`from_config(config.diffusion, respacing)` builds a model's process (a
GaussianDiffusion or a FlowMatching); nothing else should call
`GaussianDiffusion.create` or `FlowMatching(...)` but tests of the math."""

from monoformer_jax.diffusion.gaussian import (
  BETAS,
  SAMPLERS,
  FlowMatching,
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
  "FlowMatching",
  "GaussianDiffusion",
  "apply_cfg",
  "apply_guidance",
  "from_config",
  "sample_loop",
  "sample_step",
  "space_timesteps",
]
