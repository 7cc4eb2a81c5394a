"""The Stable Diffusion VAE (diffusers' AutoencoderKL) in Flax NNX, channels-last.

Images are NHWC pixels in [-1, 1]; latents are NHWC with `latent_channels`
channels at 1/2**(len(block_out_channels)-1) the resolution (SD: 256x256x3 ->
32x32x4). Diffusion runs on *scaled* latents, `(sample - shift) * scale` with
the config's `scaling_factor` (0.18215 for SD 1.x/2.x) and `shift_factor`
(none for SD); `encode_images` and `decode_latents` are the only places that
apply it.

Submodules are named after diffusers' (lists included: `downsamplers.0.conv`,
`to_out.0`), so a parameter's path is its checkpoint key; conv kernels are
HWIO, the attention projections [in, out]. The VAE computes in the dtype of its
parameters, with GroupNorm statistics and the attention softmax in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from monoformer_jax.model.layers import Dense, param

SCALING_FACTOR = 0.18215  # SD 1.x/2.x latent scale; a config's scaling_factor wins
GROUP_NORM_EPS = 1e-6  # every GroupNorm of the SD VAE

# The only block types the SD VAEs use; others (attention down blocks, ...) are not built.
DOWN_BLOCK_TYPE = "DownEncoderBlock2D"
UP_BLOCK_TYPE = "UpDecoderBlock2D"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of a diffusers AutoencoderKL `config.json` we use; defaults are
  sd-vae-ft-mse's (diffusers' save_pretrained writes every field anyway)."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  sample_size: Any = 256  # the training resolution; informational only
  scaling_factor: float = SCALING_FACTOR
  shift_factor: float = 0.0
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    # Tuples: the config is a static (hashed) attribute of the module under jit.
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
    if isinstance(self.sample_size, list):
      object.__setattr__(self, "sample_size", tuple(self.sample_size))
    if not self.block_out_channels:
      raise ValueError(
        "VAE config block_out_channels is empty; the SD VAE uses [128, 256, 512, 512]"
      )
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(
          f"VAE config block_out_channels={list(self.block_out_channels)}: "
          f"{c} is not a multiple of norm_num_groups={self.norm_num_groups}"
        )
    if self.layers_per_block < 1:
      raise ValueError(f"VAE config layers_per_block={self.layers_per_block} must be >= 1")
    if not self.scaling_factor:
      raise ValueError(
        f"VAE config scaling_factor={self.scaling_factor!r} must be "
        f"non-zero (SD uses {SCALING_FACTOR})"
      )

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, config: dict) -> VAEConfig:
    """From a diffusers AutoencoderKL config dict; checks what we cannot build."""
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise ValueError(
        f"VAE config _class_name={name!r}: only diffusers' AutoencoderKL "
        "(e.g. stabilityai/sd-vae-ft-mse) is implemented"
      )
    act = config.get("act_fn", "silu")
    if act not in ("silu", "swish"):
      raise ValueError(f"VAE config act_fn={act!r} is not supported; the SD VAE uses 'silu'")
    n = len(config.get("block_out_channels", cls.block_out_channels))
    for field, expected in (
      ("down_block_types", DOWN_BLOCK_TYPE),
      ("up_block_types", UP_BLOCK_TYPE),
    ):
      types = list(config.get(field, [expected] * n))
      if any(t != expected for t in types):
        raise ValueError(
          f"VAE config {field}={types} is not supported: only {expected!r} blocks are implemented"
        )
      if len(types) != n:
        raise ValueError(
          f"VAE config {field} has {len(types)} entries but "
          f"block_out_channels has {n}; they must match"
        )
    for field in ("latents_mean", "latents_std"):
      if config.get(field) is not None:
        raise ValueError(
          f"VAE config {field} is set: per-channel latent "
          "normalisation is not implemented (SD VAEs leave it null)"
        )
    kwargs = {
      f.name: config[f.name] for f in dataclasses.fields(cls) if config.get(f.name) is not None
    }
    return cls(**kwargs)


class Conv(nnx.Module):
  """2-D convolution, NHWC input and HWIO kernel, with bias."""

  def __init__(self, cin: int, cout: int, k: int, *, rngs, stride: int = 1, padding=None):
    self.kernel = param(
      rngs,
      (k, k, cin, cout),
      ("conv_height", "conv_width", "conv_in", "conv_out"),
      std=1 / math.sqrt(k * k * cin),
    )
    self.bias = param(rngs, (cout,), ("conv_out",), init="zeros")
    self.stride = stride
    self.padding = ((k // 2, k // 2),) * 2 if padding is None else padding

  def __call__(self, x_BxhxwxC):
    dtype = x_BxhxwxC.dtype
    y = jax.lax.conv_general_dilated(
      x_BxhxwxC,
      self.kernel[...].astype(dtype),
      (self.stride, self.stride),
      self.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return y + self.bias[...].astype(dtype)


class GroupNorm(nnx.Module):
  """GroupNorm over contiguous channel groups, statistics in float32."""

  def __init__(self, channels: int, groups: int):
    if channels % groups:
      raise ValueError(
        f"GroupNorm: {channels} channels are not divisible by norm_num_groups={groups}"
      )
    self.scale = param(None, (channels,), ("conv_out",), init="ones")
    self.bias = param(None, (channels,), ("conv_out",), init="zeros")
    self.groups = groups

  def __call__(self, x_BxhxwxC):
    n, h, w, c = x_BxhxwxC.shape
    # Group g holds channels [g*C/G, (g+1)*C/G), as torch's NCHW view does.
    x = x_BxhxwxC.astype(jnp.float32).reshape(n, h, w, self.groups, c // self.groups)
    mean = x.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(x - mean).mean(axis=(1, 2, 4), keepdims=True)
    x = ((x - mean) * jax.lax.rsqrt(var + GROUP_NORM_EPS)).reshape(n, h, w, c)
    return (x * self.scale[...] + self.bias[...]).astype(x_BxhxwxC.dtype)


class ResnetBlock(nnx.Module):
  """x + conv(silu(norm(conv(silu(norm(x)))))), a 1x1 conv on x if channels change."""

  def __init__(self, cin: int, cout: int, groups: int, *, rngs):
    self.norm1 = GroupNorm(cin, groups)
    self.conv1 = Conv(cin, cout, 3, rngs=rngs)
    self.norm2 = GroupNorm(cout, groups)
    self.conv2 = Conv(cout, cout, 3, rngs=rngs)
    self.conv_shortcut = Conv(cin, cout, 1, rngs=rngs) if cin != cout else None

  def __call__(self, x_BxhxwxC):
    h = self.conv1(jax.nn.silu(self.norm1(x_BxhxwxC)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = x_BxhxwxC if self.conv_shortcut is None else self.conv_shortcut(x_BxhxwxC)
    return skip + h


class SpatialSelfAttention(nnx.Module):
  """x + out(attention(norm(x))) over the h*w positions, one head of all C channels."""

  def __init__(self, channels: int, groups: int, *, rngs):
    self.group_norm = GroupNorm(channels, groups)
    axes = ("conv_in", "conv_out")
    self.to_q = Dense(channels, channels, axes, rngs=rngs)
    self.to_k = Dense(channels, channels, axes, rngs=rngs)
    self.to_v = Dense(channels, channels, axes, rngs=rngs)
    self.to_out = nnx.List([Dense(channels, channels, axes, rngs=rngs)])

  def __call__(self, x_BxhxwxC):
    n, h, w, c = x_BxhxwxC.shape
    x_BxLxC = self.group_norm(x_BxhxwxC).reshape(n, h * w, c)
    q, k, v = (proj(x_BxLxC)[:, :, None] for proj in (self.to_q, self.to_k, self.to_v))
    # [B, L, 1 head, C]; the XLA path takes the softmax in float32, GPUs may
    # pick a fused kernel for half precision (L = 4096 at 512 px).
    out_BxLxC = jax.nn.dot_product_attention(q, k, v)[:, :, 0]
    return x_BxhxwxC + self.to_out[0](out_BxLxC).reshape(n, h, w, c)


class MidBlock(nnx.Module):
  """resnet, then (attention, resnet) — the attention left out when disabled."""

  def __init__(self, channels: int, groups: int, add_attention: bool, *, rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List(
      [SpatialSelfAttention(channels, groups, rngs=rngs)] if add_attention else []
    )

  def __call__(self, x_BxhxwxC):
    x = self.resnets[0](x_BxhxwxC)
    for attention in self.attentions:
      x = attention(x)
    return self.resnets[1](x)


class Downsample(nnx.Module):
  """3x3 stride-2 conv after zero padding only bottom and right (diffusers' (0,1,0,1))."""

  def __init__(self, channels: int, *, rngs):
    self.conv = Conv(channels, channels, 3, rngs=rngs, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x_BxhxwxC):
    return self.conv(x_BxhxwxC)


class Upsample(nnx.Module):
  """Nearest-neighbour 2x, then a 3x3 conv."""

  def __init__(self, channels: int, *, rngs):
    self.conv = Conv(channels, channels, 3, rngs=rngs)

  def __call__(self, x_BxhxwxC):
    x = jnp.repeat(jnp.repeat(x_BxhxwxC, 2, axis=1), 2, axis=2)
    return self.conv(x)


class EncoderBlock(nnx.Module):
  """DownEncoderBlock2D: resnets, then an optional downsample."""

  def __init__(self, cin: int, cout: int, num_layers: int, groups: int, downsample: bool, *, rngs):
    self.resnets = nnx.List(
      [ResnetBlock(cin if i == 0 else cout, cout, groups, rngs=rngs) for i in range(num_layers)]
    )
    self.downsamplers = nnx.List([Downsample(cout, rngs=rngs)] if downsample else [])

  def __call__(self, x_BxhxwxC):
    for layer in (*self.resnets, *self.downsamplers):
      x_BxhxwxC = layer(x_BxhxwxC)
    return x_BxhxwxC


class DecoderBlock(nnx.Module):
  """UpDecoderBlock2D: resnets, then an optional upsample."""

  def __init__(self, cin: int, cout: int, num_layers: int, groups: int, upsample: bool, *, rngs):
    self.resnets = nnx.List(
      [ResnetBlock(cin if i == 0 else cout, cout, groups, rngs=rngs) for i in range(num_layers)]
    )
    self.upsamplers = nnx.List([Upsample(cout, rngs=rngs)] if upsample else [])

  def __call__(self, x_BxhxwxC):
    for layer in (*self.resnets, *self.upsamplers):
      x_BxhxwxC = layer(x_BxhxwxC)
    return x_BxhxwxC


class Encoder(nnx.Module):
  """Pixels [B, h, w, in] -> posterior moments [B, h/f, w/f, 2*latent] (mean, logvar)."""

  def __init__(self, cfg: VAEConfig, *, rngs):
    chans, groups = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = Conv(cfg.in_channels, chans[0], 3, rngs=rngs)
    self.down_blocks = nnx.List(
      [
        EncoderBlock(
          chans[max(i - 1, 0)],
          c,
          cfg.layers_per_block,
          groups,
          downsample=i < len(chans) - 1,
          rngs=rngs,
        )
        for i, c in enumerate(chans)
      ]
    )
    self.mid_block = MidBlock(chans[-1], groups, cfg.mid_block_add_attention, rngs=rngs)
    self.conv_norm_out = GroupNorm(chans[-1], groups)
    self.conv_out = Conv(chans[-1], 2 * cfg.latent_channels, 3, rngs=rngs)

  def __call__(self, x_BxhxwxC):
    x = self.conv_in(x_BxhxwxC)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latents [B, h, w, latent] -> pixels [B, h*f, w*f, out]; channels run in reverse."""

  def __init__(self, cfg: VAEConfig, *, rngs):
    chans, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
    self.conv_in = Conv(cfg.latent_channels, chans[0], 3, rngs=rngs)
    self.mid_block = MidBlock(chans[0], groups, cfg.mid_block_add_attention, rngs=rngs)
    # One resnet more per block than the encoder, as in diffusers.
    self.up_blocks = nnx.List(
      [
        DecoderBlock(
          chans[max(i - 1, 0)],
          c,
          cfg.layers_per_block + 1,
          groups,
          upsample=i < len(chans) - 1,
          rngs=rngs,
        )
        for i, c in enumerate(chans)
      ]
    )
    self.conv_norm_out = GroupNorm(chans[-1], groups)
    self.conv_out = Conv(chans[-1], cfg.out_channels, 3, rngs=rngs)

  def __call__(self, z_BxhxwxC):
    x = self.mid_block(self.conv_in(z_BxhxwxC))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
  """The encoder's posterior N(mean, exp(logvar)), [B, h, w, latent] each."""

  mean: jax.Array
  logvar: jax.Array  # clipped to [-30, 20] as diffusers does

  @classmethod
  def from_moments(cls, moments_Bxhxwx2C):
    mean, logvar = jnp.split(moments_Bxhxwx2C, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self):
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key):
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self):
    return self.mean


class AutoencoderKL(nnx.Module):
  """encode: pixels -> DiagonalGaussian; decode: unscaled latents -> pixels."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    c = cfg.latent_channels
    self.quant_conv = Conv(2 * c, 2 * c, 1, rngs=rngs) if cfg.use_quant_conv else None
    self.post_quant_conv = Conv(c, c, 1, rngs=rngs) if cfg.use_post_quant_conv else None

  @property
  def dtype(self):
    """The compute dtype: that of the parameters."""
    return self.encoder.conv_in.kernel.dtype

  def _check_channels(self, x, expected: int, what: str, field: str):
    if x.ndim != 4 or x.shape[-1] != expected:
      raise ValueError(
        f"VAE {what} have shape {x.shape}; expected NHWC [B, h, w, "
        f"{expected}] ({field}={expected} in the VAE config). Channels "
        "go last: transpose NCHW arrays with x.transpose(0, 2, 3, 1)"
      )

  def encode(self, x_BxhxwxC) -> DiagonalGaussian:
    self._check_channels(x_BxhxwxC, self.config.in_channels, "input images", "in_channels")
    f = self.config.downsample_factor
    if x_BxhxwxC.shape[1] % f or x_BxhxwxC.shape[2] % f:
      raise ValueError(
        f"VAE input images are {x_BxhxwxC.shape[1]}x{x_BxhxwxC.shape[2]}; "
        f"height and width must be multiples of {f} (2 ** (number of "
        "block_out_channels - 1)); crop or pad them"
      )
    moments = self.encoder(x_BxhxwxC.astype(self.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments)

  def decode(self, z_BxhxwxC):
    self._check_channels(z_BxhxwxC, self.config.latent_channels, "latents", "latent_channels")
    z = z_BxhxwxC.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)


def encode_images(vae: AutoencoderKL, pixels_BxhxwxC, key=None):
  """Diffusion latents float32 [B, h/f, w/f, latent] of pixels in [-1, 1].

  The posterior's mode when `key` is None, else a sample; then
  `(z - shift_factor) * scaling_factor` (SD: `z * 0.18215`).
  """
  posterior = vae.encode(pixels_BxhxwxC)
  z = posterior.mode() if key is None else posterior.sample(key)
  cfg = vae.config
  return (z.astype(jnp.float32) - cfg.shift_factor) * cfg.scaling_factor


def decode_latents(vae: AutoencoderKL, latents_BxhxwxC):
  """Pixels float32 [B, h*f, w*f, out], nominally in [-1, 1] (not clipped).

  Undoes `encode_images`' scaling first (SD: `latents / 0.18215`).
  """
  cfg = vae.config
  z = latents_BxhxwxC.astype(jnp.float32) / cfg.scaling_factor + cfg.shift_factor
  return vae.decode(z).astype(jnp.float32)
