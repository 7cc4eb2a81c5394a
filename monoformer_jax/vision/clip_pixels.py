"""CLIP's pixels: images as the CLIP tower (model/clip.py) takes them, as HF's
CLIPImageProcessor makes them.

    size, crop, mean, std = load_preprocessing("path/to/clip-vit-large-patch14")
    pixels = preprocess(images, vcfg, mean, std, size=size, crop=crop)  # [B, S, S, 3]

Each image is read by the project's reader (vision/images.py: alpha composited
on white, where transformers < 5, MonoFormer's, dropped it) and made RGB, its
shortest edge resized (PIL bicubic), centre-cropped to the tower's S x S,
scaled by 1/255 and normalised by the folder's mean and std (OpenAI CLIP's by
default): float32 [B, S, S, 3], channels last.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from monoformer_jax.errors import ConfigError
from monoformer_jax.model.clip import clip_folder
from monoformer_jax.safetensors_io import read_json_object
from monoformer_jax.vision.images import checked_resize, load_image

PREPROCESSOR_NAME = "preprocessor_config.json"
# OpenAI CLIP's pixel statistics (transformers' OPENAI_CLIP_MEAN / _STD).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# openai/clip-vit-large-patch14's preprocessing, used when a folder has no
# preprocessor_config.json: shortest edge to 224, centre crop 224 x 224.
DEFAULT_SIZE = 224
PIL_BICUBIC = 3  # PIL.Image.BICUBIC, the `resample` value CLIP's configs hold


def load_preprocessing(path) -> tuple[int, tuple[int, int], tuple, tuple]:
  """(shortest edge, (crop height, crop width), mean, std) from the folder's
  preprocessor_config.json; openai/clip-vit-large-patch14's values when the
  folder has none. Both the old layout (size: 224, crop_size: 224) and the new
  ({"shortest_edge": 224}, {"height": 224, "width": 224}) are read; a file
  asking for another pipeline than CLIP's (no resize or crop, another resample
  filter or rescale factor) is refused, naming the field."""
  folder = clip_folder(path, PREPROCESSOR_NAME)
  config_path = folder / PREPROCESSOR_NAME
  if not config_path.exists():
    return DEFAULT_SIZE, (DEFAULT_SIZE, DEFAULT_SIZE), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
  c = read_json_object(config_path, "an HF CLIPImageProcessor preprocessor_config.json")
  where = str(config_path)
  for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
    if c.get(flag, True) is not True:
      raise ConfigError(
        f"{where}: {flag}={c[flag]!r}; only CLIP's full pipeline (resize, "
        "centre crop, rescale, normalise) is implemented: set it to true"
      )
  if c.get("resample", PIL_BICUBIC) != PIL_BICUBIC:
    raise ConfigError(
      f"{where}: resample={c['resample']!r}; only bicubic ({PIL_BICUBIC}), CLIP's, is implemented"
    )
  if not math.isclose(c.get("rescale_factor", 1 / 255), 1 / 255):
    raise ConfigError(f"{where}: rescale_factor={c['rescale_factor']!r}; CLIP's is 1/255")
  size = c.get("size", DEFAULT_SIZE)
  if isinstance(size, dict):
    if set(size) != {"shortest_edge"}:
      raise ConfigError(
        f"{where}: size={size}; only {{'shortest_edge': n}} (or an int), "
        "CLIP's resize of the shortest edge, is implemented"
      )
    size = size["shortest_edge"]
  crop = c.get("crop_size", DEFAULT_SIZE)
  crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
  if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (size, *crop)):
    raise ConfigError(
      f"{where}: size {c.get('size')!r} / crop_size {c.get('crop_size')!r} must be positive ints"
    )
  mean = tuple(float(v) for v in c.get("image_mean", OPENAI_CLIP_MEAN))
  std = tuple(float(v) for v in c.get("image_std", OPENAI_CLIP_STD))
  if len(mean) != 3 or len(std) != 3:
    raise ConfigError(
      f"{where}: image_mean {list(mean)} / image_std {list(std)} must have 3 values (R, G, B)"
    )
  return size, crop, mean, std


def _resize_and_crop(image: Image.Image, size: int, crop: tuple[int, int]) -> np.ndarray:
  """uint8 [ch, cw, 3]: the shortest edge resized to `size` (bicubic, the
  longer edge rounded down, as HF), then the centre crop, zero-padded where
  the crop is larger than the image (as HF's center_crop)."""
  w, h = image.size
  short, long = min(h, w), max(h, w)
  new_long = int(size * long / short)
  new_h, new_w = (new_long, size) if w <= h else (size, new_long)
  array = np.asarray(checked_resize(image, (new_w, new_h), Image.BICUBIC))
  ch, cw = crop
  if ch > new_h or cw > new_w:
    padded = np.zeros((max(ch, new_h), max(cw, new_w), 3), np.uint8)
    top, left = math.ceil((padded.shape[0] - new_h) / 2), math.ceil((padded.shape[1] - new_w) / 2)
    padded[top : top + new_h, left : left + new_w] = array
    array, new_h, new_w = padded, padded.shape[0], padded.shape[1]
  top, left = (new_h - ch) // 2, (new_w - cw) // 2
  return array[top : top + ch, left : left + cw]


def preprocess(images, vcfg, mean=None, std=None, *, size=None, crop=None) -> np.ndarray:
  """CLIPImageProcessor's pixels, channels-last: float32 [B, S, S, 3], S = vcfg.image_size.

  `images`: a sequence of what vision/images.py `load_image` reads (paths,
  PIL images, [h, w] / [h, w, C] arrays; grayscale is made RGB), or a
  [B, h, w, 3] array; one image alone is a batch of one. Each is made RGB,
  its shortest edge resized to `size` (default S) with
  PIL bicubic, centre-cropped to `crop` (default (S, S)), scaled by 1/255 and
  normalised by `mean` / `std` (default OpenAI CLIP's). Pass
  `load_preprocessing(folder)`'s values to follow a folder's
  preprocessor_config.json.
  """
  s = vcfg.image_size
  size = s if size is None else size
  crop = (s, s) if crop is None else tuple(crop)
  if crop != (s, s):
    raise ConfigError(
      f"CLIP crop {crop} does not give the tower's input: "
      f"config.model.vision.image_size={s} needs a {s}x{s} crop"
    )
  mean = np.asarray(OPENAI_CLIP_MEAN if mean is None else mean, np.float32)
  std = np.asarray(OPENAI_CLIP_STD if std is None else std, np.float32)
  if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike, bytes)) and not (
    isinstance(images, np.ndarray) and images.ndim == 4
  ):
    images = [images]
  out = []
  for image in images:
    pixels = _resize_and_crop(load_image(image).convert("RGB"), size, crop)
    # HF's order and dtypes: rescale in float64, then normalise in float32.
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    out.append((x - mean) / std)
  return np.stack(out).astype(np.float32)


def preprocess_file(path, vcfg, mean=None, std=None, **kwargs) -> np.ndarray:
  """`preprocess` of the image file at `path`: float32 [1, S, S, 3]."""
  return preprocess([load_image(path)], vcfg, mean, std, **kwargs)
