"""MonoFormer: one Llama decoder for next-token text and diffusion images.

The model reads the packed row of `monoformer_jax.data` (tokens, segment_ids,
image_ids, positions [B, L]) plus the noised latents of each row's image slots
`latents_BxMxhxwxC` and their timesteps `t_BxM` (original 0..T-1 indices). The
k-th image of a row (image_ids == k) fills its P = (h/p)*(w/p) slots in order,
so the n-th image token of a row is patch token n of the flattened [M*P] image
tokens: a cumulative sum places and collects them.

Image tokens get, before layer 0: x_embedder(patch) + the 2-D sin-cos table,
then `x * (1 + scale) + shift` from adaLN_module(t) (`adaln_before_decoder`,
the released checkpoint's mode). Outputs: LM logits for every token and, per
image slot, the diffusion head's [h, w, 2C] (epsilon, learned-range variance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from monoformer_jax.model.embeddings import patchify, sincos_2d, timestep_features, unpatchify
from monoformer_jax.model.llama import Decoder, param
from monoformer_jax.parallel.sharding import constrain

CONDITIONING_MODES = ("adaln_before_decoder",)


class Dense(nnx.Module):
  """y = x @ W + b, kernel [in, out]; the image-side modules all have biases."""

  def __init__(self, din, dout, axes, *, rngs, init="normal", std=0.02):
    self.kernel = param(rngs, (din, dout), axes, init=init, std=std)
    self.bias = param(rngs, (dout,), axes[1:], init="zeros")

  def __call__(self, x):
    return x @ self.kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class TimestepEmbedder(nnx.Module):
  """DiT: 256 sinusoidal features -> Linear -> SiLU -> Linear."""

  def __init__(self, cfg, *, rngs):
    self.freq_dim = cfg.timestep_freq_dim
    self.fc1 = Dense(self.freq_dim, cfg.hidden_size, ("freq", "embed"), rngs=rngs)
    self.fc2 = Dense(cfg.hidden_size, cfg.hidden_size, ("embed", "embed"), rngs=rngs)

  def __call__(self, t, dtype):
    h = self.fc1(timestep_features(t, self.freq_dim).astype(dtype))
    return self.fc2(jax.nn.silu(h))


class FinalLayer(nnx.Module):
  """DiT head: LayerNorm (no affine, eps 1e-6), adaLN modulate, Linear -> p*p*2C."""

  def __init__(self, cfg, out_features, *, rngs):
    e = cfg.hidden_size
    self.adaln = Dense(e, 2 * e, ("embed", "embed"), rngs=rngs, init="zeros")
    self.linear = Dense(e, out_features, ("embed", "patch"), rngs=rngs, init="zeros")

  def __call__(self, h_BxMxPxE, t_emb_BxMxE):
    shift, scale = jnp.split(self.adaln(jax.nn.silu(t_emb_BxMxE)), 2, axis=-1)
    x = h_BxMxPxE.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
    x = x.astype(h_BxMxPxE.dtype) * (1 + scale[:, :, None]) + shift[:, :, None]
    return self.linear(x)


class MonoFormer(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    if cfg.conditioning not in CONDITIONING_MODES:
      raise ValueError(f"config.model.conditioning={cfg.conditioning!r} is not "
                       f"supported; use one of {CONDITIONING_MODES}")
    if cfg.image_size % cfg.patch_size:
      raise ValueError(f"config.model.image_size={cfg.image_size} is not a "
                       f"multiple of patch_size={cfg.patch_size}")
    self.cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: the graphdef is a jit key
    e, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    self.out_channels = 2 * c if cfg.learn_sigma else c
    self.grid = cfg.image_size // p
    self.dtype = jnp.dtype(cfg.dtype)

    self.embed_tokens = param(rngs, (cfg.vocab_size, e), ("vocab", "embed"))
    self.x_embedder = Dense(c * p * p, e, ("patch", "embed"), rngs=rngs)
    self.t_embedder = TimestepEmbedder(cfg, rngs=rngs)
    self.adaln_module = Dense(e, 2 * e, ("embed", "embed"), rngs=rngs, init="zeros")
    self.decoder = Decoder(cfg, rngs=rngs)
    self.lm_head = param(rngs, (e, cfg.vocab_size), ("embed", "vocab"))
    self.final_layer = FinalLayer(cfg, p * p * self.out_channels, rngs=rngs)

  @property
  def tokens_per_image(self) -> int:
    return self.grid * self.grid

  def embed_text(self, tokens_BxL):
    return jnp.take(self.embed_tokens[...], tokens_BxL, axis=0).astype(self.dtype)

  def image_tokens(self, latents_BxMxhxwxC, t_BxM):
    """Layer-0 inputs of every image's patch tokens [B, M, P, E] and the
    timestep embeddings [B, M, E]: x_embedder(patch) + 2-D sin-cos, then the
    `adaln_before_decoder` modulation x * (1 + scale) + shift."""
    b, m = t_BxM.shape
    patches = patchify(latents_BxMxhxwxC.reshape(b * m, *latents_BxMxhxwxC.shape[2:]),
                       self.cfg.patch_size)
    img_BMxPxE = self.x_embedder(patches.astype(self.dtype))
    img_BMxPxE = img_BMxPxE + sincos_2d(self.cfg.hidden_size, self.grid).astype(self.dtype)
    t_emb_BxMxE = self.t_embedder(t_BxM, self.dtype)
    shift_BxMxE, scale_BxMxE = jnp.split(
        self.adaln_module(jax.nn.silu(t_emb_BxMxE)), 2, axis=-1)
    img_BxMxPxE = img_BMxPxE.reshape(b, m, self.tokens_per_image, -1)
    img_BxMxPxE = img_BxMxPxE * (1 + scale_BxMxE[:, :, None]) + shift_BxMxE[:, :, None]
    return img_BxMxPxE, t_emb_BxMxE

  def embed(self, tokens, image_ids, latents_BxMxhxwxC, t_BxM):
    """Layer-0 input x [B, L, E] of a packed row and the timestep embeddings [B, M, E]."""
    b, m = t_BxM.shape
    n_img = m * self.tokens_per_image
    img_BxMxPxE, t_emb_BxMxE = self.image_tokens(latents_BxMxhxwxC, t_BxM)
    is_img_BxL = image_ids > 0
    slot_BxL = jnp.clip(jnp.cumsum(is_img_BxL, axis=1) - 1, 0, n_img - 1)
    placed_BxLxE = jnp.take_along_axis(img_BxMxPxE.reshape(b, n_img, -1),
                                       slot_BxL[..., None], axis=1)
    x_BxLxE = jnp.where(is_img_BxL[..., None], placed_BxLxE, self.embed_text(tokens))
    return constrain(x_BxLxE, ("batch", "length", None)), t_emb_BxMxE

  def diffusion_head(self, h_BxMxPxE, t_emb_BxMxE):
    """Diffusion output [B, M, h, w, 2C] float32 from each image's final hidden states."""
    b, m = t_emb_BxMxE.shape[:2]
    out = self.final_layer(h_BxMxPxE, t_emb_BxMxE)
    size = self.cfg.image_size
    out = unpatchify(out.reshape(b * m, self.tokens_per_image, -1),
                     self.cfg.patch_size, size, size)
    return out.reshape(b, m, size, size, self.out_channels).astype(jnp.float32)

  def image_head(self, h_BxLxE, image_ids, t_emb_BxMxE):
    """Diffusion output [B, M, h, w, 2C] of every image slot of packed rows."""
    b, m, _ = t_emb_BxMxE.shape
    n_img = m * self.tokens_per_image
    is_img_BxL = image_ids > 0
    # Non-image tokens scatter to index n_img, outside the array: dropped.
    slot_BxL = jnp.where(is_img_BxL, jnp.cumsum(is_img_BxL, axis=1) - 1, n_img)
    gathered_BxNxE = jnp.zeros((b, n_img, h_BxLxE.shape[-1]), h_BxLxE.dtype).at[
        jnp.arange(b)[:, None], slot_BxL].set(h_BxLxE, mode="drop")
    return self.diffusion_head(gathered_BxNxE.reshape(b, m, self.tokens_per_image, -1),
                               t_emb_BxMxE)

  def logits(self, h_BxLxE):
    return jnp.einsum("ble,ev->blv", h_BxLxE, self.lm_head[...].astype(h_BxLxE.dtype),
                      preferred_element_type=jnp.float32)

  def __call__(self, tokens, segment_ids, image_ids, positions, latents_BxMxhxwxC, t_BxM):
    """(logits [B, L, V] float32, diffusion output [B, M, h, w, 2C] float32)."""
    x_BxLxE, t_emb_BxMxE = self.embed(tokens, image_ids, latents_BxMxhxwxC, t_BxM)
    h_BxLxE = self.decoder(x_BxLxE, positions, segment_ids, image_ids)
    return self.logits(h_BxLxE), self.image_head(h_BxLxE, image_ids, t_emb_BxMxE)
