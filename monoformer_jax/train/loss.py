"""MonoFormer's training loss on a packed batch.

    loss = w_diff * mean over real images of (eps MSE + L_vb)   (iddpm)
                             or (weighted velocity MSE)   (flow)
         + w_lm   * sum(text_weights * CE) / sum(text_weights)

Which tokens carry cross-entropy (`text_weights`) and which image slots are
real (`image_valid`; read images sit in slots of their own and get no
diffusion loss) is decided by the data module: by default CE only on
text-only examples (the reference), with `loss.text_on_image_examples` also
on the prompts/captions (Transfusion). A batch with no image (or no weighted
text token) contributes 0 to that term.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from monoformer_jax.layout import Row
from monoformer_jax.parallel import sharding


def cross_entropy(logits_BxLxV, targets_BxL, weights_BxL):
  """Weighted mean token cross-entropy (float32) and the weight total."""
  nll_BxL = optax.softmax_cross_entropy_with_integer_labels(
    logits_BxLxV.astype(jnp.float32), targets_BxL
  )
  total = weights_BxL.sum()
  return (nll_BxL * weights_BxL).sum() / jnp.maximum(total, 1.0), total


# The token budgets of `head_cross_entropy`, as fractions of a shard's tokens.
HEAD_CAPACITIES = (0.0, 0.125, 0.25, 0.5, 1.0)


def head_cross_entropy(h_BxLxE, logits_of, targets_BxL, weights_BxL):
  """`cross_entropy` of the logits `logits_of(h)` (the model's LM head), with
  the head applied only to the tokens that carry cross-entropy (weight != 0):
  the same loss and gradients as computing every token's logits, without the
  head's work on the rest (at the paper's layout no token of an image row
  carries any).

  The tokens of each batch shard are ordered CE tokens first (a stable
  argsort, local to the shard), and the head runs on the first C of them,
  where C is the smallest of HEAD_CAPACITIES (times the shard's tokens) that
  holds every shard's count: a `lax.switch`, so only that branch runs, in the
  backward too. A batch without CE tokens computes no logits at all.
  """
  b, length, e = h_BxLxE.shape
  shards = sharding.batch_shards(b)
  t = b // shards * length  # tokens per shard
  h_SxTxE = h_BxLxE.reshape(shards, t, e)
  targets_SxT = targets_BxL.reshape(shards, t)
  weights_SxT = weights_BxL.reshape(shards, t).astype(jnp.float32)
  carries_SxT = weights_SxT != 0
  order_SxT = jnp.argsort(~carries_SxT, axis=1, stable=True)
  capacities = sorted({math.ceil(f * t) for f in HEAD_CAPACITIES} | {t})

  def branch(capacity):
    def mean_nll(operands):
      # Every CE token is among the first `capacity`: their mean is the batch's.
      h, targets, weights, order = operands
      if capacity == 0:
        return jnp.zeros((), jnp.float32)
      first = order[:, :capacity]
      h_SxCxE = jnp.take_along_axis(h, first[..., None], axis=1)
      take = lambda x: jnp.take_along_axis(x, first, axis=1)
      return cross_entropy(logits_of(h_SxCxE), take(targets), take(weights))[0]

    return mean_nll

  needed = carries_SxT.sum(axis=1).max()
  index = sum((needed > c).astype(jnp.int32) for c in capacities[:-1])
  lm = jax.lax.switch(
    index, [branch(c) for c in capacities], (h_SxTxE, targets_SxT, weights_SxT, order_SxT)
  )
  return lm, weights_SxT.sum()


def loss_terms(model, batch, t_BxM, noise_BxMxhxwxC, diffusion):
  """Per-term losses for given timesteps and noise: the deterministic core.

  Returns a dict: lm (mean CE), diff (mean over real images), and per-image
  mse/vb/loss [B, M] with `image_valid` [B, M], for tests and logging.
  """
  latents = batch["latents"]
  b, m = latents.shape[:2]
  flat = lambda x: x.reshape(b * m, *x.shape[2:])
  x_t = diffusion.q_sample(flat(latents), t_BxM.reshape(-1), flat(noise_BxMxhxwxC))
  x_t = x_t.reshape(latents.shape)
  t_model_BxM = diffusion.model_timesteps(t_BxM)  # iddpm: the indices; flow: t * scale
  h_BxLxE, out_BxMxhxwx2C = model.hidden(Row.of(batch), x_t, t_model_BxM, batch.get("read_images"))
  terms = diffusion.training_losses(
    flat(out_BxMxhxwx2C), flat(latents), flat(x_t), t_BxM.reshape(-1), flat(noise_BxMxhxwxC)
  )
  terms = {k: v.reshape(b, m) for k, v in terms.items()}
  valid_BxM = batch["image_valid"]
  n_images = valid_BxM.sum()
  diff = jnp.where(valid_BxM, terms["loss"], 0.0).sum() / jnp.maximum(n_images, 1)
  lm, n_text = head_cross_entropy(h_BxLxE, model.logits, batch["targets"], batch["text_weights"])
  return dict(
    lm=lm, diff=diff, n_images=n_images, n_text_tokens=n_text, image_valid=valid_BxM, **terms
  )


def total_loss(model, batch, key, diffusion, loss_cfg):
  """Scalar loss and metrics; the process's training times (iddpm: uniform
  over 0..T-1; flow: its time distribution), Gaussian noise."""
  latents = batch["latents"]
  key_t, key_n = jax.random.split(key)
  t_BxM = diffusion.draw_timesteps(key_t, latents.shape[:2])
  noise = jax.random.normal(key_n, latents.shape, jnp.float32)
  terms = loss_terms(model, batch, t_BxM, noise, diffusion)
  loss = loss_cfg.w_diff * terms["diff"] + loss_cfg.w_lm * terms["lm"]
  valid = terms["image_valid"]
  n = jnp.maximum(terms["n_images"], 1)
  metrics = dict(
    loss=loss,
    lm=terms["lm"],
    diff=terms["diff"],
    mse=jnp.where(valid, terms["mse"], 0).sum() / n,
    vb=jnp.where(valid, terms["vb"], 0).sum() / n,
    images=terms["n_images"],
    text_tokens=terms["n_text_tokens"],
  )
  return loss, metrics
