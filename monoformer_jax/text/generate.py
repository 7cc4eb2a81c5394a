"""Text completion with a MonoFormer: one jitted loop, a KV cache, and samplers.

Prompts of different lengths share a batch through `layout.prompt_rows`: they
are left-padded so that all of them end at the same column, and new token i of
every row is written at the same column `layout.new_column(i)`. One offset
then serves the whole batch, which is what lets each step run ONE token per
row against the cache: the model prefills the prompt once
(`MonoFormer.prefill`), and each step runs the last token against the cache
(`MonoFormer.extend_text`), writing its keys and values at its column and
reading the next token's logits. `use_cache=False` recomputes the whole row at
every step instead (the reference's way, and the test oracle). The loop is a
`lax.while_loop` that stops when every row has met a stop token or
`max_new_tokens` are written.

Sampling: temperature 0 is greedy; otherwise logits / temperature, restricted
to the `top_k` most likely tokens and to the smallest set whose probability
reaches `top_p` (the reference's defaults for chat: 0.7, 50, 0.95).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.errors import ConfigError
from monoformer_jax.layout import Example, PromptLayout, Row, RowSpec, prompt_rows
from monoformer_jax.model.build import compiled


def _check_sampling(temperature: float, top_k: int, top_p: float):
  if temperature < 0:
    raise ConfigError(f"temperature={temperature} must be >= 0 (0 is greedy)")
  if top_k < 0:
    raise ConfigError(f"top_k={top_k} must be >= 0 (0 keeps every token)")
  if not 0 < top_p <= 1:
    raise ConfigError(f"top_p={top_p} must be in (0, 1] (1 keeps every token)")


def sample_token(logits_BxV, key, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
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


def generate(
  model,
  prompts: Sequence[Sequence[int] | Example],
  *,
  max_new_tokens: int,
  pad_id: int,
  stop_ids: Sequence[int],
  key=None,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  use_cache: bool = True,
  spec: RowSpec | None = None,
) -> list[list[int]]:
  """New token ids for each prompt, up to and including its first stop token.

  A prompt is token ids, or an `Example` that reads images (`spec`, the
  model's RowSpec, lays them out); the images are encoded once, with the
  prompt, into the cache. Step i draws from fold_in(key, i), so a seed
  reproduces a batch whatever the cache setting. `stop_ids` are the ids that
  end a row (e.g. eos). Calls with the same shapes and settings reuse one
  compiled program.
  """
  _check_sampling(temperature, top_k, top_p)
  if max_new_tokens < 1:
    raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
  key = jax.random.PRNGKey(0) if key is None else key
  rows = prompt_rows(prompts, pad_id=pad_id, new_tokens=max_new_tokens, spec=spec)
  stops = tuple(sorted(set(int(s) for s in stop_ids)))
  settings = _Settings(
    rows.layout, pad_id, stops, float(temperature), int(top_k), float(top_p), use_cache
  )
  row = Row(*(None if x is None else jnp.asarray(x) for x in rows.row))
  read = None if rows.read_images is None else jnp.asarray(rows.read_images)
  out = np.asarray(_run(model, settings, row, key, read))
  results = []
  for new in rows.layout.new(out).tolist():
    cut = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
    results.append(new[:cut])
  return results


class _Settings(NamedTuple):
  """What the compiled loop is specialised on (hashable: a static argument)."""

  layout: PromptLayout
  pad_id: int
  stops: tuple[int, ...]
  temperature: float
  top_k: int
  top_p: float
  use_cache: bool


@compiled
def _run(model, settings: _Settings, row: Row, key, read_images):
  """The rows' tokens [B, L] with every new token written."""
  layout = settings.layout
  stops = jnp.asarray(settings.stops or (-1,), jnp.int32)
  pick = lambda logits, i: sample_token(
    logits,
    jax.random.fold_in(key, i),
    temperature=settings.temperature,
    top_k=settings.top_k,
    top_p=settings.top_p,
  )
  at = lambda x, col: jax.lax.dynamic_slice_in_dim(x, col, 1, axis=1)

  def next_logits(tokens, cache, col):
    """Logits [B, V] after the token at column `col`, and the new cache."""
    if cache is None:
      logits, _ = model(row._replace(tokens=tokens), read_images=read_images)
      return at(logits, col)[:, 0], None
    logits, cache = model.extend_text(
      at(tokens, col), at(row.positions, col), row.segment_ids, row.image_ids, cache, col
    )
    return logits[:, 0], cache

  # The first new token comes from the prompt: prefilled once with the cache.
  tokens, cache = row.tokens, None
  if settings.use_cache:
    logits, cache = model.prefill(
      layout.prompt(tokens),
      layout.prompt(row.positions),
      row.segment_ids,
      row.image_ids,
      model.init_cache(*tokens.shape),
      row,
      read_images,
    )
  else:
    logits, _ = next_logits(tokens, None, layout.prompt_len - 1)
  first = pick(logits, 0)
  tokens = tokens.at[:, layout.new_column(0)].set(first)

  def unfinished(carry):
    _, _, i, done = carry
    return (i < layout.new_tokens) & ~done.all()

  def step(carry):
    tokens, cache, i, done = carry
    logits, cache = next_logits(tokens, cache, layout.new_column(i - 1))
    nxt = jnp.where(done, settings.pad_id, pick(logits, i)).astype(jnp.int32)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], layout.new_column(i), axis=1)
    return tokens, cache, i + 1, done | jnp.isin(nxt, stops)

  carry = (tokens, cache, jnp.int32(1), jnp.isin(first, stops))
  return jax.lax.while_loop(unfinished, step, carry)[0]
