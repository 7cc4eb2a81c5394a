"""Diffusion: the IDDPM schedule, losses, respacing, DDPM/DDIM sampling and guidance."""

from monoformer_jax.diffusion.gaussian import (SAMPLERS, GaussianDiffusion, apply_cfg,
                                               apply_guidance, sample_loop, sample_step,
                                               space_timesteps)

__all__ = ["SAMPLERS", "GaussianDiffusion", "apply_cfg", "apply_guidance", "sample_loop",
           "sample_step", "space_timesteps"]
