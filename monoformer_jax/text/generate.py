"""Text completion with a MonoFormer, as one jitted loop over new tokens.

Prompts of different lengths share a batch: each row keeps its own write
position. This version recomputes the row for every new token (no KV cache),
which is plenty for short completions on small models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int,
             pad_id: int, key, temperature: float = 0.0) -> list[list[int]]:
  """New token ids for each prompt (stopping after eos); greedy at temperature 0."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (e.g. bos)")
  n = len(prompts)
  length = max(len(p) for p in prompts) + max_new_tokens
  length = -(-length // 8) * 8
  tokens = np.full((n, length), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = np.array([len(p) for p in prompts], np.int32)
  cfg = model.cfg
  latents = jnp.zeros((n, 1, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, tokens, lengths, key):
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
    image_ids = jnp.zeros((n, length), jnp.int32)
    t = jnp.zeros((n, 1), jnp.int32)

    def body(i, carry):
      model = nnx.merge(graphdef, state)  # inside the loop: NNX won't cross traces
      tokens, cur, done = carry
      segment_ids = (positions < cur[:, None]).astype(jnp.int32)
      x, _ = model.embed(tokens, image_ids, latents, t)
      h = model.decoder(x, positions, segment_ids, image_ids)
      h_last = jnp.take_along_axis(h, (cur - 1)[:, None, None], axis=1)
      logits = model.logits(h_last)[:, 0]
      if temperature > 0:
        nxt = jax.random.categorical(jax.random.fold_in(key, i), logits / temperature)
      else:
        nxt = jnp.argmax(logits, axis=-1)
      nxt = jnp.where(done, pad_id, nxt).astype(jnp.int32)
      tokens = tokens.at[jnp.arange(n), cur].set(nxt)
      return tokens, cur + 1, done | (nxt == eos_id)

    tokens, _, _ = jax.lax.fori_loop(
        0, max_new_tokens, body, (tokens, lengths, jnp.zeros((n,), bool)))
    return tokens

  out = np.asarray(run(state, tokens, lengths, key))
  results = []
  for i, p in enumerate(prompts):
    new = out[i, len(p):len(p) + max_new_tokens].tolist()
    if eos_id in new:
      new = new[:new.index(eos_id) + 1]
    results.append(new)
  return results
