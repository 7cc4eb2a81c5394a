"""An image to READ, as the model's vision encoder takes it (layout.read_image_spec).

    vae, pixel model (the digits)  the image resized to model.image_size,
                                   in_channels (1: grayscale), pixels in [-1, 1]
    vae, latent model              the SD-VAE latent (posterior mode, scaled) of
                                   the image resized and centre-padded to
                                   image_size * 8 pixels (the reference's
                                   VAEVisionEncoder: resize_and_pad, [-1, 1])
    clip                           CLIP's preprocessing (vision/clip_pixels.py)

Images come as a path, a PIL image, or an array (uint8 0..255, or float in
[0, 1]), HxW or HxWxC. A file that is not an image raises, naming it.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from monoformer_jax.errors import ConfigError, FileFormatError, MissingPathError
from monoformer_jax.layout import read_image_spec
from monoformer_jax.vision.pixels import from_unit_range


def load_image(path: str) -> Image.Image:
  """The image file at `path`, decoded (RGB or L); raises naming the file."""
  if not os.path.exists(path):
    raise MissingPathError(f"image {path!r} does not exist; pass the path of a PNG or JPEG file")
  try:
    with Image.open(path) as image:
      image.load()
      return image.convert("L" if image.mode in ("L", "1", "I;16", "I") else "RGB")
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise FileFormatError(f"{path!r} is not a readable image ({e}); pass a PNG or JPEG file") from e


def as_pil(image) -> Image.Image:
  """A PIL image of a path, a PIL image or an array (uint8, or float in [0, 1])."""
  if isinstance(image, (str, os.PathLike)):
    return load_image(os.fspath(image))
  if isinstance(image, Image.Image):
    return image
  x = np.asarray(image)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] not in (3, 4)):
    raise ValueError(f"an image array must be HxW or HxWx(1, 3, 4), got shape {x.shape}")
  if x.dtype != np.uint8:
    if x.size and (np.nanmin(x) < 0 or np.nanmax(x) > 1):
      raise ValueError(
        "a float image array must hold values in [0, 1] (got "
        f"{float(np.nanmin(x)):.3g}..{float(np.nanmax(x)):.3g}); pass uint8 "
        "0..255 or scale it"
      )
    x = np.round(np.nan_to_num(x) * 255).astype(np.uint8)
  return Image.fromarray(x)


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
  pils = [as_pil(im) for im in images]
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
