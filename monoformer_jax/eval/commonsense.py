r"""Zero-shot commonsense evaluation by log-likelihood, scored as lm-evaluation-harness does.

Each example is a question with a few choices. Every choice becomes one
request, a (context, continuation) pair of strings; the model scores it with
the summed log-probability of the continuation's tokens after <s> + context.
The predicted choice is the one scored highest (`acc`), or highest per
character of the choice (`acc_norm`: the harness divides by `len(choice)`,
the choice's characters without the " " that joins it to the context; for the
ASCII texts of these tasks that is its bytes). These are the numbers of
TinyLlama's report and of `lm_eval --tasks hellaswag,...` (zero-shot).

    from monoformer_jax.eval import commonsense
    commonsense.evaluate_tasks(model, tokenizer, ["hellaswag", "piqa"], "/data/commonsense")
    # {"hellaswag": {"acc": ..., "acc_norm": ..., "n": 10042, "truncated": 0}, "piqa": ...}

or `python -m monoformer_jax.evaluate --metrics=commonsense --tasks_dir=...`
(the `Commonsense` evaluator below; not inside training).

Tasks are read from local files, exports of their Hugging Face datasets: one
folder per task under TASKS_DIR holding the split the harness evaluates, as
JSON lines or parquet (`datasets`' `to_json` / `to_parquet`, or the hub's
own parquet files, which may come in shards named SPLIT-00000-of-00002.parquet):

    TASKS_DIR/hellaswag/validation.jsonl       Rowan/hellaswag
    TASKS_DIR/openbookqa/test.jsonl            allenai/openbookqa, config main
    TASKS_DIR/winogrande/validation.jsonl      allenai/winogrande, config winogrande_xl
    TASKS_DIR/arc_easy/test.jsonl              allenai/ai2_arc, config ARC-Easy
    TASKS_DIR/arc_challenge/test.jsonl         allenai/ai2_arc, config ARC-Challenge
    TASKS_DIR/boolq/validation.jsonl           google/boolq (or super_glue boolq)
    TASKS_DIR/piqa/validation.jsonl            ybisk/piqa (its parquet conversion, with label)

(`.parquet` or `SPLIT-*.parquet` in place of `.jsonl`, looked for in that
order.) Each task's prompt is stated in its builder's docstring below.

Token ids follow the harness (`encode_pair`): the whole string context +
continuation is encoded and the continuation's tokens are what follows the
context's own tokens. Requests are packed into rows sorted by length, their
lengths rounded up to a few buckets so that few programs are compiled, and
the log-softmax is taken in float32 at the continuation's positions only,
over the text vocabulary (MonoFormer's four added tokens are never text).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from etils import epath
from jax.sharding import PartitionSpec as P

from monoformer_jax.data.jsonl import json_objects
from monoformer_jax.data.packing import pack_examples
from monoformer_jax.errors import (
  ConfigError,
  FileFormatError,
  MissingPathError,
  NotInstalledError,
  PathError,
)
from monoformer_jax.eval.registry import Evaluator
from monoformer_jax.layout import Example, Row, RowSpec
from monoformer_jax.model.build import compiled
from monoformer_jax.parallel import sharding
from monoformer_jax.paths import is_local

# TinyLlama's max_position_embeddings, what the reference trains from. Our
# RoPE has no position table, so nothing stops at it: past it are positions
# the model never saw. Pass max_len=config.data.seq_len for a model trained shorter.
DEFAULT_MAX_LEN = 2048
_MIN_BUCKET = 64


# ------------------------------------------------------------------ the tasks


class Doc(NamedTuple):
  """One example as requests: `requests[i]` = (context, continuation) of
  choice i, `gold` the right choice, `lengths[i]` = len(choice i) (acc_norm's
  divisor)."""

  requests: list[tuple[str, str]]
  gold: int
  lengths: list[int]

  @classmethod
  def choices(cls, context: str, choices: Sequence[str], gold: int) -> Doc:
    """The usual multiple choice: one context, each choice joined by " "."""
    if not 0 <= gold < len(choices):
      raise ValueError(f"the answer is choice {gold} but there are {len(choices)} choices")
    return cls([(context, " " + c) for c in choices], gold, [len(c) for c in choices])


def clean_wikihow(text: str) -> str:
  """HellaSwag's clean-up (the harness's `preprocess`): WikiHow's " [title]"
  becomes ". ", any other "[...]" tag is dropped, then double spaces are halved."""
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def hellaswag_doc(ex: dict) -> Doc:
  """context: clean_wikihow(f"{activity_label}: {ctx_a} {ctx_b.capitalize()}");
  choices: clean_wikihow(ending) for each of the 4 endings; gold: int(label).
  (`ctx` itself is not read: it is ctx_a + " " + ctx_b before capitalising.)"""
  query = clean_wikihow(f"{ex['activity_label']}: {ex['ctx_a']} {ex['ctx_b'].capitalize()}")
  return Doc.choices(query, [clean_wikihow(e) for e in ex["endings"]], int(ex["label"]))


def openbookqa_doc(ex: dict) -> Doc:
  """context: question_stem as it is (no "Question:"); choices: choices.text;
  gold: the index of answerKey (left-stripped) in choices.label."""
  labels = list(ex["choices"]["label"])
  return Doc.choices(
    ex["question_stem"], list(ex["choices"]["text"]), _index_of(ex["answerKey"].lstrip(), labels)
  )


def arc_doc(ex: dict) -> Doc:
  """context: f"Question: {question}\\nAnswer:"; choices: choices.text; gold:
  the index of answerKey in choices.label (labels are A-E or 1-5)."""
  labels = list(ex["choices"]["label"])
  return Doc.choices(
    f"Question: {ex['question']}\nAnswer:",
    list(ex["choices"]["text"]),
    _index_of(ex["answerKey"], labels),
  )


def boolq_doc(ex: dict) -> Doc:
  """context: f"{passage}\\nQuestion: {question}?\\nAnswer:"; choices "no",
  "yes"; gold: 1 for answer true (google/boolq's bool `answer`, or
  super_glue's 0/1 `label`)."""
  answer = ex["answer"] if "answer" in ex else ex["label"]
  if not isinstance(answer, (bool, int)) or answer not in (0, 1):
    raise ValueError(f"answer {answer!r} is not a bool (or 0/1)")
  return Doc.choices(
    f"{ex['passage']}\nQuestion: {ex['question']}?\nAnswer:", ["no", "yes"], int(answer)
  )


def piqa_doc(ex: dict) -> Doc:
  """context: f"Question: {goal}\\nAnswer:"; choices: sol1, sol2; gold: label."""
  return Doc.choices(f"Question: {ex['goal']}\nAnswer:", [ex["sol1"], ex["sol2"]], int(ex["label"]))


def winogrande_doc(ex: dict) -> Doc:
  """Partial scoring (Trinh & Le, 2018): the sentence is cut at its blank "_";
  context i is the part before the blank with option i in it, and the
  continuation, the SAME for both options, is " " + the rest after the blank,
  stripped. So only how well each option predicts the rest is compared.
  gold: answer "1" -> 0, "2" -> 1. acc only."""
  sentence = ex["sentence"]
  blank = sentence.index("_")
  rest = " " + sentence[blank + 1 :].strip()
  contexts = [sentence[:blank] + ex["option1"], sentence[:blank] + ex["option2"]]
  answer = str(ex["answer"])
  if answer not in ("1", "2"):
    raise ValueError(f"answer {ex['answer']!r} is not '1' or '2'")
  return Doc([(c, rest) for c in contexts], int(answer) - 1, [len(c) for c in contexts])


def _index_of(key: str, labels: list[str]) -> int:
  if key not in labels:
    raise ValueError(f"answerKey {key!r} is not one of the choice labels {labels}")
  return labels.index(key)


@dataclasses.dataclass(frozen=True)
class Task:
  """A task: where its examples are (TASKS_DIR/name/split.*), the fields each
  must have, and how one becomes a Doc."""

  name: str
  split: str
  source: str
  fields: tuple[str, ...]
  doc: Callable[[dict], Doc]
  acc_norm: bool = True


TASKS: dict[str, Task] = {
  t.name: t
  for t in (
    Task(
      "hellaswag",
      "validation",
      "Rowan/hellaswag",
      ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
      hellaswag_doc,
    ),
    Task(
      "openbookqa",
      "test",
      "allenai/openbookqa (main)",
      ("question_stem", "choices", "answerKey"),
      openbookqa_doc,
    ),
    Task(
      "winogrande",
      "validation",
      "allenai/winogrande (winogrande_xl)",
      ("sentence", "option1", "option2", "answer"),
      winogrande_doc,
      acc_norm=False,
    ),
    Task(
      "arc_easy",
      "test",
      "allenai/ai2_arc (ARC-Easy)",
      ("question", "choices", "answerKey"),
      arc_doc,
    ),
    Task(
      "arc_challenge",
      "test",
      "allenai/ai2_arc (ARC-Challenge)",
      ("question", "choices", "answerKey"),
      arc_doc,
    ),
    Task("boolq", "validation", "google/boolq", ("question", "passage"), boolq_doc),
    Task("piqa", "validation", "ybisk/piqa", ("goal", "sol1", "sol2", "label"), piqa_doc),
  )
}


def layout(tasks_dir: str = "TASKS_DIR") -> str:
  """The expected file of each task and its source (what a missing-file error shows)."""
  return "; ".join(
    f"{os.path.join(tasks_dir, t.name, t.split)}.jsonl ({t.source})" for t in TASKS.values()
  )


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ConfigError(f"unknown commonsense task {name!r}; choose among {sorted(TASKS)}")
  return TASKS[name]


# ------------------------------------------------------------------ reading files


def task_files(name: str, tasks_dir: str) -> list[str]:
  """The file(s) task `name` is read from: TASKS_DIR/name/SPLIT.jsonl, else
  SPLIT.parquet, else the shards SPLIT-*.parquet in order (local or on a bucket)."""
  task = get_task(name)
  tasks_dir = os.fspath(tasks_dir)
  if not epath.Path(tasks_dir).is_dir():
    raise MissingPathError(
      f"tasks_dir {tasks_dir!r} is not a folder; it must hold one folder "
      f"per task: {layout(tasks_dir)} (or .parquet)"
    )
  stem = os.path.join(tasks_dir, task.name, task.split)
  folder = epath.Path(tasks_dir, task.name)
  for suffix in (".jsonl", ".parquet", "-*.parquet"):
    pattern = glob.escape(task.split) + suffix
    found = sorted(os.path.join(tasks_dir, task.name, f.name) for f in folder.glob(pattern))
    if found:
      return found
  raise MissingPathError(
    f"{name}: no {stem}.jsonl (or {task.split}.parquet, "
    f"{task.split}-*.parquet) there; export the {task.split} split of "
    f"{task.source} to it. Layout: {layout(tasks_dir)}"
  )


def read_examples(path: str, limit: int | None = None) -> list[tuple[str, dict]]:
  """(where, example) of each example of a .jsonl or .parquet file, `where`
  naming the file and line (or row) for error messages."""
  path = os.fspath(path)
  out = []
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq
    except ImportError as e:
      raise NotInstalledError(
        f"{path} is parquet, which needs pyarrow: `pip install pyarrow`, "
        "or export the split as .jsonl"
      ) from e
    try:
      if is_local(path):
        rows = pq.read_table(path).to_pylist()
      else:  # read through epath, as every bucket file is (pyarrow's own GCS client is not)
        with epath.Path(path).open("rb") as f:
          rows = pq.read_table(f).to_pylist()
    except Exception as e:
      raise FileFormatError(f"{path} is not a readable parquet file ({e})") from e
    return [(f"{path}, row {i}", ex) for i, ex in enumerate(rows[:limit])]
  if limit is not None and limit <= 0:
    return out
  for number, ex in json_objects(path):
    out.append((f"{path}, line {number}", ex))
    if limit is not None and len(out) >= limit:
      break  # lines after the limit are not read
  return out


def load_docs(name: str, tasks_dir: str, limit: int | None = None) -> list[Doc]:
  """The first `limit` (None: all) examples of task `name` as Docs."""
  task = get_task(name)
  if limit is not None and limit < 1:
    raise ConfigError(f"limit={limit}: must be >= 1 (or None for every example)")
  docs = []
  for path in task_files(name, tasks_dir):
    for where, ex in read_examples(path, None if limit is None else limit - len(docs)):
      missing = [k for k in task.fields if k not in ex]
      if missing:
        raise FileFormatError(
          f"{where}: a {name} example needs the fields {list(task.fields)}"
          f" but has no {missing}; export {task.source} unchanged"
        )
      try:
        docs.append(task.doc(ex))
      except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise FileFormatError(
          f"{where}: not a {name} example ({type(e).__name__}: {e}); export {task.source} unchanged"
        ) from e
    if limit is not None and len(docs) >= limit:
      break
  return docs


# ------------------------------------------------------------------ token ids


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) of a request, without bos, as the harness.

  Whitespace ending the context is moved to the front of the continuation;
  then the WHOLE string is encoded and the continuation's ids are what
  follows the first len(encode(context)) ids. Encoding the continuation on
  its own would be wrong for SentencePiece: it prepends its dummy-prefix "▁"
  to every text it encodes, so " yes" alone is "▁▁yes" (or "▁" "▁yes"), not
  the "▁yes" it is after "Answer:". The context's ids are its own encoding
  (which, like the whole string, starts with that "▁": the text is at the
  start of the document). Both meet at a piece boundary whenever the
  continuation starts with a space, as in every task here, since
  SentencePiece pieces hold "▁" only at their front; `encode_requests`
  counts the requests where the whole string's ids do not start with the
  context's (a piece across the boundary) and keeps the harness's split.
  """
  return _split_encoding(tokenizer, context, continuation)[:2]


def _split_encoding(tokenizer, context: str, continuation: str):
  """encode_pair's ids, and whether the whole string's ids do not start with
  the context's."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  context_ids = list(tokenizer.encode(context))
  whole = list(tokenizer.encode(context + continuation))
  return context_ids, whole[len(context_ids) :], whole[: len(context_ids)] != context_ids


class Encoded(NamedTuple):
  """A request as token ids: `tokens` = <s> context continuation, cut from
  the left to at most max_len + 1 ids; its last `n_continuation` are scored."""

  tokens: tuple[int, ...]
  n_continuation: int
  truncated: bool
  boundary_merged: bool


def encode_requests(
  tokenizer, requests: Sequence[tuple[str, str]], max_len: int | None = None
) -> list[Encoded]:
  """The Encoded of each (context, continuation); see `encode_pair`.

  The model reads all ids but the last (at most `max_len`, default
  DEFAULT_MAX_LEN). A longer request loses ids from the left, <s> first, as
  the harness cuts, and keeps its continuation whole; one whose continuation
  alone is longer than max_len raises.
  """
  max_len = DEFAULT_MAX_LEN if max_len is None else int(max_len)
  if max_len < 1:
    raise ConfigError(f"max_len={max_len}: must be >= 1 token")
  out = []
  for i, pair in enumerate(requests):
    if len(pair) != 2 or not all(isinstance(s, str) for s in pair):
      raise ConfigError(f"request {i} is {pair!r}; give (context, continuation) strings")
    context, continuation = pair
    context_ids, continuation_ids, merged = _split_encoding(tokenizer, context, continuation)
    if not continuation_ids:
      raise ConfigError(f"request {i} has an empty continuation {continuation!r}: nothing to score")
    if len(continuation_ids) > max_len:
      raise ConfigError(
        f"request {i}: its continuation is {len(continuation_ids)} tokens, "
        f"more than max_len={max_len}; raise max_len or shorten it"
      )
    tokens = [tokenizer.bos_id] + context_ids + continuation_ids
    out.append(
      Encoded(
        tuple(tokens[-(max_len + 1) :]), len(continuation_ids), len(tokens) > max_len + 1, merged
      )
    )
  return out


# ------------------------------------------------------------------ scoring


def _bucket(n: int) -> int:
  """Row length for a request of n ids: the next power of two from
  _MIN_BUCKET, so that calls with any requests share a few programs."""
  return max(_MIN_BUCKET, 1 << (n - 1).bit_length())


def _batch_placement(rows: int):
  """(rows rounded up to the batch shards, a function placing numpy [rows, ...]
  arrays): with a mesh set (`jax.set_mesh`) the rows are split over the
  'batch' rule's mesh axes ('data' and 'fsdp' under the project's rules),
  every process passing the same whole arrays; without one they stay as they are."""
  mesh = jax.sharding.get_mesh()
  if mesh is None or mesh.empty:
    return rows, lambda tree: tree
  spec = sharding.logical_to_spec(("batch", None), sharding.current_rules())
  axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()
  shards = math.prod(mesh.shape[a] for a in axes)
  rows = -(-rows // shards) * shards

  def place(x):
    split = jax.sharding.NamedSharding(mesh, P(spec[0], *(None,) * (x.ndim - 1)))
    return jax.make_array_from_callback(x.shape, split, lambda index: x[index])

  return rows, lambda tree: jax.tree.map(place, tree)


def _groups(lengths: Sequence[int], order: Sequence[int], rows: int):
  """(row length, indices) of each batch: requests taken in `order`
  (longest first), laid greedily into `rows` rows of the bucket of the
  batch's first request, as pack_examples lays them."""
  start = 0
  while start < len(order):
    length = _bucket(lengths[order[start]])
    row, used, group = 0, 0, []
    for i in order[start:]:
      if used + lengths[i] > length:
        row, used = row + 1, 0
        if row == rows:
          break
      group.append(i)
      used += lengths[i]
    yield length, group
    start += len(group)


def _pack(encoded: Sequence[Encoded], group: Sequence[int], length: int, rows: int, spec: RowSpec):
  """(Row, columns int32 [rows, K], targets int32 [rows, K], place) of one
  batch: the requests `group` packed in order into `rows` rows of `length`,
  and where each one's scored ids are: place[k] = (row, first of its K
  entries, count) for group[k]. K is a power of two (>= 8)."""
  batch = pack_examples(
    [Example(encoded[i].tokens[:-1], train_text=False) for i in group],
    dataclasses.replace(spec, seq_len=length),
  )
  filled = len(batch["tokens"])
  assert filled <= rows, (filled, rows)
  # pack_examples lays the examples in order, so the k-th (row, segment) in
  # row-major order is group[k]; the logits at column l predict token l + 1,
  # so a request of n inputs whose last c ids are scored reads columns n-c..n-1.
  place, columns, targets = [], [[] for _ in range(rows)], [[] for _ in range(rows)]
  requests = iter(group)
  for r in range(filled):
    segments_L = batch["segment_ids"][r]
    for segment in range(1, int(segments_L.max()) + 1):
      e = encoded[next(requests)]
      start = int(np.argmax(segments_L == segment))
      n, c = len(e.tokens) - 1, e.n_continuation
      place.append((r, len(columns[r]), c))
      columns[r] += range(start + n - c, start + n)
      targets[r] += e.tokens[-c:]
  assert next(requests, None) is None and len(place) == len(group)
  width = max(8, 1 << (max(len(c) for c in columns) - 1).bit_length())
  columns_BxK = np.zeros((rows, width), np.int32)
  targets_BxK = np.zeros((rows, width), np.int32)
  for r in range(rows):
    columns_BxK[r, : len(columns[r])] = columns[r]
    targets_BxK[r, : len(targets[r])] = targets[r]
  pad = [(0, rows - filled)]  # whole padding rows: segment id 0 throughout
  row = Row(
    *(
      np.pad(
        batch[name],
        pad + [(0, 0)] * (batch[name].ndim - 1),
        constant_values=spec.pad_id if name == "tokens" else 0,
      )
      for name in Row._fields
    )
  )
  return row, columns_BxK, targets_BxK, place


@compiled
def _continuation_scores(model, text_vocab: int, row: Row, columns_BxK, targets_BxK):
  """(log p(target) float32 [B, K], target is the argmax [B, K]) at the
  columns `columns_BxK` of the rows, over the text vocabulary only: the
  float32 log-softmax at the target, logit - logsumexp, without writing the
  [B, K, V] log-probabilities out."""
  h_BxLxE = model.decoder(
    model.embed_text(row.tokens), row.positions, row.segment_ids, row.image_ids
  )
  h_BxKxE = jnp.take_along_axis(h_BxLxE, columns_BxK[..., None], axis=1)
  logits_BxKxV = model.logits(h_BxKxE)[..., :text_vocab].astype(jnp.float32)
  target_BxK = jnp.take_along_axis(logits_BxKxV, targets_BxK[..., None], axis=-1)[..., 0]
  logp_BxK = target_BxK - jax.nn.logsumexp(logits_BxKxV, axis=-1)
  out = logp_BxK, jnp.argmax(logits_BxKxV, axis=-1) == targets_BxK
  if not jax.sharding.get_abstract_mesh().empty:  # small: replicated, so every host reads it
    out = jax.lax.with_sharding_constraint(out, P())
  return out


def score_encoded(
  model, tokenizer, encoded: Sequence[Encoded], *, batch_size: int = 16, progress=None
) -> list[tuple[float, bool]]:
  """(log-likelihood, is_greedy) of each Encoded request, in order.

  Requests are sorted longest first and packed, several to a row when they
  fit (each its own segment: attention stays within it, positions restart),
  into batches of `batch_size` rows (rounded up to the batch shards of a
  mesh) whose length is the power of two (>= 64) holding the batch's first
  request; the K positions scored per row are padded to a power of two too.
  One batch stays in flight while the next one is packed. `progress`: None
  for a tqdm bar, False for none, or a callable given the number of
  requests each batch finished (e.g. a bar's `update`).
  """
  if batch_size < 1:
    raise ConfigError(f"batch_size={batch_size}: must be >= 1 row")
  if tokenizer.vocab_size > model.cfg.vocab_size:
    raise ConfigError(
      f"the tokenizer has {tokenizer.vocab_size} ids but the model has "
      f"model.vocab_size={model.cfg.vocab_size}; use the model's own tokenizer"
    )
  m = model.cfg
  spec = RowSpec(
    seq_len=_MIN_BUCKET,
    max_images=0,
    image_shape=(m.image_size, m.image_size, m.in_channels),
    tokens_per_image=model.tokens_per_image,
    image_id=tokenizer.image_id,
    pad_id=tokenizer.pad_id,
  )
  rows, place_rows = _batch_placement(batch_size)
  lengths = [len(e.tokens) - 1 for e in encoded]
  order = sorted(range(len(encoded)), key=lambda i: -lengths[i])
  results: list[tuple[float, bool] | None] = [None] * len(encoded)
  bar = (
    tqdm.tqdm(total=len(encoded), desc="log-likelihoods", unit="req") if progress is None else None
  )
  update = bar.update if bar is not None else (progress or (lambda n: None))
  score = _continuation_scores.bind(model)

  def collect(group, place, out):
    logp_BxK, greedy_BxK = jax.device_get(out)
    for i, (r, at, c) in zip(group, place):
      results[i] = (
        float(np.sum(logp_BxK[r, at : at + c], dtype=np.float64)),
        bool(greedy_BxK[r, at : at + c].all()),
      )
    update(len(group))

  pending = None
  try:
    for length, group in _groups(lengths, order, rows):
      row, columns_BxK, targets_BxK, place = _pack(encoded, group, length, rows, spec)
      out = score(tokenizer.base_vocab, *place_rows([row, columns_BxK, targets_BxK]))
      if pending is not None:
        collect(*pending)
      pending = (group, place, out)
    if pending is not None:
      collect(*pending)
  finally:
    if bar is not None:
      bar.close()
  return results


def loglikelihoods(
  model,
  tokenizer,
  requests: Sequence[tuple[str, str]],
  *,
  batch_size: int = 16,
  max_len: int | None = None,
  progress=None,
) -> list[tuple[float, bool]]:
  """(log p(continuation | <s> context), is_greedy) of each (context,
  continuation) pair, as lm-evaluation-harness's `loglikelihood`.

  The log-likelihood is the sum over the continuation's tokens (see
  `encode_pair`) of their log-probabilities, float32 log-softmax over the
  tokenizer's text vocabulary (ids below `tokenizer.base_vocab`: MonoFormer's
  four added tokens, <PAD> <image> <|im_start|> <|im_end|>, are never text,
  so a converted Llama scores exactly as the Llama it came from); is_greedy:
  every continuation token is the argmax. Contexts longer than `max_len`
  (default DEFAULT_MAX_LEN) ids are cut from the left and counted in a
  warning. Works unsharded and under `jax.set_mesh` with a sharded model
  (the rows are then split over the batch axes).
  """
  encoded = encode_requests(tokenizer, requests, max_len)
  _warn_about(encoded, max_len)
  return score_encoded(model, tokenizer, encoded, batch_size=batch_size, progress=progress)


def _warn_about(encoded: Sequence[Encoded], max_len: int | None):
  cut = sum(e.truncated for e in encoded)
  if cut:
    logging.warning(
      "%d of %d requests are longer than max_len=%d tokens: their contexts were cut from the left",
      cut,
      len(encoded),
      DEFAULT_MAX_LEN if max_len is None else max_len,
    )
  merged = sum(e.boundary_merged for e in encoded)
  if merged:
    logging.warning(
      "%d of %d requests: a token spans the context/continuation boundary; "
      "split there as lm-evaluation-harness does",
      merged,
      len(encoded),
    )


# ------------------------------------------------------------------ metrics


def evaluate_task(
  model,
  tokenizer,
  name: str,
  tasks_dir: str,
  *,
  limit: int | None = None,
  batch_size: int = 16,
  max_len: int | None = None,
  progress=None,
) -> dict:
  """{acc, acc_norm, n, truncated} of task `name` read from `tasks_dir`
  (see the module docstring for the layout); winogrande has no acc_norm.
  `limit`: only the first `limit` examples; `truncated`: the requests whose
  context was cut to fit max_len."""
  task = get_task(name)
  docs = load_docs(name, tasks_dir, limit)
  requests = [r for d in docs for r in d.requests]
  encoded = encode_requests(tokenizer, requests, max_len)
  _warn_about(encoded, max_len)
  if progress is None:
    with tqdm.tqdm(total=len(requests), desc=name, unit="req") as bar:
      scores = score_encoded(model, tokenizer, encoded, batch_size=batch_size, progress=bar.update)
  else:
    scores = score_encoded(model, tokenizer, encoded, batch_size=batch_size, progress=progress)
  return metrics(
    docs,
    [s for s, _ in scores],
    acc_norm=task.acc_norm,
    truncated=sum(e.truncated for e in encoded),
  )


def metrics(
  docs: Sequence[Doc], scores: Sequence[float], *, acc_norm: bool = True, truncated: int = 0
) -> dict:
  """acc (argmax of the log-likelihoods is gold), acc_norm (argmax of
  log-likelihood / len(choice)) and n of the docs, `scores` being their
  requests' log-likelihoods in order."""
  correct = correct_norm = 0
  at = 0
  for d in docs:
    lls = np.asarray(scores[at : at + len(d.requests)], np.float64)
    at += len(d.requests)
    correct += int(np.argmax(lls)) == d.gold
    correct_norm += int(np.argmax(lls / np.asarray(d.lengths, np.float64))) == d.gold
  n = len(docs)
  out = dict(acc=correct / n if n else float("nan"))
  if acc_norm:
    out["acc_norm"] = correct_norm / n if n else float("nan")
  return {**out, "n": n, "truncated": int(truncated)}


def evaluate_tasks(
  model, tokenizer, names: Iterable[str], tasks_dir: str, **kwargs
) -> dict[str, dict]:
  """{task: evaluate_task(...)} for each of `names`; every name and file is
  checked before the first task runs."""
  names = list(names)
  for name in names:
    task_files(name, tasks_dir)
  return {name: evaluate_task(model, tokenizer, name, tasks_dir, **kwargs) for name in names}


# ------------------------------------------------------------------ the evaluator


class Commonsense(Evaluator):
  """`commonsense`: the tasks `tasks` (default all) of the folder `tasks_dir`,
  at most `limit` examples each, `text_batch` rows per pass, rows of at most
  `max_len` tokens (evaluate's flags)."""

  scores = "model"
  in_training = False  # minutes per task on a large model: a checkpoint's job

  @classmethod
  def check(cls, names, settings, flag):
    tasks_dir = settings.get("tasks_dir")
    if not tasks_dir:
      raise ConfigError(
        f"--metrics=commonsense needs {flag('tasks_dir')}, the folder of the "
        "task files (eval/commonsense.py gives the layout)"
      )
    if not epath.Path(tasks_dir).is_dir():
      raise PathError(f"{flag('tasks_dir')}={tasks_dir!r} is not a folder")
    for name in settings.get("tasks") or TASKS:  # every task's name and file
      task_files(name, tasks_dir)

  def __init__(self, names, settings):
    super().__init__(names, settings)
    self.tasks_dir = settings["tasks_dir"]
    self.tasks = list(settings.get("tasks") or TASKS)
    self.options = dict(
      limit=settings.get("limit"),
      batch_size=settings.get("text_batch", 16),
      max_len=settings.get("max_len", DEFAULT_MAX_LEN),
    )

  def score_model(
    self, model, tokenizer, config, *, num_steps, cfg_scale, seed, outdir=None
  ) -> dict:
    return {
      "commonsense": evaluate_tasks(model, tokenizer, self.tasks, self.tasks_dir, **self.options)
    }


EVALUATORS = {"commonsense": Commonsense}
