"""Text completion with a MonoFormer: one jitted loop, a KV cache, and samplers.

Prompts of different lengths share a batch through `data.prompt_rows`: they
are left-padded so that all of them end at column Lp - 1, and new token i of
every row is written at column Lp + i. One offset then serves the whole batch,
which is what lets each step run ONE token per row against the cache: the
prompt is prefilled once, and each step embeds the last token, writes its keys
and values at its column and reads the next token's logits. `use_cache=False`
recomputes the whole row at every step instead (the reference's way, and the
test oracle). The loop is a `lax.while_loop` that stops when every row has met
a stop token or `max_new_tokens` are written.

Sampling: temperature 0 is greedy; otherwise logits / temperature, restricted
to the `top_k` most likely tokens and to the smallest set whose probability
reaches `top_p` (the reference's defaults for chat: 0.7, 50, 0.95).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from monoformer_jax.data.packing import prompt_rows
from monoformer_jax.model.llama import KVCache


def _check_sampling(temperature: float, top_k: int, top_p: float):
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
  if top_k < 0:
    raise ValueError(f"top_k={top_k} must be >= 0 (0 keeps every token)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1] (1 keeps every token)")


def sample_token(logits_BxV, key, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0):
  """Next token ids [B] from logits [B, V]: greedy at temperature 0."""
  _check_sampling(temperature, top_k, top_p)
  if temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / temperature
  masked = jnp.finfo(jnp.float32).min
  if 0 < top_k < logits.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_Bx1, masked, logits)
  if top_p < 1:
    sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep a token while the tokens more likely than it hold < top_p in total.
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(before < top_p, sorted_BxV, jnp.inf)
    logits = jnp.where(logits < kept.min(axis=-1, keepdims=True), masked, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_id: int,
             stop_ids: Sequence[int], key=None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, use_cache: bool = True) -> list[list[int]]:
  """New token ids for each prompt, up to and including its first stop token.

  Step i draws from fold_in(key, i), so a seed reproduces a batch whatever
  the cache setting. `stop_ids` are the ids that end a row (e.g. eos). Calls
  with the same shapes and settings reuse one compiled program.
  """
  _check_sampling(temperature, top_k, top_p)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  key = jax.random.PRNGKey(0) if key is None else key
  rows = prompt_rows(prompts, pad_id=pad_id, new_tokens=max_new_tokens)
  stops = tuple(sorted(set(int(s) for s in stop_ids)))
  graphdef, state = nnx.split(model)
  settings = _Settings(graphdef, rows["prompt_len"], max_new_tokens, pad_id, stops,
                       float(temperature), int(top_k), float(top_p), use_cache)
  out = np.asarray(_run(settings, state, *(jnp.asarray(rows[k]) for k in
                                          ("tokens", "segment_ids", "positions")), key))
  results = []
  for row in out[:, settings.prompt_len:].tolist():
    cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
    results.append(row[:cut])
  return results


class _Settings(NamedTuple):
  """What the compiled loop is specialised on (hashable: a static argument)."""
  graphdef: Any
  prompt_len: int
  max_new_tokens: int
  pad_id: int
  stops: tuple[int, ...]
  temperature: float
  top_k: int
  top_p: float
  use_cache: bool


@functools.partial(jax.jit, static_argnums=0)
def _run(settings: _Settings, state, tokens, seg, pos, key):
  lp, graphdef = settings.prompt_len, settings.graphdef
  img = jnp.zeros_like(seg)   # a text row holds no image
  stops = jnp.asarray(settings.stops or (-1,), jnp.int32)
  pick = lambda logits, i: sample_token(
      logits, jax.random.fold_in(key, i), temperature=settings.temperature,
      top_k=settings.top_k, top_p=settings.top_p)

  def last_logits(model, tokens, cache, col):
    """Logits [B, V] after the token at column `col`, and the new cache."""
    if cache is None:
      h = model.decoder(model.embed_text(tokens), pos, seg, img)
      return model.logits(jax.lax.dynamic_slice_in_dim(h, col, 1, axis=1))[:, 0], None
    x = model.embed_text(jax.lax.dynamic_slice_in_dim(tokens, col, 1, axis=1))
    h, cache = model.decoder(x, jax.lax.dynamic_slice_in_dim(pos, col, 1, axis=1),
                             seg, img, cache=cache, offset=col)
    return model.logits(h)[:, 0], cache

  # Prefill: the whole prompt once (its cache), the first new token from it.
  model = nnx.merge(graphdef, state)
  cache = None
  if settings.use_cache:
    cache = KVCache.zeros(model.cfg, *tokens.shape, model.dtype)
    h, cache = model.decoder(model.embed_text(tokens[:, :lp]), pos[:, :lp], seg, img,
                             cache=cache, offset=0)
    logits = model.logits(h[:, -1:])[:, 0]
  else:
    logits, _ = last_logits(model, tokens, None, lp - 1)
  first = pick(logits, 0)
  tokens = tokens.at[:, lp].set(first)

  def unfinished(carry):
    _, _, i, done = carry
    return (i < settings.max_new_tokens) & ~done.all()

  def step(carry):
    tokens, cache, i, done = carry
    model = nnx.merge(graphdef, state)  # inside the loop: NNX won't cross traces
    logits, cache = last_logits(model, tokens, cache, lp + i - 1)
    nxt = jnp.where(done, settings.pad_id, pick(logits, i)).astype(jnp.int32)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], lp + i, axis=1)
    return tokens, cache, i + 1, done | jnp.isin(nxt, stops)

  carry = (tokens, cache, jnp.int32(1), jnp.isin(first, stops))
  return jax.lax.while_loop(unfinished, step, carry)[0]
