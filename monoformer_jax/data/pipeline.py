"""From prepared records to examples: Grain MapDatasets, mixing, prefetch.

Every dataset becomes the same thing, an indexable infinite stream
`example_at(i) -> Example` that is a pure function of (seed, i):

    records   grain.MapDataset.source(tfds data source of data.dir/split)
    order     .shuffle(seed) per epoch (a fresh order each epoch), .repeat()
    example   .random_map(to_example, seed): the source's record -> Example
              (data/sources/: the prompt template and the guidance drop, the
              latent drawn from its stored posterior, a chat rendered with
              data.chat_template, ...)
    mix       several streams interleaved by weight (`mix`): exact shares in
              every block of MIX_BLOCK examples, at random places, so each
              stream's index is still computable from i alone

A host reads only its share (`sharded.host_stream`); with `data.workers` > 0
its examples are read and made ahead by that many worker processes
(`WorkerExamples`: reading and making examples holds the GIL);
`packing.PackedBatches` packs the rows, and `Prefetched` packs the next
batches in a thread while the devices train. Because a batch is a pure function of one integer (the next
example), a checkpoint's data state is that integer and a resumed run reads
exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import multiprocessing
import queue
import sys
import threading
import weakref
from collections.abc import Callable, Sequence

import grain
import numpy as np

from monoformer_jax.errors import ConfigError
from monoformer_jax.layout import Example

# Stream choices are drawn per block of this many examples.
MIX_BLOCK = 128


def mix(
  streams: Sequence[Callable[[int], Example]],
  weights: Sequence[float],
  seed: int,
  block: int = MIX_BLOCK,
) -> Callable[[int], Example]:
  """example_at(i) of `streams` interleaved in the proportions of `weights`.

  Block b of `block` examples holds exactly round-down shares of the
  cumulative counts (so every prefix of the stream is within one example of
  the weights per stream), at places drawn from (seed, b); stream k's j-th
  example is its own example j, so no stream is skipped or repeated.
  """
  weights = np.asarray(weights, np.float64)
  if len(streams) != len(weights) or not len(streams):
    raise ConfigError(f"{len(streams)} streams but {len(weights)} weights")
  if (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() <= 0:
    raise ConfigError(f"mixing weights {weights.tolist()} must be finite, >= 0 and not all 0")
  cumulative = np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])
  cumulative[-1] = 1.0

  def before(b: int) -> np.ndarray:
    """Examples of each stream in blocks 0 .. b - 1, [K]."""
    edges = np.floor(b * block * cumulative).astype(np.int64)
    return np.diff(edges)

  @functools.lru_cache(maxsize=8)
  def layout(b: int) -> tuple[np.ndarray, np.ndarray]:
    """(stream [block], index within that stream [block]) of block b."""
    counts = before(b + 1) - before(b)
    stream = np.repeat(np.arange(len(streams)), counts)
    places = np.random.default_rng([seed, b]).permutation(block)
    which = np.empty(block, np.int64)
    which[places] = stream
    index = np.empty(block, np.int64)
    start = before(b)
    for k in range(len(streams)):
      at = which == k
      index[at] = start[k] + np.arange(at.sum())
    return which, index

  def example_at(i: int) -> Example:
    if i < 0:
      raise IndexError(f"example index {i} < 0")
    b, j = divmod(int(i), block)
    which, index = layout(b)
    return streams[int(which[j])](int(index[j]))

  return example_at


def record_stream(records, to_example: Callable, seed: int) -> Callable[[int], Example]:
  """example_at(i) over `records` (random access) repeated forever, a fresh
  shuffle each epoch, `to_example(record, rng)` with a per-example rng."""
  if len(records) == 0:
    raise ConfigError("the prepared dataset has no records")
  shuffle_seed, map_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
  ds = (
    grain.MapDataset.source(records)
    .shuffle(seed=shuffle_seed)
    .repeat()
    .random_map(to_example, seed=map_seed)
  )
  return lambda i: ds[i]


def generated_stream(make: Callable[[np.random.Generator], Example], seed: int):
  """example_at(i) of examples made from a per-index rng alone (e.g. sentences)."""
  ds = grain.MapDataset.range(sys.maxsize).random_map(lambda _, rng: make(rng), seed=seed)
  return lambda i: ds[i]


# ----------------------------------------------------------------- workers

_WORKER_STREAM = None


def _worker_init(make_stream):
  global _WORKER_STREAM
  _WORKER_STREAM = make_stream()


def _worker_examples(start: int, stop: int) -> list[Example]:
  return [_WORKER_STREAM(i) for i in range(start, stop)]


class WorkerExamples:
  """example_at(i) made ahead by `workers` processes, for a reader that asks
  for increasing indices (PackedBatches; it re-reads at most the index before).

  `make_stream()` (picklable: a module-level function and its arguments)
  builds the same example_at in each worker; chunks of `chunk` consecutive
  examples are computed up to `ahead` chunks past the one being read. The
  examples are the ones `make_stream()(i)` gives, whatever the workers' timing.
  """

  def __init__(
    self,
    make_stream: Callable[[], Callable[[int], Example]],
    workers: int,
    *,
    chunk: int = 32,
    ahead: int = 8,
  ):
    self.chunk, self.ahead = chunk, ahead
    # spawn, not fork: the parent runs JAX's threads.
    self.pool = concurrent.futures.ProcessPoolExecutor(
      workers,
      mp_context=multiprocessing.get_context("spawn"),
      initializer=_worker_init,
      initargs=(make_stream,),
    )
    self.futures: dict[int, concurrent.futures.Future] = {}

  def __call__(self, i: int) -> Example:
    if i < 0:
      raise IndexError(f"example index {i} < 0")
    c = i // self.chunk
    for k in range(c, c + self.ahead):
      if k not in self.futures:
        self.futures[k] = self.pool.submit(_worker_examples, k * self.chunk, (k + 1) * self.chunk)
    for k in [k for k in self.futures if k < c - 1]:
      del self.futures[k]
    return self.futures[c].result()[i - c * self.chunk]

  def close(self):
    self.pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- prefetch

_LIVE: weakref.WeakSet[Prefetched] = weakref.WeakSet()


@atexit.register
def _stop_all():
  """Stops packing threads before the interpreter goes (a thread inside the
  array_record reader at shutdown aborts the process)."""
  for p in list(_LIVE):
    p.close()


class Prefetched:
  """An iterator over `batches` (with get_state/set_state) that packs the next
  `depth` batches in a background thread. `get_state()` is the state after
  the last batch handed out, so checkpoints stay exact."""

  def __init__(self, batches, depth: int = 2):
    self.batches = batches
    self.depth = depth
    self._state = batches.get_state()
    self._start()
    _LIVE.add(self)

  def _start(self):
    self._queue: queue.Queue = queue.Queue(self.depth)
    self._stop = threading.Event()

    def work():
      while not self._stop.is_set():
        try:
          item = (next(self.batches), self.batches.get_state(), None)
        except BaseException as e:  # re-raised in the consumer
          item = (None, None, e)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if item[2] is not None:
          return

    self._thread = threading.Thread(target=work, daemon=True, name="packing")
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    batch, state, error = self._queue.get()
    if error is not None:
      raise error
    self._state = state
    return batch

  def get_state(self) -> dict:
    return dict(self._state)

  def set_state(self, state: dict):
    self.close()
    self.batches.set_state(state)
    self._state = self.batches.get_state()
    self._start()

  def close(self):
    self._stop.set()
    self._thread.join()
