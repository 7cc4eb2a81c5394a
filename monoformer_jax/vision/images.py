"""The one image reader: a file, its bytes, a PIL image or an array as 8-bit L or RGB.

    image = load_image("photo.jpg")               # what a user gives: sample --image, reading,
                                                  # editing, interleaved, the Python API
    image = load_image(path, orient=False)        # dataset preparation (data/), as the reference

Every caller (sampling, `read_inputs`, CLIP's preprocessing, `data.prepare`,
LLaVA's records) reads through `load_image`, so one file reads the same
everywhere:

- files are recognised by content, not name, and fully decoded here (a
  truncated file fails now, not in a worker); an animated GIF or a multi-page
  TIFF gives its first frame, as PIL opens it;
- grayscale comes out L, everything else RGB: 16-bit integers are scaled by
  65535 (`I;16`, and `I` holding 0..65535), floats (`F`) read as [0, 1], never
  clipped: values past those ranges (32-bit data, floats in 0..255), NaN or
  inf are refused, naming what was found;
- transparency (RGBA, LA, PA, a palette or a PNG with a transparent colour)
  is composited on white, so a black digit on a transparent background stays
  a black digit (PIL's `convert("RGB")` drops the alpha and shows what lies
  under it, often black);
- palette, CMYK, YCbCr, LAB and HSV images are converted by PIL;
- an image past Pillow's pixel limit (`PIL.Image.MAX_IMAGE_PIXELS`, its guard
  against decompression bombs) is refused from its header, before decoding;
- arrays: HxW, HxWx1, HxWx3, or HxWx2 / HxWx4 with alpha; uint8, uint16
  (scaled by 65535), bool, or float in [0, 1]; NaN and inf are refused (an
  all-NaN array must not read as a black image).

EXIF orientation (a phone's photo stored sideways with a tag saying how to
turn it) is applied to what users give (`orient=True`, the default), and not
in dataset preparation (`orient=False`): the reference reads ImageNet, and
LLaVA's images, with PIL's `convert("RGB")` alone, so a training JPEG that
carries an orientation tag is read as stored; turning it would change the
data the reference's models and numbers come from.

Every failure is an `UnreadableImage` (a FileFormatError, one line naming the
file, the reason and the fix; `data.prepare` skips such files and lists them),
or a ValueError for an array or object that is not an image.
"""

from __future__ import annotations

import io
import os
import re
import warnings

import numpy as np
from etils import epath
from PIL import Image, ImageOps

from monoformer_jax.errors import FileFormatError
from monoformer_jax.paths import is_local, read_all

# The reader refuses an image past Pillow's pixel limit itself, in one line naming
# the file; Pillow's warning for such an image (raised on open, before the reader
# sees the size) would only repeat it. Thread-safe, unlike catching it per call.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
READ_FIX = "pass a PNG, JPEG or another image file Pillow reads"
_SHRINK = "resize it below the limit, or raise PIL.Image.MAX_IMAGE_PIXELS in Python if you trust it"


class UnreadableImage(FileFormatError):
  """An image that cannot be read: `path` (None for bytes, PIL images and
  arrays' resizes), `reason` (what was found; `data.prepare` lists it)."""

  def __init__(self, path, reason: str, fix: str = READ_FIX):
    self.path = None if path is None else str(path)
    self.reason = reason
    super().__init__(f"{f'image {path}' if path is not None else 'the image'}: {reason}; {fix}")


def load_image(source, *, orient: bool = True) -> Image.Image:
  """`source` (a path, bytes, a PIL image or an array) as a new PIL image in
  mode L (grayscale sources) or RGB, 8 bits, with no metadata left (reading it
  again changes nothing). `orient`: apply the EXIF orientation (see the module
  docstring). Raises UnreadableImage for files and images, ValueError for
  arrays and other objects."""
  if isinstance(source, Image.Image):
    return _decoded(source, orient, None)
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not is_local(path):
      return _read_remote(path, orient)
    if os.path.isdir(path):
      raise UnreadableImage(path, "a folder, not a file", "pass an image file")
    if not os.path.exists(path):
      raise UnreadableImage(path, "no such file", "check the path")
    if os.path.getsize(path) == 0:
      raise UnreadableImage(path, "an empty file (0 bytes)", "pass the image file itself")
    return _read(path, path, orient)
  if isinstance(source, (bytes, bytearray, memoryview)):
    if not len(source):
      raise UnreadableImage(None, "no bytes (an empty image)", "pass an image file's bytes")
    return _read(io.BytesIO(bytes(source)), None, orient)
  return _from_array(source)


def checked_resize(image: Image.Image, size_wh: tuple[int, int], resample) -> Image.Image:
  """`image.resize(size_wh, resample)`, refused (UnreadableImage) when the new
  size is past Pillow's pixel limit: resizing the shorter side of a 10000x1
  image to 256 would make 655 million pixels (2 GB) from a 30 kB file."""
  limit = Image.MAX_IMAGE_PIXELS
  w, h = size_wh
  if limit is not None and w * h > limit:
    raise UnreadableImage(
      None,
      f"resizing its {image.size[0]}x{image.size[1]} pixels to {w}x{h} makes {w * h:,} "
      f"pixels, past Pillow's limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS)",
      "crop it nearer to square first",
    )
  return image.resize(size_wh, resample)


def _read_remote(path: str, orient: bool) -> Image.Image:
  """An image file on a bucket (`gs://...`): checked and read as a local one is."""
  try:
    data = read_all(path)  # one request; the checks below only for what is not there
  except FileNotFoundError:
    if epath.Path(path).is_dir():
      raise UnreadableImage(path, "a folder, not a file", "pass an image file") from None
    raise UnreadableImage(path, "no such file", "check the path") from None
  if not data:
    raise UnreadableImage(path, "an empty file (0 bytes)", "pass the image file itself")
  return _read(io.BytesIO(data), path, orient)


def _read(file, path, orient: bool) -> Image.Image:
  image, stage = None, "open"
  try:
    with Image.open(file) as image:
      _check_pixels(image.size, path)
      stage = "decode"
      image.load()  # a truncated file fails here, not later in a worker
      stage = "convert"
      return _decoded(image, orient, path)
  except UnreadableImage:
    raise
  except Exception as e:  # PIL's plugins raise many kinds for broken files
    error = _failure(e, stage, image, path)
  raise error  # outside the except: the reason holds Pillow's words, no second line


def _failure(e: Exception, stage: str, image, path) -> UnreadableImage:
  words = str(e) or type(e).__name__
  # Past twice the limit Pillow refuses on open, with no image to measure (and its
  # warning is an exception where warnings are made errors, as under pytest -W error).
  if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
    found = re.search(r"\((\d+) pixels\)", words)
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return UnreadableImage(path, f"{size}, {_past_limit()}", _SHRINK)
  if stage == "open":  # not an image Pillow recognises (SVG, text, HEIC, ...)
    return UnreadableImage(path, f"not an image file Pillow reads ({type(e).__name__})")
  if stage == "decode":
    return UnreadableImage(
      path,
      f"its {image.format} data cannot be decoded ({words})",
      "the file is damaged: re-download or re-save it",
    )
  return UnreadableImage(path, f"its {image.mode} pixels cannot be converted ({words})")


def _past_limit() -> str:
  return (
    f"past Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} pixels (PIL.Image.MAX_IMAGE_PIXELS, "
    "its guard against decompression bombs)"
  )


def _check_pixels(size_wh, path) -> None:
  w, h = size_wh
  if Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS:
    raise UnreadableImage(path, f"{w}x{h} = {w * h:,} pixels, {_past_limit()}", _SHRINK)


def _decoded(image: Image.Image, orient: bool, path) -> Image.Image:
  """A decoded PIL image (any mode) as a new plain 8-bit L or RGB image."""
  if image.width < 1 or image.height < 1:
    raise UnreadableImage(path, f"it is {image.width}x{image.height} pixels", "pass a real image")
  if orient:
    image = ImageOps.exif_transpose(image)
  mode, key = image.mode, image.info.get("transparency")
  if mode in GRAY_MODES:
    if mode in ("LA", "La"):
      gray_HxWx2 = np.asarray(image.convert("LA"))
      return _on_white(gray_HxWx2[..., 0], gray_HxWx2[..., 1], "L")
    gray = _gray_to_8_bit(image, path)
    if isinstance(key, int):  # a PNG's transparent gray level, in the file's own units
      return _on_white(gray, np.where(np.asarray(image) == key, 0, 255).astype(np.uint8), "L")
    return Image.fromarray(gray, "L")
  if mode in ALPHA_MODES or key is not None:  # P and RGB with a transparent entry
    rgba_HxWx4 = np.asarray(image.convert("RGBA"))
    return _on_white(rgba_HxWx4[..., :3], rgba_HxWx4[..., 3], "RGB")
  return Image.fromarray(np.asarray(image.convert("RGB")), "RGB")  # RGB, P, CMYK, YCbCr, ...


def _gray_to_8_bit(image: Image.Image, path) -> np.ndarray:
  """uint8 [h, w] of a 1, L, I;16*, I or F image, scaled by its depth, never clipped."""
  if image.mode in ("1", "L"):
    return np.asarray(image.convert("L"))
  x = np.asarray(image)
  if image.mode == "F":
    top, fix, scale = 1.0, "scale it to [0, 1] (floats are read as 0 = black, 1 = white)", 255.0
    if not np.isfinite(x).all():
      raise UnreadableImage(path, f"{_nonfinite(x)} float pixels are NaN or inf", fix)
  else:  # I;16* and I: 16-bit levels (Pillow holds 16-bit PNG, PGM and TIFF data so)
    top, fix, scale = 65535, "save it as 8- or 16-bit grayscale", 255 / 65535
  low, high = float(x.min()), float(x.max())
  if low < 0 or high > top:
    raise UnreadableImage(
      path, f"its {image.mode} pixels run {low:g}..{high:g}, outside 0..{top:g}", fix
    )
  return np.rint(x.astype(np.float64) * scale).astype(np.uint8)


def _on_white(color: np.ndarray, alpha: np.ndarray, mode: str) -> Image.Image:
  """`color` (uint8 [h, w] or [h, w, 3]) over white with `alpha` (uint8 [h, w])."""
  a = alpha.astype(np.float32)[..., None] / 255.0 if color.ndim == 3 else alpha / 255.0
  out = 255.0 - (255.0 - color.astype(np.float32)) * a
  return Image.fromarray(np.rint(out).astype(np.uint8), mode)


def _nonfinite(x: np.ndarray) -> str:
  return f"{int((~np.isfinite(x)).sum())} of {x.size}"


def _from_array(source) -> Image.Image:
  x = np.asarray(source)
  if x.dtype.kind not in "buif":
    raise ValueError(
      f"an image must be a path, bytes, a PIL image or a numeric array; got "
      f"{type(source).__name__} (an array of dtype {x.dtype})"
    )
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] not in (2, 3, 4)) or 0 in x.shape:
    raise ValueError(
      f"an image array must be HxW or HxWx1 (grayscale), HxWx3 (RGB) or HxWx2 / HxWx4 "
      f"(with alpha, composited on white), channels last; got shape {x.shape}"
    )
  if x.dtype == np.bool_:
    x = x.astype(np.uint8) * 255
  elif x.dtype == np.uint16:
    x = np.rint(x / 257.0).astype(np.uint8)
  elif x.dtype.kind == "f":
    if not np.isfinite(x).all():
      raise ValueError(
        f"an image array holds NaN or inf ({_nonfinite(x)} values); pass finite pixels in [0, 1]"
      )
    if x.min() < 0 or x.max() > 1:
      raise ValueError(
        f"a float image array must hold values in [0, 1]; got {float(x.min()):.3g}.."
        f"{float(x.max()):.3g}: scale it, or pass uint8 0..255"
      )
    x = np.rint(x.astype(np.float64) * 255).astype(np.uint8)
  elif x.dtype != np.uint8:
    raise ValueError(
      f"an image array of dtype {x.dtype} is ambiguous; pass uint8 0..255 (x.astype(np.uint8)), "
      "uint16 0..65535, bool, or float in [0, 1]"
    )
  if x.ndim == 2:
    return Image.fromarray(x, "L")
  if x.shape[-1] == 2:
    return _on_white(x[..., 0], x[..., 1], "L")
  if x.shape[-1] == 4:
    return _on_white(x[..., :3], x[..., 3], "RGB")
  return Image.fromarray(np.ascontiguousarray(x), "RGB")
