"""Diffusion: the IDDPM schedule, losses, respacing, DDPM/DDIM sampling and CFG."""

from monoformer_jax.diffusion.gaussian import (SAMPLERS, GaussianDiffusion, apply_cfg,
                                               sample_loop, sample_step, space_timesteps)

__all__ = ["SAMPLERS", "GaussianDiffusion", "apply_cfg", "sample_loop", "sample_step",
           "space_timesteps"]
