"""Interleaved text and images from one prompt: the model decides when to draw.

One call writes text with the KV cache, as text/generate.py does, until a row
emits `<|im_start|>`. The batch then switches to diffusion for that image:
  * the whole context so far (prompt, text, earlier images) is the cached
    prompt; each denoising step runs only the image's tokens against it;
  * guidance, when asked for, runs against the null context `<s> <|im_start|>`
    (the prompt dropped, as training drops it), placed at the same columns;
  * DDPM or DDIM over the respaced schedule, the `add_before_image_tokens`
    timestep token before the image where the model has one.
The finished image is written back into the cache as a CLEAN image: its tokens
at t = 0, one bidirectional block like every generated image (its own
`image_ids`), its timestep token that of t = 0. `<|im_end|>` follows, and the
row writes text again, until a stop token or the end of the row.

Columns. Rows advance in lockstep so that one cache offset serves the whole
batch (see generate.py). When some rows draw, every row spends the image's
columns (timestep token, P image tokens, `<|im_end|>`): a row that is not
drawing holds padding there (segment 0, which no token attends to), its
pending token moves past them and its positions do not advance, so its text
is exactly what it would be alone. A row that asks for an image waits the
same way (its `<|im_start|>` moves along, padding behind it) while the others
write, for up to the columns an image takes (`max_wait`), so that rows asking
a few columns apart draw in one pass of the denoising steps (each pass runs
every row of the batch, drawing or not: one pass for all is the cost of one
image; the digits' 20 interleaved answers draw their 40 images in 3 passes,
not 11). The cost is budget: `max_new_tokens` counts the columns after the
prompt; an image drawn by one row takes its columns from every row's budget,
a wait from the waiting row's. A row that asks for an image with too few
columns left stops there (`stop="budget"`).

Randomness is per row: row b draws its j-th text token from
fold_in(fold_in(key, b), j) and the noise of its k-th image from
fold_in(fold_in(image key, b), k), so a row's output depends on the seed and
its index, not on when the other rows of its batch draw.

The text loop is one compiled `lax.while_loop` that returns to the host only
when rows are ready to draw, or all rows are done; each image is one compiled
program per denoising step plus two that write the context and the clean image
into the cache. The compiled programs depend on shapes and settings only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.diffusion.sample_images import SamplerSettings, guidance_scales, guided_step
from monoformer_jax.errors import ConfigError
from monoformer_jax.layout import (
  Example,
  PromptLayout,
  Row,
  RowSpec,
  check_trained_length,
  prompt_lengths,
  prompt_rows,
)
from monoformer_jax.model.build import compiled
from monoformer_jax.model.llama import KVCache
from monoformer_jax.text.generate import _check_sampling, sample_token


@dataclasses.dataclass
class Interleaved:
  """One row's output: `ids` the new tokens in the reference's format (each
  image as `<|im_start|> <image> <|im_end|>`, the stop token last if one
  ended the row), `images` x_0 [h, w, C] in the model's space, one per
  `<image>`, and why the row stopped: "stop" (a stop token), "budget" (the
  row is full; a pending `<|im_start|>` without room for its image is dropped)."""

  ids: list[int]
  images: list[np.ndarray]
  stop: str


class TokenIds(NamedTuple):
  """The special tokens the sampler writes or watches for."""

  bos: int
  pad: int
  image: int
  im_start: int
  im_end: int
  stops: tuple[int, ...]

  @classmethod
  def of(cls, tokenizer, stop_ids: Sequence[int] | None = None) -> TokenIds:
    stops = (tokenizer.eos_id,) if stop_ids is None else tuple(int(s) for s in stop_ids)
    return cls(
      tokenizer.bos_id,
      tokenizer.pad_id,
      tokenizer.image_id,
      tokenizer.im_start_id,
      tokenizer.im_end_id,
      tuple(sorted(set(stops))),
    )


class _TextSettings(NamedTuple):
  ids: TokenIds
  temperature: float
  top_k: int
  top_p: float
  max_positions: int  # 0: no limit


class _State(NamedTuple):
  """The rows as far as they are written: per-token arrays [B, L] and per row [B]."""

  tokens: Any
  segment_ids: Any
  image_ids: Any
  positions: Any
  done: Any  # bool: met a stop token, or stopped for budget
  n_text: Any  # int32: text tokens drawn (the index of the next one's key)


def image_columns_needed(model) -> int:
  """Columns one image takes after its `<|im_start|>`: its timestep token
  (add_before_image_tokens), its P tokens and `<|im_end|>`."""
  return int(model.cond_token) + model.tokens_per_image + 1


def interleaved_budget(
  lengths, max_new_tokens: int | None, max_positions: int | None, need: int, budget="max_new_tokens"
) -> int:
  """The columns after the prompts: `max_new_tokens`, checked, and at most as
  many as the rows can write (None: that many). Prompt i takes `lengths[i]`
  positions and an image `need` + 1 columns (`image_columns_needed` and its
  <|im_start|>). With `max_positions` (the trained data.seq_len) each prompt
  must leave room for one image (layout.check_trained_length), and since
  every column advances some row's positions by one (a text token, or a
  drawing row's image), rows that stop at max_positions write at most
  sum(max_positions - lengths) columns: a larger budget only makes the rows
  longer, never an answer, so it is cut to that (the same answers, a shorter
  cache). `budget` names the argument in messages ('--max_new_tokens' for the CLI)."""
  if max_positions:
    check_trained_length(lengths, need + 1, max_positions, new_what="an image takes")
    usable = sum(max_positions - n for n in lengths)
    max_new_tokens = usable if max_new_tokens is None else min(max_new_tokens, usable)
  elif max_new_tokens is None:
    raise ConfigError(f"{budget}=None needs max_positions (data.seq_len) to count the columns")
  if max_new_tokens < need + 1:
    raise ConfigError(
      f"{budget}={max_new_tokens} leaves no room for one image: an image takes "
      f"<|im_start|> and {need} columns (a timestep token where the model has one, "
      f"its tokens, <|im_end|>); raise {budget} to at least {need + 1}"
    )
  return int(max_new_tokens)


def generate_interleaved(
  model,
  prompts: Sequence[Sequence[int] | Example],
  *,
  ids: TokenIds,
  max_new_tokens: int | None,
  diffusion,
  key=None,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  cfg_scale: float | None = None,
  guided_channels: int | None = None,
  sampler: str | None = None,
  eta: float = 0.0,
  spec: RowSpec | None = None,
  max_positions: int | None = None,
  max_wait: int | None = None,
  progress: Callable[[str], Any] | None = None,
) -> list[Interleaved]:
  """Text and images for each prompt (token ids, or an `Example` that reads
  images, laid out by `spec`), in order; see the module docstring.

  `max_new_tokens`: columns after the prompt (text tokens and image columns;
  at most, and for None, as many as the rows can write: `interleaved_budget`); `diffusion`:
  the process each image runs (`diffusion.from_config`'s, respaced; `sampler`
  one of its SAMPLERS, None its default); `cfg_scale`: guidance
  against the null context (None: none); `max_positions`: the longest row the
  model was trained on (data.seq_len): each prompt must leave room for an
  image, and a row stops (`stop="budget"`) before its positions pass it. `max_wait`: the columns a
  row that asks for an image waits for others to ask too (None: the columns
  an image takes; 0: every row draws as soon as it asks). `progress(message)`
  is called when a pass of images starts and ends.
  """
  _check_sampling(temperature, top_k, top_p)
  need = image_columns_needed(model)
  max_wait = need if max_wait is None else int(max_wait)
  if max_wait < 0:
    raise ConfigError(f"max_wait={max_wait}: give the columns a row may wait (>= 0), or None")
  lengths = prompt_lengths(prompts, spec)
  max_new_tokens = interleaved_budget(lengths, max_new_tokens, max_positions, need)
  rows = prompt_rows(prompts, pad_id=ids.pad, new_tokens=max_new_tokens, spec=spec)
  layout = rows.layout
  scales = guidance_scales(cfg_scale)
  if len(scales) > 1:
    raise ConfigError(
      f"cfg_scale={cfg_scale}: interleaved images guide against one null context; give one scale"
    )
  key = jax.random.PRNGKey(0) if key is None else key
  text_key, image_key = jax.random.split(key)
  b, length = rows.row.tokens.shape
  row_keys = lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(b))
  text_keys, image_keys = row_keys(text_key), row_keys(image_key)
  text = _TextSettings(ids, float(temperature), int(top_k), float(top_p), int(max_positions or 0))
  sampler = sampler or diffusion.SAMPLERS[0]
  if sampler not in diffusion.SAMPLERS:
    raise ConfigError(f"sampler={sampler!r}: this model samples with one of {diffusion.SAMPLERS}")
  image = SamplerSettings(diffusion, None, len(scales) + 1, guided_channels, sampler, float(eta))
  scale = jnp.asarray(scales, jnp.float32)

  # The new columns start empty: padding, segment 0, until a row writes them.
  lp = layout.prompt_len
  state = _State(
    *(
      np.array(x)
      for x in (rows.row.tokens, rows.row.segment_ids, rows.row.image_ids, rows.row.positions)
    ),
    done=np.zeros(b, bool),
    n_text=np.zeros(b, np.int32),
  )
  state.tokens[:, lp:] = ids.pad
  state.segment_ids[:, lp:] = 0
  state.positions[:, lp:] = 0
  read = None if rows.read_images is None else jnp.asarray(rows.read_images)
  prompt_row = Row(*(None if x is None else jnp.asarray(x) for x in rows.row))
  state, cache = _start(model, (text, layout), prompt_row, _to_device(state), text_keys, read)
  state = _to_host(state)
  col = lp
  images: list[list[np.ndarray]] = [[] for _ in range(b)]
  opened: list[list[int]] = [[] for _ in range(b)]  # each image's <|im_start|> column
  while True:
    state, cache, col = _write_text(
      model, (text, max_wait), _to_device(state), cache, jnp.int32(col), text_keys
    )
    state, col = _to_host(state), int(col)
    drawing = ~state.done & (state.tokens[:, col] == ids.im_start)
    if not drawing.any():
      break
    no_room = drawing & (col + need > length - 1)
    if max_positions:  # nor under the positions the model was trained on
      no_room |= drawing & (state.positions[:, col] + need > max_positions - 1)
    if no_room.any():  # no room for the image: those rows end here
      state.done[no_room] = True
      state.tokens[no_room, col] = ids.pad
      state.segment_ids[no_room, col] = 0
      continue
    if progress is not None:
      progress(f"drawing {int(drawing.sum())} image(s) at column {col}")
    state = _open_image(
      state, drawing, col, need, model, ids, n_images=np.array([len(x) for x in images])
    )
    cache = _feed(model, None, _to_device(state), cache, jnp.int32(col))
    n_images = jnp.asarray([len(x) for x in images], jnp.int32)
    keys = jax.vmap(jax.random.fold_in)(image_keys, n_images)
    x0 = _draw(model, image, _to_device(state), cache, jnp.int32(col), keys, scale, ids, progress)
    cache = _feed_image(model, None, _to_device(state), cache, x0, jnp.int32(col))
    x0 = np.asarray(x0)
    for r in np.flatnonzero(drawing):
      images[r].append(x0[r])
      opened[r].append(col)
    col += need
    if progress is not None:
      progress(f"drew {int(drawing.sum())} image(s)")
  out = []
  for r in range(b):
    written = state.segment_ids[r] > 0
    for c in opened[r]:  # an image's columns become ONE <image>, as the reference writes it
      written[c + 2 : c + need] = False
    new = state.tokens[r, lp:][written[lp:]].tolist()
    stop = "stop" if new and new[-1] in ids.stops else "budget"
    out.append(Interleaved(new, images[r], stop))
  return out


def _to_device(state: _State) -> _State:
  return _State(*(jnp.asarray(x) for x in state))


def _to_host(state: _State) -> _State:
  return _State(*(np.array(x) for x in state))


def _pick(text: _TextSettings, logits_BxV, keys, n_text_B):
  """Each row's next token from its own key (fold_in(row key, n_text))."""

  def one(logits_V, key, j):
    return sample_token(
      logits_V[None],
      jax.random.fold_in(key, j),
      temperature=text.temperature,
      top_k=text.top_k,
      top_p=text.top_p,
    )[0]

  return jax.vmap(one)(logits_BxV, keys, n_text_B)


def _write_token(text: _TextSettings, state: _State, logits_BxV, keys, col, hold=None):
  """The state with each live row's next token drawn and written at `col`;
  the rows in `hold` [B] (waiting to draw: their pending token, at `col - 1`,
  is `<|im_start|>`) move that token to `col` instead and pad its old column,
  so their positions and their text do not advance."""
  live = ~state.done
  writes = live if hold is None else live & ~hold
  tok = jnp.where(writes, _pick(text, logits_BxV, keys, state.n_text), text.ids.pad)
  at = lambda x: jax.lax.dynamic_slice_in_dim(x, col - 1, 1, axis=1)[:, 0]
  prev_pos = at(state.positions)
  position = jnp.where(writes, prev_pos + 1, 0)
  segment = writes
  tokens, segment_ids, positions = state.tokens, state.segment_ids, state.positions
  if hold is not None:
    tok = jnp.where(hold, at(tokens), tok)
    position = jnp.where(hold, prev_pos, position)
    segment = writes | hold
    put_prev = lambda x, v: jax.lax.dynamic_update_slice_in_dim(
      x, jnp.where(hold, v, at(x)).astype(x.dtype)[:, None], col - 1, axis=1
    )
    tokens = put_prev(tokens, jnp.full_like(tok, text.ids.pad))
    zeros = jnp.zeros_like(tok)
    segment_ids, positions = put_prev(segment_ids, zeros), put_prev(positions, zeros)
  put = lambda x, v: jax.lax.dynamic_update_slice_in_dim(x, v[:, None].astype(x.dtype), col, axis=1)
  stops = jnp.asarray(text.ids.stops or (-1,), jnp.int32)
  done = state.done | (writes & jnp.isin(tok, stops))
  if text.max_positions:  # the last position the model was trained on
    done = done | (writes & (prev_pos + 2 >= text.max_positions))
  return _State(
    tokens=put(tokens, tok),
    segment_ids=put(segment_ids, segment.astype(jnp.int32)),
    image_ids=state.image_ids,
    positions=put(positions, position),
    done=done,
    n_text=state.n_text + writes.astype(jnp.int32),
  )


@compiled
def _start(
  model, settings: tuple[_TextSettings, PromptLayout], row: Row, state: _State, keys, read_images
):
  """The prompt prefilled into a new cache and each row's first token written."""
  text, layout = settings
  logits, cache = model.prefill(
    layout.prompt(row.tokens),
    layout.prompt(row.positions),
    row.segment_ids,
    row.image_ids,
    model.init_cache(*row.tokens.shape),
    row,
    read_images,
  )
  return _write_token(text, state, logits, keys, layout.prompt_len), cache


@compiled
def _write_text(model, settings: tuple[_TextSettings, int], state: _State, cache, col, keys):
  """Text until the rows are ready to draw, every row is done or the row is
  full; returns (state, cache, the column of the last token written, not yet fed).

  A row whose last token is `<|im_start|>` waits (`_write_token`'s `hold`)
  while the others write, so that rows asking for images a few columns apart
  draw them together: the loop stops when no live row writes, when the first
  of the waiting rows has waited `max_wait` columns, or before waiting longer
  would leave no room for the image."""
  text, max_wait = settings
  length = state.tokens.shape[1]
  need = image_columns_needed(model)
  at = lambda x, c: jax.lax.dynamic_slice_in_dim(x, c, 1, axis=1)

  def waiting(state, col):
    return ~state.done & (at(state.tokens, col)[:, 0] == text.ids.im_start)

  def going(carry):
    state, _, col, waited = carry
    wait = waiting(state, col)
    draw_now = wait.any() & ((waited >= max_wait) | (col + 1 + need > length - 1))
    return (col < length - 1) & (~state.done & ~wait).any() & ~draw_now

  def step(carry):
    state, cache, col, waited = carry
    wait = waiting(state, col)
    logits, cache = model.extend_text(
      at(state.tokens, col),
      at(state.positions, col),
      state.segment_ids,
      state.image_ids,
      cache,
      col,
    )
    state = _write_token(text, state, logits[:, 0], keys, col + 1, hold=wait)
    return state, cache, col + 1, jnp.where(wait.any(), waited + 1, 0)

  state, cache, col, _ = jax.lax.while_loop(going, step, (state, cache, col, jnp.int32(0)))
  return state, cache, col


def _open_image(
  state: _State, drawing, col: int, need: int, model, ids: TokenIds, n_images
) -> _State:
  """The rows laid out for an image after column `col` (host arrays): the
  drawing rows get its timestep token, P image tokens (their next image id) and
  `<|im_end|>`; the other live rows move their pending token past the image's
  columns and pad the rest; done rows stay padding."""
  s = _State(*(np.array(x) for x in state))
  cond = int(model.cond_token)
  span = np.arange(col + 1, col + need + 1)
  for r in np.flatnonzero(drawing):
    p = s.positions[r, col]
    s.tokens[r, span] = ids.image
    s.tokens[r, col + need] = ids.im_end
    s.segment_ids[r, span] = 1
    s.positions[r, span] = p + 1 + np.arange(need)
    s.image_ids[r, col + 1 + cond : col + need] = n_images[r] + 1
  for r in np.flatnonzero(~drawing & ~s.done):
    tok, p = s.tokens[r, col], s.positions[r, col]
    s.tokens[r, col : col + need] = ids.pad
    s.segment_ids[r, col : col + need] = 0
    s.positions[r, col : col + need] = 0
    s.tokens[r, col + need], s.segment_ids[r, col + need] = tok, 1
    s.positions[r, col + need] = p
  return s


@compiled
def _feed(model, _, state: _State, cache, col):
  """The cache with column `col` (the drawing rows' `<|im_start|>`) written."""
  at = lambda x: jax.lax.dynamic_slice_in_dim(x, col, 1, axis=1)
  _, cache = model.extend_text(
    at(state.tokens), at(state.positions), state.segment_ids, state.image_ids, cache, col
  )
  return cache


def _image_span(model, col):
  """(first column, count) of the image's columns after `col`: the timestep
  token and the P tokens."""
  return col + 1, int(model.cond_token) + model.tokens_per_image


@compiled
def _guided_context(model, settings: tuple[TokenIds, int], state: _State, cache, col):
  """(positions [G*B, c+P], segment_ids, image_ids [G*B, L], cache of G*B rows)
  the denoising steps run against: the rows' own context, then (guidance)
  the null context `<s> <|im_start|>` ending at `col`, before the same image
  columns, in rows of their own."""
  ids, groups = settings
  first, n = _image_span(model, col)
  span = lambda x: jax.lax.dynamic_slice_in_dim(x, first, n, axis=1)
  positions, segment_ids, image_ids = span(state.positions), state.segment_ids, state.image_ids
  if groups == 1:
    return positions, segment_ids, image_ids, cache
  b, length = state.tokens.shape
  columns = jnp.arange(length)
  null_segment = ((columns >= col - 1) & (columns < first + n)).astype(jnp.int32)
  null_segment_BxL = jnp.broadcast_to(null_segment, (b, length))
  null_image_BxL = jnp.where(null_segment_BxL > 0, image_ids, 0)
  null_tokens = jnp.broadcast_to(jnp.asarray([ids.bos, ids.im_start], jnp.int32), (b, 2))
  null_positions = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), (b, 2))
  _, null_cache = model.extend_text(
    null_tokens,
    null_positions,
    null_segment_BxL,
    null_image_BxL,
    model.init_cache(b, length),
    col - 1,
  )
  null_image_positions = jnp.broadcast_to(2 + jnp.arange(n, dtype=jnp.int32), (b, n))
  both = lambda x, y: jnp.concatenate([x, y])
  return (
    both(positions, null_image_positions),
    both(segment_ids, null_segment_BxL),
    both(image_ids, null_image_BxL),
    KVCache(*(jnp.concatenate([c, z], axis=1) for c, z in zip(cache, null_cache))),
  )


def _draw(
  model, image: SamplerSettings, state: _State, cache, col, keys, scale, ids: TokenIds, progress
):
  """x_0 [B, h, w, C] of every row's image after column `col` (rows not
  drawing get one too, never used)."""
  context = _guided_context(model, (ids, image.groups), state, cache, col)
  cfg = model.cfg
  split = jax.vmap(jax.random.split)(keys)  # [B, 2] keys
  x_t = jax.vmap(
    lambda k: jax.random.normal(k, (cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
  )(split[:, 0])
  step = _denoise.bind(model)
  for i in range(image.diffusion.num_timesteps):
    x_t = step(image, context, x_t, jnp.int32(i), split[:, 1], scale, col)
  return x_t


@compiled
def _denoise(model, image: SamplerSettings, context, x_t, i, keys, scales, col):
  """x_{t-1} of step i of the images after `col`, guided over the context's groups."""
  positions, segment_ids, image_ids, cache = context
  first, _ = _image_span(model, col)
  run = lambda x, t: model.extend_image(x, t, positions, segment_ids, image_ids, cache, first)[0]
  return guided_step(run, image, x_t, i, keys, scales, row_keys=True)


@compiled
def _feed_image(model, _, state: _State, cache, x0, col):
  """The cache with the finished images written after `col` as clean images (t = 0)."""
  first, n = _image_span(model, col)
  positions = jax.lax.dynamic_slice_in_dim(state.positions, first, n, axis=1)
  t0 = jnp.zeros((x0.shape[0],), jnp.int32)
  _, cache = model.extend_image(x0, t0, positions, state.segment_ids, state.image_ids, cache, first)
  return cache
