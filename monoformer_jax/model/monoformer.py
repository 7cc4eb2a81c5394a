"""MonoFormer: one Llama decoder for next-token text and diffusion images.

The model reads packed rows (`layout.Row`: per token [B, L] tokens, segment_ids,
image_ids, positions; per image slot the columns its P tokens occupy) plus
the noised latents of each row's image slots `latents_BxMxhxwxC` and their
timesteps `t_BxM` (original 0..T-1 indices). Image tokens are placed at, and
read back from, the columns the row names; the model never derives them.

Generated image tokens get, before layer 0: x_embedder(patch) + the 2-D
sin-cos table, and then the timestep by one of two modes (`conditioning`):
  adaln_before_decoder     x * (1 + scale) + shift from adaLN_module(t_emb)
                           (the released ImageNet checkpoint's mode);
  add_before_image_tokens  no modulation; the row's timestep token before the
                           image (data/ places it) is t_projector(t_emb),
                           Linear -> exact GELU -> Linear (every official
                           train config's mode).
READ images (for understanding; `vision_encoder` vae or clip) are clean: the
encoder's features (the patchified latent, or CLIP's second-to-last layer)
through im_embedder (Linear -> exact GELU -> Linear), with no position table
and no modulation; their timestep token, where the mode has one, is that of
t = 0. Outputs: LM logits for every token (or the hidden states, to which the
training loss applies the head only where it has cross-entropy) and, per
generated image slot, the diffusion head's [h, w, 2C] (epsilon,
learned-range variance).

The samplers call the same model in three more ways, all here so that a new
conditioning mode is one edit in this file: `prefill` writes a prompt's keys
and values into a KVCache, and `extend_text` / `extend_image` run new text
tokens or one image's tokens against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from monoformer_jax.config.schema import CONDITIONING_MODES, CONDITIONING_TOKEN_MODE
from monoformer_jax.layout import read_image_spec, tokens_per_image
from monoformer_jax.model.clip import CLIPVisionTower, feature_dim
from monoformer_jax.model.embeddings import patchify, sincos_2d, timestep_features, unpatchify
from monoformer_jax.model.layers import Dense, dense, param
from monoformer_jax.model.llama import Decoder, KVCache
from monoformer_jax.parallel.sharding import constrain


class Projector(nnx.Module):
  """Linear -> exact-erf GELU -> Linear (the reference's t_projector and im_embedder)."""

  def __init__(self, din, e, in_axis, *, rngs, zero_out=False):
    self.fc1 = Dense(din, e, (in_axis, "embed"), rngs=rngs)
    self.fc2 = Dense(e, e, ("embed", "embed"), rngs=rngs, init="zeros" if zero_out else "normal")

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


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


def _place(x_BxLxE, columns_BxMxP, tokens_BxMxPxE):
  """x with each image token written at its column; columns past the row
  (empty slots) write nothing."""
  b = x_BxLxE.shape[0]
  columns_BxMP = columns_BxMxP.reshape(b, -1)
  tokens_BxMPxE = tokens_BxMxPxE.reshape(b, columns_BxMP.shape[1], -1)
  return jax.vmap(lambda x, c, t: x.at[c].set(t, mode="drop"))(x_BxLxE, columns_BxMP, tokens_BxMPxE)


def _take(h_BxLxE, columns_BxMxP):
  """The hidden states [B, M, P, E] at the image columns; zeros for empty slots."""
  b, m, p = columns_BxMxP.shape
  h_BxMPxE = jax.vmap(lambda h, c: h.at[c].get(mode="fill", fill_value=0))(
    h_BxLxE, columns_BxMxP.reshape(b, m * p)
  )
  return h_BxMPxE.reshape(b, m, p, -1)


class MonoFormer(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs):
    if cfg.conditioning not in CONDITIONING_MODES:
      raise ValueError(
        f"config.model.conditioning={cfg.conditioning!r} is not "
        f"supported; use one of {CONDITIONING_MODES}"
      )
    self.cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: the graphdef is a jit key
    e, p, c = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    self.tokens_per_image = tokens_per_image(cfg)
    self.out_channels = 2 * c if cfg.learn_sigma else c
    self.grid = cfg.image_size // p
    self.dtype = jnp.dtype(cfg.dtype)

    self.embed_tokens = param(rngs, (cfg.vocab_size, e), ("vocab", "embed"))
    self.x_embedder = Dense(c * p * p, e, ("patch", "embed"), rngs=rngs)
    self.t_embedder = TimestepEmbedder(cfg, rngs=rngs)
    self.cond_token = cfg.conditioning == CONDITIONING_TOKEN_MODE
    if self.cond_token:
      # The reference zeroes both layers, which leaves the first one untrainable
      # (GELU(0) = 0 passes no gradient back); only the last starts at zero here.
      self.t_projector = Projector(e, e, "embed", rngs=rngs, zero_out=True)
    else:
      self.adaln_module = Dense(e, 2 * e, ("embed", "embed"), rngs=rngs, init="zeros")
    self.vision_encoder = cfg.vision_encoder
    read = read_image_spec(cfg)
    if read:
      if self.vision_encoder == "clip":
        self.vision_tower = CLIPVisionTower(cfg.vision, rngs=rngs)
        features = feature_dim(cfg.vision)
      else:
        features = c * p * p
      self.im_embedder = Projector(features, e, "patch", rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.lm_head = param(rngs, (e, cfg.vocab_size), ("embed", "vocab"))
    self.final_layer = FinalLayer(cfg, p * p * self.out_channels, rngs=rngs)

  # ------------------------------------------------------------ the parts
  def embed_text(self, tokens_BxL):
    return jnp.take(self.embed_tokens[...], tokens_BxL, axis=0).astype(self.dtype)

  def image_tokens(self, latents_BxMxhxwxC, t_BxM):
    """Layer-0 inputs of every generated image's patch tokens [B, M, P, E] and
    the timestep embeddings [B, M, E]: x_embedder(patch) + 2-D sin-cos, then
    (`adaln_before_decoder`) the modulation x * (1 + scale) + shift."""
    b, m = t_BxM.shape
    patches_BMxPxZ = patchify(
      latents_BxMxhxwxC.reshape(b * m, *latents_BxMxhxwxC.shape[2:]), self.cfg.patch_size
    )
    img_BMxPxE = self.x_embedder(patches_BMxPxZ.astype(self.dtype))
    img_BMxPxE = img_BMxPxE + sincos_2d(self.cfg.hidden_size, self.grid).astype(self.dtype)
    t_emb_BxMxE = self.t_embedder(t_BxM, self.dtype)
    img_BxMxPxE = img_BMxPxE.reshape(b, m, self.tokens_per_image, -1)
    if not self.cond_token:
      shift_BxMxE, scale_BxMxE = jnp.split(self.adaln_module(jax.nn.silu(t_emb_BxMxE)), 2, axis=-1)
      img_BxMxPxE = img_BxMxPxE * (1 + scale_BxMxE[:, :, None]) + shift_BxMxE[:, :, None]
    return img_BxMxPxE, t_emb_BxMxE

  def timestep_tokens(self, t_emb_BxMxE):
    """The `add_before_image_tokens` token of each image [B, M, E]: t_projector(t_emb)."""
    return self.t_projector(t_emb_BxMxE)

  def read_tokens(self, images_BxRx___):
    """Layer-0 inputs [B, R, Q, E] of read images (the vision encoder's input
    shape): the frozen encoder's features through im_embedder."""
    if not hasattr(self, "im_embedder"):
      raise ValueError(
        "this model has no vision encoder (model.vision_encoder is ''), so "
        "it cannot read images; train one with model.vision_encoder=vae or clip"
      )
    b, r = images_BxRx___.shape[:2]
    flat = images_BxRx___.reshape(b * r, *images_BxRx___.shape[2:])
    if self.vision_encoder == "clip":
      features_BRxQxZ = jax.lax.stop_gradient(self.vision_tower(flat, self.dtype))
    else:
      features_BRxQxZ = patchify(flat, self.cfg.patch_size)
    out_BRxQxE = self.im_embedder(features_BRxQxZ.astype(self.dtype))
    return out_BRxQxE.reshape(b, r, *out_BRxQxE.shape[1:])

  def _place_read(self, x_BxLxE, row, read_images):
    """x with the read images' tokens (and their t = 0 timestep tokens) placed."""
    if row.read_columns is None or not row.read_columns.shape[1]:
      return x_BxLxE
    if read_images is None:
      raise ValueError(
        f"rows with {row.read_columns.shape[1]} read-image slots need the "
        "images they read (read_images [B, R, ...], the batch's "
        "`read_images`)"
      )
    x_BxLxE = _place(x_BxLxE, row.read_columns, self.read_tokens(read_images))
    if self.cond_token:
      b, r = row.read_cond_columns.shape
      t0_BxRxE = self.timestep_tokens(self.t_embedder(jnp.zeros((b, r), jnp.int32), self.dtype))
      x_BxLxE = _place(x_BxLxE, row.read_cond_columns[:, :, None], t0_BxRxE[:, :, None])
    return x_BxLxE

  def embed(self, row, latents_BxMxhxwxC, t_BxM, read_images=None):
    """Layer-0 input x [B, L, E] of packed rows and the timestep embeddings
    [B, M, E] of their generated images."""
    img_BxMxPxE, t_emb_BxMxE = self.image_tokens(latents_BxMxhxwxC, t_BxM)
    x_BxLxE = _place(self.embed_text(row.tokens), row.image_columns, img_BxMxPxE)
    if self.cond_token:
      x_BxLxE = _place(
        x_BxLxE, row.cond_columns[:, :, None], self.timestep_tokens(t_emb_BxMxE)[:, :, None]
      )
    x_BxLxE = self._place_read(x_BxLxE, row, read_images)
    return constrain(x_BxLxE, ("batch", "length", None)), t_emb_BxMxE

  def diffusion_head(self, h_BxMxPxE, t_emb_BxMxE):
    """Diffusion output [B, M, h, w, 2C] float32 from each image's final hidden states."""
    b, m = t_emb_BxMxE.shape[:2]
    out_BxMxPxZ = self.final_layer(h_BxMxPxE, t_emb_BxMxE)
    size = self.cfg.image_size
    out = unpatchify(
      out_BxMxPxZ.reshape(b * m, self.tokens_per_image, -1), self.cfg.patch_size, size, size
    )
    return out.reshape(b, m, size, size, self.out_channels).astype(jnp.float32)

  def logits(self, h_BxLxE):
    return dense(h_BxLxE, self.lm_head[...], out_dtype=jnp.float32)

  # ------------------------------------------------------------ training
  def hidden(self, row, latents_BxMxhxwxC=None, t_BxM=None, read_images=None):
    """(final hidden states [B, L, E], diffusion output [B, M, h, w, 2C]
    float32) of packed rows and the images they read (`read_images` [B, R,
    ...], for rows with read slots): the training loss applies the LM head
    itself, to the tokens that carry cross-entropy only. Rows without
    generated image slots (M = 0) may leave out the latents and get None as
    the diffusion output."""
    if latents_BxMxhxwxC is None:
      if row.image_columns.shape[1]:
        raise ValueError(
          f"rows with {row.image_columns.shape[1]} image slots need their latents and timesteps"
        )
      x_BxLxE = self._place_read(self.embed_text(row.tokens), row, read_images)
      return self.decoder(x_BxLxE, row.positions, row.segment_ids, row.image_ids), None
    x_BxLxE, t_emb_BxMxE = self.embed(row, latents_BxMxhxwxC, t_BxM, read_images)
    h_BxLxE = self.decoder(x_BxLxE, row.positions, row.segment_ids, row.image_ids)
    return h_BxLxE, self.diffusion_head(_take(h_BxLxE, row.image_columns), t_emb_BxMxE)

  def __call__(self, row, latents_BxMxhxwxC=None, t_BxM=None, read_images=None):
    """(logits [B, L, V] float32 of every token, diffusion output): `hidden`
    with the LM head applied everywhere."""
    h_BxLxE, out = self.hidden(row, latents_BxMxhxwxC, t_BxM, read_images)
    return self.logits(h_BxLxE), out

  # ------------------------------------------------------------ sampling
  # A row of L tokens is cached whole ([N, B, L, K, D] keys and values); the
  # ids [B, L] always describe the whole row, and a call's tokens are the
  # row's columns offset .. offset + Lq - 1 (see llama.Decoder).
  def init_cache(self, batch: int, length: int) -> KVCache:
    return KVCache.zeros(self.cfg, batch, length, self.dtype)

  def prefill(
    self,
    tokens_BxLp,
    positions_BxLp,
    segment_ids_BxL,
    image_ids_BxL,
    cache,
    read_row=None,
    read_images=None,
  ):
    """(logits [B, V] after the prompt's last token, the cache holding the
    prompt's keys and values): the prompt is the row's first Lp columns; the
    images it reads are `read_images` at `read_row`'s read columns (a Row)."""
    x_BxLpxE = self.embed_text(tokens_BxLp)
    if read_row is not None:
      x_BxLpxE = self._place_read(x_BxLpxE, read_row, read_images)
    h_BxLpxE, cache = self.decoder(
      x_BxLpxE, positions_BxLp, segment_ids_BxL, image_ids_BxL, cache=cache, offset=0
    )
    return self.logits(h_BxLpxE[:, -1:])[:, 0], cache

  def extend_text(self, tokens_BxLq, positions_BxLq, segment_ids_BxL, image_ids_BxL, cache, offset):
    """(logits [B, Lq, V], the cache with these tokens written) for text tokens
    at columns offset .. offset + Lq - 1."""
    h_BxLqxE, cache = self.decoder(
      self.embed_text(tokens_BxLq),
      positions_BxLq,
      segment_ids_BxL,
      image_ids_BxL,
      cache=cache,
      offset=offset,
    )
    return self.logits(h_BxLqxE), cache

  def extend_image(
    self, latents_BxhxwxC, t_B, positions_BxP, segment_ids_BxL, image_ids_BxL, cache, offset
  ):
    """(diffusion output [B, h, w, 2C] float32, the cache with the image
    written) for one noised image per row whose P tokens are columns offset ..
    offset + P - 1 (with `add_before_image_tokens`, its timestep token at
    `offset` and the P tokens after it), against what the cache holds before."""
    img_Bx1xPxE, t_emb_Bx1xE = self.image_tokens(latents_BxhxwxC[:, None], t_B[:, None])
    x_BxPxE = img_Bx1xPxE[:, 0]
    if self.cond_token:
      x_BxPxE = jnp.concatenate([self.timestep_tokens(t_emb_Bx1xE), x_BxPxE], axis=1)
    h_BxPxE, cache = self.decoder(
      x_BxPxE, positions_BxP, segment_ids_BxL, image_ids_BxL, cache=cache, offset=offset
    )
    h_BxPxE = h_BxPxE[:, int(self.cond_token) :]
    return self.diffusion_head(h_BxPxE[:, None], t_emb_Bx1xE)[:, 0], cache
