"""Commonsense evaluation: transformers' log-likelihoods, the harness's prompts and ids, metrics.

The fixture (tests/fixtures/make_commonsense_fixture.py) holds a few hand-made
examples per task and, for each request, the token ids built the harness's
way and the tiny Llama's scores under transformers; model numerics (a) and
request building (b, d) are checked apart.
"""

import json
import logging
import pathlib
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from monoformer_jax.convert import llama, verify
from monoformer_jax.errors import ConfigError, FileFormatError, MissingPathError, NotInstalledError
from monoformer_jax.eval import commonsense
from monoformer_jax.eval.commonsense import TASKS, Doc
from monoformer_jax.model.build import abstract_model, param_shardings
from monoformer_jax.parallel import sharding
from monoformer_jax.text.tokenizer import SentencePieceTokenizer

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
TINY_LLAMA = FIXTURES / "tiny_llama"
TASKS_DIR = FIXTURES / "commonsense"
EXPECTED = json.loads((TASKS_DIR / "expected.json").read_text())
PAIRS = [(r["context"], r["continuation"]) for r in EXPECTED["requests"]]


def _model(shardings_fn=None):
  params, config = llama.load_llama(
    str(TINY_LLAMA), verify.fixture_config(), seed=0, shardings_fn=shardings_fn
  )
  return nnx.merge(abstract_model(config.model)[0], params), config


@pytest.fixture(scope="module")
def setup():
  model, config = _model()
  return model, SentencePieceTokenizer(str(TINY_LLAMA / "tokenizer.model")), config


@pytest.fixture(scope="module")
def scores(setup):
  model, tok, _ = setup
  return commonsense.loglikelihoods(model, tok, PAIRS, batch_size=3, progress=False)


# ------------------------------------------------------------ (a) numerics


def test_loglikelihoods_match_transformers(scores):
  want = np.array([r["loglik"] for r in EXPECTED["requests"]])
  got = np.array([s for s, _ in scores])
  # float32 on both sides; sums of 1..100 log-probs of size ~6 (a random
  # model): measured max |error| ~2e-5 on values up to ~600.
  error = np.abs(got - want).max()
  print(f"max |loglik error| vs transformers: {error:.2e} (|loglik| <= {np.abs(want).max():.0f})")
  assert error < 1e-4
  assert [g for _, g in scores] == [r["is_greedy"] for r in EXPECTED["requests"]]


def test_truncated_requests_keep_their_continuation_and_match_transformers(setup, caplog):
  model, tok, _ = setup
  cut = EXPECTED["truncated"]
  max_len = EXPECTED["trunc_max_len"]
  pairs = [PAIRS[i] for i, r in enumerate(EXPECTED["requests"]) if r["task"] == "boolq"]
  encoded = commonsense.encode_requests(tok, pairs, max_len)
  assert [list(e.tokens) for e in encoded] == [r["tokens"] for r in cut]
  assert all(e.truncated for e in encoded)
  with caplog.at_level(logging.WARNING):
    got = commonsense.loglikelihoods(model, tok, pairs, max_len=max_len, progress=False)
  assert f"{len(pairs)} of {len(pairs)} requests are longer than max_len={max_len}" in caplog.text
  np.testing.assert_allclose([s for s, _ in got], [r["loglik"] for r in cut], atol=1e-4)
  assert [g for _, g in got] == [r["is_greedy"] for r in cut]


def test_one_request_per_batch_gives_the_same_numbers_and_reports_progress(setup, scores):
  model, tok, _ = setup
  done = []
  got = commonsense.loglikelihoods(model, tok, PAIRS[:5], batch_size=1, progress=done.append)
  assert sum(done) == 5 and len(done) >= 2
  np.testing.assert_allclose([s for s, _ in got], [s for s, _ in scores[:5]], atol=1e-5)


# ------------------------------------------------------------ (b) requests and ids


def test_requests_and_ids_are_the_fixtures(setup):
  _, tok, _ = setup
  built, golds = [], []
  for name in TASKS:
    for doc in commonsense.load_docs(name, TASKS_DIR):
      built += doc.requests
      golds.append((name, doc.gold))
  order = lambda rs: sorted(rs, key=lambda r: list(TASKS).index(r["task"]))
  want = order(EXPECTED["requests"])
  assert built == [(r["context"], r["continuation"]) for r in want]
  assert golds == [(d["task"], d["gold"]) for d in order(EXPECTED["docs"])]
  for (context, continuation), r in zip(built, want):
    assert commonsense.encode_pair(tok, context, continuation) == (
      r["context_ids"],
      r["continuation_ids"],
    )
  assert not any(e.boundary_merged or e.truncated for e in commonsense.encode_requests(tok, built))


def test_encode_pair_moves_the_contexts_trailing_spaces_and_keeps_the_mid_text_piece(setup):
  _, tok, _ = setup
  ctx, cont = commonsense.encode_pair(tok, "the cat sat ", "on a mat")
  assert (ctx, cont) == commonsense.encode_pair(tok, "the cat sat", " on a mat")
  assert ctx + cont == tok.encode("the cat sat on a mat")
  assert cont == tok.encode("the cat sat on a mat")[len(tok.encode("the cat sat")) :]
  assert cont != tok.encode(" on a mat")  # alone, SentencePiece adds its "▁" before the space
  # a piece across the boundary: counted, and split as the harness splits
  (merged,) = commonsense.encode_requests(tok, [("the ca", "t sat")])
  ctx = tok.encode("the ca")
  assert merged.boundary_merged and tok.encode("the cat sat")[: len(ctx)] != ctx
  assert list(merged.tokens) == [tok.bos_id] + ctx + tok.encode("the cat sat")[len(ctx) :]


# ------------------------------------------------------------ (c) metrics


def _by_hand(name):
  """acc and acc_norm from the fixture's log-likelihoods, in plain Python."""
  docs = [d for d in EXPECTED["docs"] if d["task"] == name]
  right = right_norm = 0
  for d in docs:
    reqs = [r for r in EXPECTED["requests"] if r["task"] == name and r["doc"] == d["doc"]]
    lls = [r["loglik"] for r in reqs]
    norm = [r["loglik"] / len(r["continuation"][1:]) for r in reqs]  # len(choice)
    right += lls.index(max(lls)) == d["gold"]
    right_norm += norm.index(max(norm)) == d["gold"]
  out = dict(acc=right / len(docs))
  if name != "winogrande":
    out["acc_norm"] = right_norm / len(docs)
  return dict(out, n=len(docs), truncated=0)


def test_acc_and_acc_norm_are_the_hand_computed_ones(setup):
  model, tok, _ = setup
  got = commonsense.evaluate_tasks(model, tok, list(TASKS), str(TASKS_DIR), progress=False)
  assert got == {name: _by_hand(name) for name in TASKS}
  assert set(got["winogrande"]) == {"acc", "n", "truncated"}
  assert got["hellaswag"]["n"] == 3
  # not trivial: some examples right, some wrong, and the norm changes some picks
  assert any(0 < v["acc"] < 1 for v in got.values())
  assert any(v["acc_norm"] != v["acc"] for v in got.values() if "acc_norm" in v)
  limited = commonsense.evaluate_task(
    model, tok, "hellaswag", str(TASKS_DIR), limit=1, progress=False
  )
  assert limited["n"] == 1


def test_metrics_break_ties_as_numpy_argmax():
  docs = [Doc([("a", " x"), ("a", " yy")], 1, [1, 2]), Doc([("a", " x"), ("a", " y")], 0, [1, 1])]
  assert commonsense.metrics(docs, [-1.0, -1.5, -2.0, -2.0]) == dict(
    acc=0.5, acc_norm=1.0, n=2, truncated=0
  )


# ------------------------------------------------------------ (d) prompts


def test_prompt_of_each_task_is_the_harness_format():
  hellaswag = dict(
    activity_label="Home and Garden",
    ctx_a="[header] How to grow a red tomato [title] Find a sunny spot.",
    ctx_b="[step] THE plant",
    endings=["needs sun [substeps] Water it.", "will [title] sing."],
    label="0",
  )
  assert TASKS["hellaswag"].doc(hellaswag) == Doc(
    [
      (
        "Home and Garden: How to grow a red tomato. Find a sunny spot. the plant",
        " needs sun Water it.",
      ),
      ("Home and Garden: How to grow a red tomato. Find a sunny spot. the plant", " will. sing."),
    ],
    0,
    [19, 11],
  )
  assert (
    TASKS["hellaswag"]
    .doc(dict(hellaswag, activity_label="Ball", ctx_a="A dog ran.", ctx_b="THE dog", label=1))
    .requests[0][0]
    == "Ball: A dog ran. The dog"
  )

  obqa = dict(
    question_stem="The sun is responsible for",
    choices=dict(text=["puppies", "plants growing"], label=["A", "B"]),
    answerKey=" B",
  )
  assert TASKS["openbookqa"].doc(obqa) == Doc(
    [("The sun is responsible for", " puppies"), ("The sun is responsible for", " plants growing")],
    1,
    [7, 14],
  )

  arc = dict(
    question="Which gas?",
    choices=dict(text=["oxygen", "neon", "helium"], label=["1", "2", "3"]),
    answerKey="3",
  )
  for name in ("arc_easy", "arc_challenge"):
    assert TASKS[name].doc(arc) == Doc(
      [
        ("Question: Which gas?\nAnswer:", " oxygen"),
        ("Question: Which gas?\nAnswer:", " neon"),
        ("Question: Which gas?\nAnswer:", " helium"),
      ],
      2,
      [6, 4, 6],
    )

  boolq = dict(question="is the sun a star", passage="The Sun is a star.", answer=True)
  assert TASKS["boolq"].doc(boolq) == Doc(
    [
      ("The Sun is a star.\nQuestion: is the sun a star?\nAnswer:", " no"),
      ("The Sun is a star.\nQuestion: is the sun a star?\nAnswer:", " yes"),
    ],
    1,
    [2, 3],
  )
  assert TASKS["boolq"].doc(dict(question="q", passage="p", label=0)).gold == 0  # super_glue

  piqa = dict(goal="To dry a ball,", sol1="put it in the sun.", sol2="use a lake.", label=1)
  assert TASKS["piqa"].doc(piqa) == Doc(
    [
      ("Question: To dry a ball,\nAnswer:", " put it in the sun."),
      ("Question: To dry a ball,\nAnswer:", " use a lake."),
    ],
    1,
    [18, 11],
  )

  wino = dict(
    sentence="The ball did not fit in the box because the _ was too big.",
    option1="ball",
    option2="box",
    answer="2",
  )
  assert TASKS["winogrande"].doc(wino) == Doc(
    [
      ("The ball did not fit in the box because the ball", " was too big."),
      ("The ball did not fit in the box because the box", " was too big."),
    ],
    1,
    [48, 47],
  )


# ------------------------------------------------------------ (e) bad inputs


def _task_dir(tmp_path, name, text, suffix=".jsonl"):
  task = TASKS[name]
  (tmp_path / name).mkdir(parents=True, exist_ok=True)
  path = tmp_path / name / (task.split + suffix)
  path.write_text(text)
  return path


def test_unknown_task_and_missing_files_say_what_is_expected(setup, tmp_path):
  model, tok, _ = setup
  with pytest.raises(
    ConfigError,
    match=r"unknown commonsense task 'hellaswagg'; choose among "
    r"\['arc_challenge', 'arc_easy', 'boolq', 'hellaswag', 'openbookqa', "
    r"'piqa', 'winogrande'\]",
  ):
    commonsense.evaluate_tasks(model, tok, ["piqa", "hellaswagg"], str(TASKS_DIR))
  with pytest.raises(
    MissingPathError,
    match=r"tasks_dir '.*nowhere' is not a folder.*"
    r"nowhere/hellaswag/validation.jsonl \(Rowan/hellaswag\)",
  ):
    commonsense.evaluate_task(model, tok, "piqa", str(tmp_path / "nowhere"))
  with pytest.raises(
    MissingPathError,
    match=r"boolq: no .*/boolq/validation.jsonl \(or "
    r"validation.parquet, validation-\*.parquet\).*export the validation split "
    r"of google/boolq.*Layout: .*arc_easy/test.jsonl",
  ):
    commonsense.evaluate_tasks(model, tok, ["boolq"], str(tmp_path))


def test_malformed_lines_are_named_by_file_and_line(tmp_path):
  good = json.dumps(dict(goal="g", sol1="a", sol2="b", label=0))
  path = _task_dir(tmp_path, "piqa", good + "\n\n{not json\n")
  with pytest.raises(FileFormatError, match=rf"{path}, line 3: not JSON"):
    commonsense.load_docs("piqa", tmp_path)
  assert len(commonsense.load_docs("piqa", tmp_path, limit=1)) == 1  # stops before it
  _task_dir(tmp_path, "piqa", good + "\n" + json.dumps(dict(goal="g", sol1="a", label=0)))
  with pytest.raises(
    FileFormatError,
    match=r"validation.jsonl, line 2: a piqa example needs the "
    r"fields \['goal', 'sol1', 'sol2', 'label'\] but has no \['sol2'\]",
  ):
    commonsense.load_docs("piqa", tmp_path)
  _task_dir(
    tmp_path,
    "arc_easy",
    json.dumps(dict(question="q", choices=dict(text=["a", "b"], label=["A", "B"]), answerKey="C")),
  )
  with pytest.raises(
    FileFormatError,
    match=r"test.jsonl, line 1: not a arc_easy example "
    r"\(ValueError: answerKey 'C' is not one of the choice labels",
  ):
    commonsense.load_docs("arc_easy", tmp_path)
  _task_dir(
    tmp_path,
    "winogrande",
    json.dumps(dict(sentence="no blank", option1="a", option2="b", answer="1")),
  )
  with pytest.raises(FileFormatError, match=r"validation.jsonl, line 1: not a winogrande example"):
    commonsense.load_docs("winogrande", tmp_path)
  _task_dir(tmp_path, "boolq", "[1, 2]\n")
  with pytest.raises(
    FileFormatError, match=r"validation.jsonl, line 1: a JSON list, not an object"
  ):
    commonsense.load_docs("boolq", tmp_path)


def test_bad_requests_are_refused(setup):
  model, tok, _ = setup
  with pytest.raises(
    ConfigError,
    match=r"request 0: its continuation is \d+ tokens, more "
    r"than max_len=4",
  ):
    commonsense.loglikelihoods(model, tok, [("a", " the cat sat on a mat")], max_len=4)
  with pytest.raises(ConfigError, match="request 1 has an empty continuation"):
    commonsense.loglikelihoods(model, tok, [("a", " b"), ("a", "")])
  with pytest.raises(ConfigError, match="batch_size=0"):
    commonsense.loglikelihoods(model, tok, [("a", " b")], batch_size=0)


def test_parquet_files_and_shards_read_as_jsonl(tmp_path):
  import pyarrow
  import pyarrow.parquet as pq

  folder = tmp_path / "arc_easy"
  shutil.copytree(TASKS_DIR / "arc_easy", folder)
  rows = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
  want = commonsense.load_docs("arc_easy", tmp_path)
  (folder / "test.jsonl").unlink()
  pq.write_table(pyarrow.Table.from_pylist(rows), folder / "test.parquet")  # nested choices
  assert commonsense.load_docs("arc_easy", tmp_path) == want
  (folder / "test.parquet").unlink()
  for i, part in enumerate((rows[:1], rows[1:])):  # the hub's shard names
    pq.write_table(pyarrow.Table.from_pylist(part), folder / f"test-{i:05d}-of-00002.parquet")
  assert commonsense.load_docs("arc_easy", tmp_path) == want
  assert len(commonsense.load_docs("arc_easy", tmp_path, limit=1)) == 1


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
  path = _task_dir(tmp_path, "piqa", "", suffix=".parquet")
  monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(
    NotInstalledError,
    match=rf"{path} is parquet, which needs pyarrow: "
    r"`pip install pyarrow`",
  ):
    commonsense.load_docs("piqa", tmp_path)


# ------------------------------------------------------------ (f) sharded


def test_sharded_model_on_a_mesh_gives_the_same_numbers(setup, scores):
  _, tok, config = setup
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  with jax.set_mesh(mesh), sharding.logical_rules(config.sharding_rules):
    model, _ = _model(lambda c: param_shardings(c, mesh))
    assert len(model.embed_tokens[...].sharding.device_set) == 8
    # 18 rows, rounded up to 20 for the 4 batch shards (data x fsdp): all the
    # requests in one batch (one compile), packed unlike `scores`' 3 rows
    got = commonsense.loglikelihoods(model, tok, PAIRS, batch_size=18, progress=False)
  np.testing.assert_allclose([s for s, _ in got], [s for s, _ in scores], atol=2e-5)
  assert [g for _, g in got] == [g for _, g in scores]
