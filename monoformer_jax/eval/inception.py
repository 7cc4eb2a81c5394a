"""The FID Inception-v3 (TF's inception-2015-12-05 graph) in Flax NNX, channels-last.

This is the network ADM's evaluator and pytorch-fid compute FID, sFID,
precision/recall and the Inception Score with, built as pytorch-fid's
`fid_inception_v3()` builds it, and loaded from pytorch-fid's port of the TF
weights, `pt_inception-2015-12-05-6726825d.pth` (released at
github.com/mseitzer/pytorch-fid, tag fid_weights), passed by path: nothing is
ever downloaded. Where the FID network differs from torchvision's Inception3:
the average pools of the A, C and first E blocks leave the zero padding out of
their means (TF's, `count_include_pad=False`), the last E block (Mixed_7c)
max-pools in its pool branch, and the classifier has 1008 classes.

Submodules are named as in that state dict, so a parameter's path is its key
(`Mixed_6d.branch1x1.conv.weight`, `...bn.running_var`, `fc.bias`); conv
kernels are HWIO (the file's OIHW transposed), `fc.weight` is [in, out]. Every
conv is bias-free and followed by inference BatchNorm (eps 0.001, running
statistics) and ReLU. The file's `num_batches_tracked` counters are not kept.

`inception_features` gives, per image, what the metrics read (299x299 input):
  pool     [2048]  pool_3, the global average pool (FID, precision/recall)
  spatial  [2023]  TF's `mixed_6/conv` (Mixed_6d's branch1x1 after its ReLU,
                   [17, 17, 192]), its first 7 channels flattened in HWC order,
                   as ADM's evaluator takes them (sFID)
  logits   [1008]  fc(pool_3); the Inception Score takes their softmax
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from monoformer_jax import torch_files
from monoformer_jax.errors import CheckpointError, FileFormatError
from monoformer_jax.model.layers import param

INPUT_SIZE = 299  # the resolution the features are defined at
BN_EPS = 0.001  # torchvision's BasicConv2d, as TF's graph
NUM_CLASSES = 1008  # the 2015 graph's classifier (1000 ImageNet classes + 8 unused)
SPATIAL_CHANNELS = 7  # of mixed_6/conv's 192, as ADM's evaluator
SPATIAL_FEATURES = 17 * 17 * SPATIAL_CHANNELS  # mixed_6/conv is 17x17 at 299x299
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
)
WEIGHTS_HINT = (
  f"pass --inception with the path of pytorch-fid's {WEIGHTS_FILE} "
  f"(download it once from {WEIGHTS_URL}; nothing is downloaded here)"
)
_MAX_LISTED = 8


# ------------------------------------------------------------------ layers


class Conv2d(nnx.Module):
  """Bias-free 2-D convolution, NHWC input, `weight` HWIO; `kernel` and
  `padding` are (height, width) as torch's."""

  def __init__(self, cin: int, cout: int, kernel, stride: int, padding, *, rngs):
    kh, kw = kernel
    self.weight = param(
      rngs,
      (kh, kw, cin, cout),
      ("conv_height", "conv_width", "conv_in", "conv_out"),
      std=math.sqrt(2 / (kh * kw * cin)),
    )
    self.stride = stride
    self.padding = ((padding[0],) * 2, (padding[1],) * 2)

  def __call__(self, x_NxHxWxC):
    return jax.lax.conv_general_dilated(
      x_NxHxWxC,
      self.weight[...],
      (self.stride, self.stride),
      self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


class BatchNorm(nnx.Module):
  """Inference BatchNorm: (x - running_mean) / sqrt(running_var + eps) * weight + bias."""

  def __init__(self, channels: int):
    self.weight = param(None, (channels,), ("conv_out",), init="ones")
    self.bias = param(None, (channels,), ("conv_out",), init="zeros")
    self.running_mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
    self.running_var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))

  def __call__(self, x_NxHxWxC):
    scale_C = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + BN_EPS)
    return (x_NxHxWxC - self.running_mean[...]) * scale_C + self.bias[...]


class BasicConv2d(nnx.Module):
  """relu(bn(conv(x))), torchvision's BasicConv2d."""

  def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0, *, rngs):
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    self.conv = Conv2d(cin, cout, kernel, stride, padding, rngs=rngs)
    self.bn = BatchNorm(cout)

  def __call__(self, x_NxHxWxC):
    return jax.nn.relu(self.bn(self.conv(x_NxHxWxC)))


def max_pool(x_NxHxWxC, stride: int, padding: int = 0):
  """3x3 max pool; padded positions never win (torch pads with -inf)."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(
    x_NxHxWxC, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad
  )


def avg_pool_valid(x_NxHxWxC):
  """3x3 stride-1 average pool, padding 1, over the window's in-image pixels
  only (TF's; torch's count_include_pad=False): a corner averages 4, not 9."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  sum_NxHxWxC = jax.lax.reduce_window(x_NxHxWxC, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  _, h, w, _ = x_NxHxWxC.shape
  count_1xHxWx1 = jax.lax.reduce_window(
    jnp.ones((1, h, w, 1), x_NxHxWxC.dtype), 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad
  )
  return sum_NxHxWxC / count_1xHxWx1


# ------------------------------------------------------------------ blocks


class InceptionA(nnx.Module):
  """Mixed_5b/c/d (FIDInceptionA): 1x1 | 5x5 | double 3x3 | avg pool (padding left out)."""

  def __init__(self, cin: int, pool_features: int, *, rngs):
    self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate(
      [
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(avg_pool_valid(x)),
      ],
      axis=-1,
    )


class InceptionB(nnx.Module):
  """Mixed_6a (torchvision's InceptionB): stride-2 3x3 | double 3x3 | max pool."""

  def __init__(self, cin: int, *, rngs):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate(
      [
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        max_pool(x, stride=2),
      ],
      axis=-1,
    )


class InceptionC(nnx.Module):
  """Mixed_6b/c/d/e (FIDInceptionC): 1x1 | 1x7,7x1 | 7x1,1x7,7x1,1x7 | avg pool."""

  def __init__(self, cin: int, channels_7x7: int, *, rngs):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

  def branches(self, x) -> list:
    """The four branch outputs (their concatenation is the block's output)."""
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    b7dbl = self.branch7x7dbl_1(x)
    for layer in (
      self.branch7x7dbl_2,
      self.branch7x7dbl_3,
      self.branch7x7dbl_4,
      self.branch7x7dbl_5,
    ):
      b7dbl = layer(b7dbl)
    return [self.branch1x1(x), b7, b7dbl, self.branch_pool(avg_pool_valid(x))]

  def __call__(self, x):
    return jnp.concatenate(self.branches(x), axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a (torchvision's InceptionD): 1x1,3x3/2 | 1x1,1x7,7x1,3x3/2 | max pool."""

  def __init__(self, cin: int, *, rngs):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b7x3 = self.branch7x7x3_1(x)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7x3 = layer(b7x3)
    return jnp.concatenate(
      [self.branch3x3_2(self.branch3x3_1(x)), b7x3, max_pool(x, stride=2)], axis=-1
    )


class InceptionE(nnx.Module):
  """Mixed_7b (FIDInceptionE_1: avg pool, padding left out) and Mixed_7c
  (FIDInceptionE_2: 3x3 stride-1 *max* pool, the TF graph's quirk):
  1x1 | 1x1,(1x3 + 3x1) | 1x1,3x3,(1x3 + 3x1) | pool,1x1."""

  def __init__(self, cin: int, *, max_pool_branch: bool, rngs):
    self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)
    self.max_pool_branch = max_pool_branch

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = max_pool(x, stride=1, padding=1) if self.max_pool_branch else avg_pool_valid(x)
    return jnp.concatenate(
      [
        self.branch1x1(x),
        self.branch3x3_2a(b3),
        self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(b3dbl),
        self.branch3x3dbl_3b(b3dbl),
        self.branch_pool(pooled),
      ],
      axis=-1,
    )


class Linear(nnx.Module):
  """x @ weight + bias, `weight` [in, out] (the file's [out, in] transposed)."""

  def __init__(self, cin: int, cout: int, *, rngs):
    self.weight = param(rngs, (cin, cout), ("embed", "vocab"), std=1 / math.sqrt(cin))
    self.bias = param(None, (cout,), ("vocab",), init="zeros")

  def __call__(self, x_NxC):
    return x_NxC @ self.weight[...] + self.bias[...]


class InceptionV3(nnx.Module):
  """pytorch-fid's FID Inception-v3 (see the module docstring); float32."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, max_pool_branch=False, rngs=rngs)
    self.Mixed_7c = InceptionE(2048, max_pool_branch=True, rngs=rngs)
    self.fc = Linear(2048, NUM_CLASSES, rngs=rngs)

  def __call__(self, x_NxHxWx3) -> dict:
    """Features of network inputs in [-1, 1] (already resized, see `preprocess`):
    pool [N, 2048], spatial [N, h*w*7] (2023 at 299x299), logits [N, 1008]."""
    x = x_NxHxWx3
    for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
      x = layer(x)
    x = max_pool(x, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = max_pool(x, stride=2)
    for block in (
      self.Mixed_5b,
      self.Mixed_5c,
      self.Mixed_5d,
      self.Mixed_6a,
      self.Mixed_6b,
      self.Mixed_6c,
    ):
      x = block(x)
    branches = self.Mixed_6d.branches(x)
    mixed_6_conv_NxhxwxC = branches[0]  # TF's "mixed_6/conv"
    x = jnp.concatenate(branches, axis=-1)
    for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)
    pool_Nx2048 = x.mean(axis=(1, 2))
    n = x.shape[0]
    return dict(
      pool=pool_Nx2048,
      spatial=mixed_6_conv_NxhxwxC[..., :SPATIAL_CHANNELS].reshape(n, -1),
      logits=self.fc(pool_Nx2048),
    )


# ------------------------------------------------------------------ loading


def state_dict_key(path: tuple) -> str:
  """A parameter's path -> its key in pytorch-fid's file ('Mixed_5b', 'branch1x1', ...)."""
  return ".".join(str(p) for p in path)


def _torch_shape(shape: tuple) -> tuple:
  """The file's (PyTorch) shape of one of our arrays: OIHW convs, [out, in] fc."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _our_layout(value: np.ndarray) -> np.ndarray:
  if value.ndim == 4:  # OIHW -> HWIO
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:  # [out, in] -> [in, out]
    return value.T
  return value


def expected_state_dict_shapes() -> dict[str, tuple]:
  """Key -> PyTorch shape of every tensor the file must hold (its
  `*.num_batches_tracked` counters aside, which may be there or not)."""
  abstract = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
  return {
    state_dict_key(path): _torch_shape(var.shape)
    for path, var in nnx.to_flat_state(nnx.state(abstract))
  }


def _listed(keys) -> str:
  keys = sorted(keys)
  more = f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
  return ", ".join(keys[:_MAX_LISTED]) + more


def inception_from_state_dict(tensors: dict, *, source: str = "Inception weights") -> InceptionV3:
  """An InceptionV3 holding `tensors` (state-dict key -> PyTorch-layout array),
  every key and shape checked; float32 whatever the stored dtype."""
  abstract = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(abstract_state))
  expected = {state_dict_key(path) for path, _ in flat}
  missing = [k for k in expected if k not in tensors]
  unexpected = [k for k in tensors if k not in expected and not k.endswith(".num_batches_tracked")]
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"{len(missing)} key(s) are missing: {_listed(missing)}")
    if unexpected:
      parts.append(f"{len(unexpected)} key(s) are not in the FID Inception: {_listed(unexpected)}")
    aux = (
      " (AuxLogits.*: torchvision's ImageNet Inception, not the FID one)"
      if any(k.startswith("AuxLogits.") for k in unexpected)
      else ""
    )
    raise CheckpointError(
      f"{source} are not pytorch-fid's FID Inception: "
      + "; ".join(parts)
      + f"{aux}. Pass pytorch-fid's "
      f"pt_inception-2015-12-05-*.pth ({WEIGHTS_FILE})"
    )
  leaves = []
  for path, var in flat:
    key = state_dict_key(path)
    value = np.asarray(tensors[key])
    want = _torch_shape(var.shape)
    if tuple(value.shape) != want:
      raise CheckpointError(
        f"{source}: {key!r} has shape {tuple(value.shape)}, the FID "
        f"Inception's is {want}; pass pytorch-fid's {WEIGHTS_FILE}"
      )
    if not np.issubdtype(value.dtype, np.floating) and value.dtype.kind != "V":
      raise CheckpointError(
        f"{source}: {key!r} holds {value.dtype}, not floats; pass pytorch-fid's {WEIGHTS_FILE}"
      )
    leaves.append((path, var.replace(jnp.asarray(_our_layout(value).astype(np.float32)))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def load_inception(path) -> InceptionV3:
  """The FID Inception with the weights of pytorch-fid's `pt_inception-2015-12-05-
  6726825d.pth` at `path` (either torch.save format; read without torch)."""
  tensors = torch_files.read_state_dict(path, hint=WEIGHTS_HINT)
  return inception_from_state_dict(tensors, source=f"Inception weights {os.fspath(path)}")


# ------------------------------------------------------------------ features


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's bilinear resize along one axis
  (F.interpolate(mode='bilinear', align_corners=False), no antialiasing):
  output i samples the input at (i + 0.5) * n_in / n_out - 0.5, clamped at 0,
  between its two nearest pixels (the last one repeated past the edge).

  Rounded as torch's kernels round them (bit for bit with its CPU kernel):
  the scale in float32, the position one fused multiply-add rounded to
  float32, the weights in float32. Positions in float64 would move the
  weights by up to 6e-5 at 1000 pixels.
  """
  f32 = np.float32
  scale = float(f32(n_in) / f32(n_out))
  # float64 holds the float32 product exactly: one rounding, as an FMA.
  src = np.maximum((scale * (np.arange(n_out) + 0.5) - 0.5).astype(f32), f32(0))
  i0 = np.minimum(src.astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0.astype(f32)
  m = np.zeros((n_out, n_in), f32)
  np.add.at(m, (np.arange(n_out), i0), f32(1) - frac)
  np.add.at(m, (np.arange(n_out), i1), frac)
  return m


def resize_bilinear(x_NxHxWxC, size: tuple[int, int]):
  """`x` resized to `size` (h, w) exactly as torch's F.interpolate(mode='bilinear',
  align_corners=False): plain 2-tap interpolation, so a downsized image aliases.

  Written out (two matmuls at float32 precision, weights `bilinear_matrix`);
  jax.image.resize(x, shape, 'bilinear', antialias=False) agrees with torch to
  1e-7 too, but its default antialias=True does only when upsizing (512 -> 299
  moves pixels by up to 0.5).
  """
  _, h, w, _ = x_NxHxWxC.shape
  if (h, w) == tuple(size):
    return x_NxHxWxC
  rows_hxH = jnp.asarray(bilinear_matrix(h, size[0]))
  cols_wxW = jnp.asarray(bilinear_matrix(w, size[1]))
  highest = jax.lax.Precision.HIGHEST
  x = jnp.einsum("hH,nHWc->nhWc", rows_hxH, x_NxHxWxC, precision=highest)
  return jnp.einsum("wW,nhWc->nhwc", cols_wxW, x, precision=highest)


@jax.jit
def preprocess(images_NxHxWx3):
  """Images (uint8 in [0, 255] or float in [0, 1]) -> the network's float32
  input in [-1, 1] at 299x299, as pytorch-fid's InceptionV3(resize_input=True,
  normalize_input=True): x / 255 for uint8 (ToTensor), bilinear resize, 2x - 1.

  ADM's evaluator feeds TF's graph instead, whose own resize and scaling
  differ slightly, so these features match pytorch-fid's, and TF's closely.
  """
  x = images_NxHxWx3
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  return 2.0 * resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE)) - 1.0


@functools.partial(jax.jit, static_argnums=0)
def _network(graphdef, state, x_Nx299x299x3):
  return nnx.merge(graphdef, state)(x_Nx299x299x3)


def check_images(images) -> None:
  """Raises FileFormatError unless `images` is [N, H, W, 3], uint8 or float."""
  if not hasattr(images, "shape") or not hasattr(images, "dtype"):
    raise FileFormatError(
      f"Inception images are a {type(images).__name__}; pass an "
      "array [N, H, W, 3] (np.stack a list of images)"
    )
  shape, dtype = tuple(images.shape), np.dtype(images.dtype)
  if len(shape) != 4 or shape[-1] != 3:
    fix = (
      "transpose NCHW to NHWC with x.transpose(0, 2, 3, 1)"
      if len(shape) == 4 and shape[1] == 3
      else "repeat a grayscale channel with np.repeat(x, 3, axis=-1)"
      if len(shape) == 4 and shape[-1] == 1
      else "add the batch axis with x[None]"
      if len(shape) == 3
      else "pass an [N, H, W, 3] array"
    )
    raise FileFormatError(
      f"Inception images have shape {shape}; they must be RGB [N, H, W, 3] (NHWC): {fix}"
    )
  if dtype != np.uint8 and not (
    np.issubdtype(dtype, np.floating) or dtype.kind == "V" and dtype.itemsize == 2
  ):
    raise FileFormatError(
      f"Inception images are {dtype}; pass uint8 in [0, 255] "
      "(x.astype(np.uint8) for integers in that range) or floats "
      "in [0, 1]"
    )


def _check_range(batch: np.ndarray, start: int) -> None:
  if batch.dtype == np.uint8 or not batch.size:
    return
  lo, hi = float(np.min(batch)), float(np.max(batch))
  if not (lo >= -0.01 and hi <= 1.01):  # also catches NaN
    fix = (
      "they look like [0, 255]: pass uint8 or x / 255"
      if hi > 1.5
      else "they look like [-1, 1]: pass (x + 1) / 2"
      if lo < -0.5
      else "clip them to [0, 1]"
    )
    raise FileFormatError(
      f"Inception images {start}..{start + len(batch) - 1} are "
      f"floats in [{lo:.3g}, {hi:.3g}], not [0, 1]: {fix}"
    )


def _active_mesh(mesh):
  """The mesh to shard batches over: `mesh`, else the one set by jax.set_mesh, else None."""
  if mesh is None and not jax.sharding.get_abstract_mesh().empty:
    mesh = jax.sharding.get_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return None
  return mesh


def inception_features(
  model: InceptionV3,
  images_NxHxWx3,
  *,
  batch_size: int = 200,
  progress: Callable[[int], None] | None = None,
  mesh=None,
  precision: str = "highest",
) -> dict[str, np.ndarray]:
  """pool [N, 2048], spatial [N, 2023] and logits [N, 1008] (float32 numpy) of
  `images_NxHxWx3`, uint8 in [0, 255] (ADM's .npz arrays) or float in [0, 1],
  any H x W (resized to 299x299 as pytorch-fid does: see `preprocess`).

  The images go through in batches of `batch_size` (rounded up to a multiple
  of the device count), each of the same shape, the last one padded and the
  padding dropped, so the network compiles once; `images` may be a memory map,
  only a batch at a time is read. With a mesh (`mesh=`, or one set by
  jax.set_mesh) each batch is split over all its devices, the weights
  replicated (one process: the outputs are gathered on this host).
  `progress(done)` is called after each batch with the number of images done.
  `precision` is the convolutions' (jax.default_matmul_precision): 'highest'
  keeps float32 on GPUs, whose default would round inputs to TF32.
  """
  check_images(images_NxHxWx3)
  n = int(images_NxHxWx3.shape[0])
  if batch_size < 1:
    raise ValueError(f"inception_features batch_size={batch_size} must be >= 1")
  mesh = _active_mesh(mesh)
  devices = 1 if mesh is None else mesh.size
  batch = -(-min(batch_size, max(n, 1)) // devices) * devices
  graphdef, state = nnx.split(model)
  if mesh is not None:
    spec = P(tuple(mesh.axis_names))
    input_sharding = NamedSharding(mesh, spec)
    state = jax.device_put(state, NamedSharding(mesh, P()))
  out = {name: [] for name in ("pool", "spatial", "logits")}

  def fetch(pending):
    features, count = pending
    for name, value in features.items():
      out[name].append(np.asarray(value)[:count])

  pending = None
  for start in range(0, n, batch):
    chunk = np.asarray(images_NxHxWx3[start : start + batch])
    _check_range(chunk, start)
    count = len(chunk)
    if count < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - count,) + chunk.shape[1:], chunk.dtype)])
    x = chunk if mesh is None else jax.device_put(chunk, input_sharding)
    with jax.default_matmul_precision(precision):
      features = _network(graphdef, state, preprocess(x))
    if pending is not None:  # fetch the previous batch while this one runs
      fetch(pending)
      if progress is not None:
        progress(start)
    pending = (features, count)
  if pending is not None:
    fetch(pending)
    if progress is not None:
      progress(n)
  widths = dict(pool=2048, spatial=SPATIAL_FEATURES, logits=NUM_CLASSES)
  return {
    name: (np.concatenate(parts) if parts else np.zeros((0, widths[name]), np.float32))
    for name, parts in out.items()
  }
