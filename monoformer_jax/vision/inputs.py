"""An image to READ, as the model's vision encoder takes it (layout.read_image_spec).

    vae, pixel model (the digits)  the image resized to model.image_size,
                                   in_channels (1: grayscale), pixels in [-1, 1]
    vae, latent model              the SD-VAE latent (posterior mode, scaled) of
                                   the image resized and centre-padded to
                                   image_size * 8 pixels (the reference's
                                   VAEVisionEncoder: resize_and_pad, [-1, 1])
    clip                           CLIP's preprocessing (vision/clip_pixels.py)

Images come as a path, bytes, a PIL image or an array, and are read by the
project's one reader (vision/images.py `load_image`: 16-bit, alpha on white,
EXIF orientation, size limits): grayscale sources come out L, the rest RGB,
then each model's channels are taken from that. A file that is not an image
raises, naming it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from monoformer_jax.errors import ConfigError
from monoformer_jax.layout import read_image_spec
from monoformer_jax.vision.images import load_image
from monoformer_jax.vision.pixels import from_unit_range


def _resize_and_pad(image: Image.Image, size: int) -> Image.Image:
  """The longer side to `size` (bicubic), the rest padded black, centred."""
  w, h = image.size
  scale = size / max(w, h)
  resized = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
  canvas = Image.new(image.mode, (size, size))
  canvas.paste(resized, ((size - resized.size[0]) // 2, (size - resized.size[1]) // 2))
  return canvas


def read_inputs(images, config, vae=None, *, pixels: bool) -> np.ndarray:
  """float32 [B, *read_shape]: `images` (a list) as the model's vision encoder
  takes them. `pixels`: the model works in pixel space (its dataset's images
  are pixels, `data.datasets.draws_pixels`); else a latent model's `vae`
  encoder is needed for `vae` inputs."""
  m = config.model
  spec = read_image_spec(m)
  if spec is None:
    raise ConfigError(
      "this model has no vision encoder (model.vision_encoder is ''), so it "
      "cannot read an image; use a checkpoint trained with "
      "model.vision_encoder=vae or clip"
    )
  shape, _ = spec
  pils = [load_image(im) for im in images]
  if m.vision_encoder == "clip":
    from monoformer_jax.vision.clip_pixels import preprocess

    return preprocess(pils, m.vision)
  if pixels:
    mode = "L" if m.in_channels == 1 else "RGB"
    out = [
      np.asarray(p.convert(mode).resize((m.image_size, m.image_size), Image.BILINEAR), np.float32)
      / 255.0
      for p in pils
    ]
    return from_unit_range(np.stack(out).reshape(len(out), *shape))
  if vae is None:
    raise ConfigError(
      f"this model reads {m.in_channels}-channel SD-VAE latents of images; "
      "pass the VAE (--vae=DIR, a diffusers AutoencoderKL folder, or "
      "config.vae.path)"
    )
  from monoformer_jax.vae import encode_images

  pixels = np.stack(
    [
      np.asarray(_resize_and_pad(p.convert("RGB"), m.image_size * 8), np.float32) / 255.0
      for p in pils
    ]
  )
  latents = np.asarray(encode_images(vae, from_unit_range(pixels)), np.float32)
  if latents.shape[1:] != shape:
    raise ConfigError(
      f"the VAE makes latents of shape {latents.shape[1:]} but the model reads "
      f"{shape}; pass the VAE the model was trained with"
    )
  return latents
