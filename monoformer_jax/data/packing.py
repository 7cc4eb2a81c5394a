"""Packing: WHICH examples share a row (how each is laid out: monoformer_jax/layout.py).

Two algorithms over a stream of `Example`s, both keeping stream order and
dropping nothing: `pack_examples` fills each row until the next example does
not fit it (next-fit), for a fixed list of examples; `PackedBatches`, the
training stream, puts each example in the first row of its batch with room
for it (first-fit), which leaves 8% of the digits' columns padding where
next-fit leaves 20%. An example fits a row when its expanded length fits the
columns left and its generated and read images the image slots left;
`layout.pieces_of` raises for one that no empty row holds, and cuts a long
text into pieces first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from monoformer_jax.errors import ConfigError
from monoformer_jax.layout import Example, Rows, RowSpec, expanded_length, pieces_of


def _next_fit(pieces: Sequence[Example], spec: RowSpec) -> list[int]:
  """Row index of each piece, from row 0: a row is closed when the next piece
  does not fit it (its tokens or its images), and pieces are never reordered."""
  plan, row, used, images = [], 0, 0, (0, 0)
  for piece in pieces:
    n = expanded_length(piece, spec)
    if used + n > spec.seq_len or not _images_fit(images, piece, spec):
      row, used, images = row + 1, 0, (0, 0)
    plan.append(row)
    used, images = used + n, _images_after(images, piece)
  return plan


def _first_fit(pieces: Sequence[Example], spec: RowSpec, rows: Rows) -> list[int] | None:
  """Row index of each piece: the first of `rows` with room for its tokens
  and images once the pieces before it are in; None when a piece fits none."""
  used, gen, read = rows.used.copy(), rows.n_images.copy(), rows.n_read.copy()
  plan = []
  for piece in pieces:
    n = expanded_length(piece, spec)
    n_gen, n_read = _images_after((0, 0), piece)
    fits_R = (
      (used + n <= spec.seq_len)
      & (gen + n_gen <= spec.max_images)
      & (read + n_read <= spec.max_read_images)
    )
    if not fits_R.any():
      return None
    r = int(np.argmax(fits_R))
    plan.append(r)
    used[r], gen[r], read[r] = used[r] + n, gen[r] + n_gen, read[r] + n_read
  return plan


def _images_after(images: tuple[int, int], piece: Example) -> tuple[int, int]:
  """(generated, read) images of a row after `piece` joins it."""
  n_read = sum(piece.read_flags())
  return images[0] + len(piece.images) - n_read, images[1] + n_read


def _images_fit(images: tuple[int, int], piece: Example, spec: RowSpec) -> bool:
  gen, read = _images_after(images, piece)
  return gen <= spec.max_images and read <= spec.max_read_images


def pack_examples(
  examples: Sequence[Example], spec: RowSpec, *, one_per_row: bool = False
) -> dict[str, np.ndarray]:
  """Packs all `examples` in order into as many rows as they need, each row
  filled until the next example does not fit (next-fit: the k-th segment in
  row-major order is the k-th example).

  With `one_per_row`, each example (each piece of a split text) gets a row of
  its own, e.g. for sampling prompts.
  """
  pieces = [p for i, e in enumerate(examples) for p in pieces_of(e, spec, i)]
  plan = list(range(len(pieces))) if one_per_row else _next_fit(pieces, spec)
  rows = Rows(plan[-1] + 1 if plan else 0, spec)
  for piece, r in zip(pieces, plan):
    rows.put(r, piece)
  return rows.batch()


class PackedBatches(Iterator[dict]):
  """Batches of `rows` packed rows read from an indexable example stream.

  Examples are taken in stream order, each into the first row with room for
  its tokens and images (first-fit: a short example fills the gap an earlier
  long one left), until one fits no row; that one opens the next batch, re-read
  from `example_at`. So the whole state is `next_example`, the index of the
  first example not yet packed: a batch is a pure function of (example_at,
  next_example), and an iterator restored with `set_state(get_state())` yields
  exactly what the original would have yielded next. The pieces of a split
  long text always land in the same batch (a piece offset would be a second
  integer of state), so one text may span at most `rows` rows.
  """

  def __init__(
    self, example_at: Callable[[int], Example], *, rows: int, spec: RowSpec, start_index: int = 0
  ):
    if rows < 1:
      raise ValueError(f"rows={rows}: a batch needs at least one row")
    self.example_at = example_at
    self.rows = rows
    self.spec = spec
    self.next_example = int(start_index)
    self._last = None  # (index, pieces): the leftover is not decoded twice

  def _pieces(self, index: int) -> list[Example]:
    if self._last is None or self._last[0] != index:
      self._last = (index, pieces_of(self.example_at(index), self.spec, index))
    return self._last[1]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = Rows(self.rows, self.spec)
    while True:
      index = self.next_example
      pieces = self._pieces(index)
      plan = _first_fit(pieces, self.spec, out)
      if plan is None:
        if not out.n_examples.any():
          raise ConfigError(
            f"example {index} is a text of {sum(len(p.ids) for p in pieces)} tokens: "
            f"{len(pieces)} pieces of data.seq_len={self.spec.seq_len} do not fit a "
            f"batch of {self.rows} rows; raise data.seq_len or data.batch_size, or "
            "shorten the text"
          )
        return out.batch()
      for piece, row in zip(pieces, plan):
        out.put(row, piece)
      self.next_example += 1

  def get_state(self) -> dict:
    return {"next_example": int(self.next_example)}

  def set_state(self, state: dict):
    self.next_example = int(state["next_example"])
