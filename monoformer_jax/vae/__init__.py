"""The SD-VAE (diffusers' AutoencoderKL) in Flax NNX: pixels <-> diffusion latents.

    vae = load_vae("path/to/sd-vae-ft-mse")          # diffusers folder
    latents = encode_images(vae, pixels_Bxhxwx3)      # [-1, 1] -> scaled latents
    pixels = decode_latents(vae, latents)             # scaled latents -> [-1, 1]

Everything is NHWC. The VAE's parameters carry the logical axes 'conv_height',
'conv_width', 'conv_in' and 'conv_out'; it is small (84M parameters for SD)
and meant to be replicated.
"""

from monoformer_jax.vae.autoencoder_kl import (
  SCALING_FACTOR,
  AutoencoderKL,
  DiagonalGaussian,
  VAEConfig,
  decode_latents,
  encode_images,
)
from monoformer_jax.vae.load import load_vae, vae_from_tensors

__all__ = [
  "SCALING_FACTOR",
  "AutoencoderKL",
  "DiagonalGaussian",
  "VAEConfig",
  "decode_latents",
  "encode_images",
  "load_vae",
  "vae_from_tensors",
]
