"""Diffusion: the IDDPM schedule, losses, respacing, DDPM sampling and CFG."""

from monoformer_jax.diffusion.gaussian import (GaussianDiffusion, apply_cfg, ddpm_sample,
                                               space_timesteps)

__all__ = ["GaussianDiffusion", "apply_cfg", "ddpm_sample", "space_timesteps"]
