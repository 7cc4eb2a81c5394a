"""The input pipeline: prepared TFDS records through Grain, mixed, shared
between hosts, prefetched and resumed; ImageNet prepared from a folder and
trained; chat and text prepared and packed with loss on the answers."""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import digits_config
from PIL import Image

from monoformer_jax.config import config_file
from monoformer_jax.data import builders, pipeline
from monoformer_jax.data.datasets import check_data, make_batches, source
from monoformer_jax.data.sharded import host_stream
from monoformer_jax.data.sources.imagenet import imagenet_classes
from monoformer_jax.errors import ConfigError, FileFormatError, UserError
from monoformer_jax.layout import Example
from monoformer_jax.text.tokenizer import load_tokenizer, tokenizer_of
from monoformer_jax.train.loop import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_VAE = REPO / "tests" / "fixtures" / "tiny_vae"


def _tagged(tag: int):
  """A stream whose example j is recognisable: ids (tag, j)."""
  return lambda j: Example([tag, j], (), train_text=True)


def test_mixing_weights_hold_and_no_stream_skips_or_repeats():
  weights = [9.0, 1.0, 2.5]
  example_at = pipeline.mix([_tagged(k) for k in range(3)], weights, seed=3)
  n = 50 * pipeline.MIX_BLOCK
  drawn = [list(example_at(i).ids) for i in range(n)]
  for k, w in enumerate(weights):
    mine = [j for tag, j in drawn if tag == k]
    assert abs(len(mine) - n * w / sum(weights)) <= 1, (k, len(mine))
    assert mine == list(range(len(mine)))  # each stream read in order, once
  # Random places: the same seed the same order, another seed another.
  assert [list(example_at(i).ids) for i in range(200)] == drawn[:200]
  other = pipeline.mix([_tagged(k) for k in range(3)], weights, seed=4)
  assert [list(other(i).ids) for i in range(200)] != drawn[:200]
  with pytest.raises(ConfigError, match="must be finite, >= 0 and not all 0"):
    pipeline.mix([_tagged(0)], [0.0], seed=0)


def test_record_stream_visits_every_record_once_per_epoch_in_fresh_orders():
  records = [{"k": i} for i in range(10)]
  stream = pipeline.record_stream(records, lambda r, rng: Example([r["k"]], ()), seed=0)
  epochs = [[stream(e * 10 + i).ids[0] for i in range(10)] for e in range(3)]
  assert all(sorted(e) == list(range(10)) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]


def test_two_hosts_read_disjoint_shares_that_cover_the_stream():
  stream = pipeline.mix([_tagged(0), _tagged(1)], [3.0, 1.0], seed=0)
  hosts = [host_stream(stream, p, 2) for p in range(2)]
  seen = [[tuple(hosts[p](i).ids) for i in range(500)] for p in range(2)]
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == {tuple(stream(i).ids) for i in range(1000)}


def test_digits_go_through_tfds_and_prefetched_batches_resume_exactly(tmp_path):
  config = digits_config()
  config.data.dir = str(tmp_path / "cache")
  tok = tokenizer_of(config)
  batches = make_batches(config, tok)
  assert isinstance(batches, pipeline.Prefetched)
  assert os.path.exists(
    os.path.join(builders.prepared_dir(config.data.dir, "digits"), "dataset_info.json")
  )
  first = [next(batches) for _ in range(3)]
  state = batches.get_state()
  later = [next(batches) for _ in range(3)]
  resumed = make_batches(config, tok, state=state)
  config.data.prefetch = 0
  plain = make_batches(config, tok)
  for a, b in zip(later, [next(resumed) for _ in range(3)]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  for a, b in zip(first + later, [next(plain) for _ in range(6)]):
    np.testing.assert_array_equal(a["latents"], b["latents"])
  # Worker processes make the same examples, whatever their timing.
  config.data.update(prefetch=2, workers=2)
  parallel = make_batches(config, tok)
  for a, b in zip(first + later, [next(parallel) for _ in range(6)]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  parallel.batches.parts[0].example_at.close()
  # The images are the digits themselves, every one once per image epoch.
  records = builders.data_source(builders.prepared_dir(config.data.dir, "digits"))
  assert len(records) == 1797


def _records_both_ways(folder):
  import tensorflow_datasets as tfds

  ours = builders.data_source(folder)
  theirs = tfds.builder_from_directory(folder).as_data_source(split="train")
  return ours, theirs


def test_a_split_with_no_record_is_one_error_and_no_dataset_and_data_dir_mistakes(tmp_path):
  """Was TFDS's AssertionError "No examples were yielded" (a llava file whose
  images are all missing); prepare.py adds the source's report to it."""
  text = source("text")
  splits = {"train": lambda: iter([{"key": "0", "text": "one"}]), "val": lambda: iter(())}
  with pytest.raises(builders.NoRecords, match=r"^text/val: the input gave no record to write$"):
    text.write(str(tmp_path), splits)
  folder = builders.prepared_dir(str(tmp_path), "text")
  assert not os.path.exists(folder) and not list(tmp_path.rglob("dataset_info.json"))
  text.write(str(tmp_path), {"train": splits["train"]})  # the same folder, once there is a record
  assert [r["text"] for r in builders.data_source(folder, "train")] == [b"one"]
  # a damaged prepared folder: named when it is opened, not mid-run in a worker
  for damage, message in (
    ("dataset_info.json", r"its dataset_info.json cannot be read \(ParseError"),
    ("text-train.array_record", r"its train records cannot be read .* a shard is missing"),
  ):
    broken = tmp_path / f"broken_{damage}"
    shutil.copytree(folder, broken)
    [target] = [p for p in broken.iterdir() if damage in p.name]
    target.write_text("{")
    with pytest.raises(FileFormatError, match=f"^data.dir='{broken}': {message}.*prepare it again"):
      builders.data_source(str(broken), "train", kind="text")
  # data.dir given the --output_dir, or a file: named, with the folder to pass
  with pytest.raises(
    ConfigError, match=f"is the --output_dir the dataset was prepared into; .*data.dir={folder}$"
  ):
    builders.check_prepared("data.dir", str(tmp_path), "text")
  with pytest.raises(ConfigError, match=r"data.dirs.text='.*info.json' is a file; pass the folder"):
    builders.check_prepared("data.dirs.text", os.path.join(folder, "dataset_info.json"), "text")


@pytest.mark.parametrize("layout", ["ours", "float_lists", "ragged"])
def test_records_read_what_tfds_itself_decodes(tmp_path, layout):
  """builders.Records parses the features we write straight from the proto;
  what it returns must equal TFDS's own decoding, for today's layout
  (tensors as bytes), for one written with TFDS's default (float lists), and
  for features it leaves to TFDS (a tensor of varying length)."""
  import tensorflow_datasets as tfds

  f = tfds.features
  rng = np.random.default_rng(0)
  rows = [
    dict(
      key=f"{i:03d}",
      mean=rng.standard_normal((2, 3, 4), dtype=np.float32),
      std=rng.random((2, 3, 4), dtype=np.float32),
      label=int(rng.integers(1000)),
      wnid="n01440764",
      tags=np.arange(i % 4, dtype=np.int64),
    )
    for i in range(12)
  ]
  if layout == "ours":
    source("imagenet").write(str(tmp_path), {"train": lambda: iter(rows)}, latent_shape=(2, 3, 4))
    folder = builders.prepared_dir(str(tmp_path), "imagenet")
    from array_record.python import array_record_module as ar

    shards = [n for n in os.listdir(folder) if ".array_record-" in n]
    assert shards and all(
      "uncompressed" in ar.ArrayRecordReader(os.path.join(folder, n)).writer_options_string()
      for n in shards
    )
  else:
    spec = dict(
      key=f.Text(),
      mean=f.Tensor(shape=(2, 3, 4), dtype=np.float32),
      std=f.Tensor(shape=(2, 3, 4), dtype=np.float32),
      label=f.Scalar(dtype=np.int64),
      wnid=f.Text(),
    )
    if layout == "ragged":
      spec["tags"] = f.Tensor(shape=(None,), dtype=np.int64)
    builders._builder(
      "imagenet", str(tmp_path), {"train": lambda: iter(rows)}, f.FeaturesDict(spec), "test"
    ).download_and_prepare()
    folder = builders.prepared_dir(str(tmp_path), "imagenet")
  ours, theirs = _records_both_ways(folder)
  assert (ours._fields is None) == (layout == "ragged")
  assert len(ours) == len(theirs) == len(rows)
  by_key = {r["key"]: r for r in rows}
  batch = ours.__getitems__([3, 1, 7])
  for i in range(len(rows)):
    a, b = ours[i], theirs[i]
    assert sorted(a) == sorted(b)
    for name in b:
      assert type(a[name]) is type(b[name]), name
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    np.testing.assert_array_equal(a["mean"], by_key[a["key"].decode()]["mean"])
    assert a["label"] == by_key[a["key"].decode()]["label"]
  for i, a in zip([3, 1, 7], batch):
    np.testing.assert_array_equal(a["std"], ours[i]["std"])


# ------------------------------------------------------------------ imagenet

WNIDS = ("n01440764", "n01443537", "n01484850")


def _imagenet_folder(root: pathlib.Path) -> pathlib.Path:
  """3 classes, JPEGs of varied sizes, a CMYK, a grayscale, a PNG named
  .JPEG and a truncated JPEG."""
  rng = np.random.default_rng(0)
  for wnid in WNIDS:
    folder = root / "train" / wnid
    folder.mkdir(parents=True)
    for k, (w, h) in enumerate([(40, 30), (24, 50), (64, 64)]):
      pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(folder / f"{wnid}_{k}.JPEG")
  odd = root / "train" / WNIDS[0]
  Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).convert("CMYK").save(
    odd / "cmyk.JPEG"
  )
  Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(odd / "gray.JPEG")
  Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(
    odd / "png.JPEG", format="PNG"
  )
  Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(odd / "cut.JPEG")
  data = (odd / "cut.JPEG").read_bytes()
  (odd / "cut.JPEG").write_bytes(data[: len(data) // 2])
  return root


def _prepare(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "monoformer_jax.data.prepare", *args],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
    cwd=REPO,
  )


@pytest.fixture(scope="module")
def prepared_imagenet(tmp_path_factory):
  root = _imagenet_folder(tmp_path_factory.mktemp("imagenet"))
  out = tmp_path_factory.mktemp("prepared")
  run = _prepare(
    "imagenet",
    f"--input_dir={root}",
    f"--output_dir={out}",
    f"--vae={TINY_VAE}",
    "--image_size=16",
    "--flip",
    "--chunk_size=4",
  )
  assert run.returncode == 0, run.stderr[-4000:]
  return out, run.stderr, root


@pytest.mark.slow
def test_imagenet_is_prepared_with_odd_files_converted_and_the_broken_one_named(prepared_imagenet):
  out, log, root = prepared_imagenet
  folder = builders.prepared_dir(str(out), "imagenet")
  records = builders.data_source(folder, "train", kind="imagenet")
  assert len(records) == 3 * 3 + 3  # cmyk, gray and png converted
  assert "skipped 1" in log and "cut.JPEG" in log
  listed = out / "_encoded" / "imagenet" / "train" / "skipped.tsv"
  assert f"all of them listed in {listed}" in log
  [header, row] = listed.read_text().splitlines()
  assert header == "path\treason" and row.split("\t")[0].endswith(f"{WNIDS[0]}/cut.JPEG")
  labels = sorted(int(records[i]["label"]) for i in range(len(records)))
  index = {w: i for i, (w, _) in enumerate(imagenet_classes())}
  assert labels == sorted([index[WNIDS[0]]] * 6 + [index[WNIDS[1]]] * 3 + [index[WNIDS[2]]] * 3)
  r = records[0]
  assert np.asarray(r["mean"]).shape == (8, 8, 4) and np.asarray(r["std"]).min() > 0
  assert "mean_flip" in r
  # Preparing again into the same folder refuses to overwrite, before reading anything.
  again = _prepare(
    "imagenet", f"--input_dir={root}", f"--output_dir={out}", f"--vae={TINY_VAE}", "--image_size=16"
  )
  assert again.returncode == 2 and "images to encode" not in again.stderr
  assert f"error: {folder} already holds a prepared imagenet dataset" in again.stderr
  assert len(records) == len(builders.data_source(folder, "train", kind="imagenet"))


@pytest.mark.slow
def test_imagenet_trains_from_the_prepared_records(prepared_imagenet, tmp_path, one_device):
  out, _, _ = prepared_imagenet
  config = config_file("imagenet256:tiny")
  config.data.dir = builders.prepared_dir(str(out), "imagenet")
  config.mesh.update(data=1, fsdp=-1)
  batch = next(make_batches(config, tokenizer_of(config)))
  assert batch["latents"].shape == (8, 1, 8, 8, 4) and batch["image_valid"].all()
  tok = tokenizer_of(config)
  texts = [tok.decode(row[ids == 0]) for row, ids in zip(batch["tokens"], batch["image_ids"])]
  names = ("tench", "goldfish", "great white shark")
  # Each row: the reference's prompt with its class name, or the dropped (empty) prompt.
  assert all(any(n in t for n in names) or "of" not in t for t in texts), texts
  assert sum(any(n in t for n in names) for t in texts) >= 4, texts
  state, metrics, _ = train_and_evaluate(config, str(tmp_path), sample_at_end=False)
  assert int(state["step"]) == 4 and np.isfinite(metrics["loss"])


def test_a_run_without_the_vae_its_samples_need_stops_before_its_first_step(
  prepared_imagenet, tmp_path, caplog
):
  """The end-of-run samples of a latent model decode with vae.path: a run
  without it (or with one that is not there) fails when it starts, not after
  its last step."""
  out, _, _ = prepared_imagenet
  config = config_file("imagenet256:tiny")
  config.data.dir = builders.prepared_dir(str(out), "imagenet")
  assert config.sample.num_per_class > 0 and not config.vae.path
  with pytest.raises(ConfigError, match=r"draws 4-channel latents; .* set config.vae.path"):
    train_and_evaluate(config, str(tmp_path / "none"))
  config.vae.path = str(tmp_path / "no_vae")
  with caplog.at_level(logging.INFO, logger="absl"), pytest.raises(UserError, match="no_vae"):
    train_and_evaluate(config, str(tmp_path / "missing"))
  assert "compiling the train step" not in caplog.text
  assert not (tmp_path / "missing" / "checkpoints").exists()


@pytest.mark.slow
def test_preparation_errors_name_the_fix(tmp_path):
  run = _prepare(
    "imagenet",
    f"--input_dir={tmp_path / 'nowhere'}",
    f"--output_dir={tmp_path}",
    f"--vae={TINY_VAE}",
  )
  assert run.returncode == 2 and "does not exist" in run.stderr
  (tmp_path / "in" / "train").mkdir(parents=True)
  run = _prepare("imagenet", f"--input_dir={tmp_path / 'in'}", f"--output_dir={tmp_path}")
  assert run.returncode == 2 and "pass --vae=DIR" in run.stderr
  config = config_file("imagenet256:tiny")
  config.data.dir = str(tmp_path)
  with pytest.raises(
    ConfigError,
    match=r"data.dir='.*' is not a prepared dataset .*"
    r"python -m monoformer_jax.data.prepare imagenet",
  ):
    check_data(config)


# -------------------------------------------------------------- chat + text


@pytest.mark.slow
def test_chat_and_text_prepared_mixed_and_packed_with_loss_on_answers(tmp_path):
  chats = tmp_path / "chat.jsonl"
  chats.write_text(
    "\n".join(json.dumps({"data": [f"question {i}?", f"answer {i}."]}) for i in range(20)) + "\n"
  )
  texts = tmp_path / "text.jsonl"
  texts.write_text("\n".join(json.dumps({"text": f"plain text {i}."}) for i in range(20)))
  for kind, path in (("chat", chats), ("text", texts)):
    run = _prepare(kind, f"--input_dir={path}", f"--output_dir={tmp_path / 'out'}")
    assert run.returncode == 0, run.stderr[-3000:]
  config = config_file("t2i_chat")
  config.data.mix = dict(chat=1.0, text=1.0)
  config.data.dirs = dict(
    chat=builders.prepared_dir(str(tmp_path / "out"), "chat"),
    text=builders.prepared_dir(str(tmp_path / "out"), "text"),
  )
  config.data.update(tokenizer="bytes", seq_len=64, batch_size=4)
  config.model.vocab_size = 264
  check_data(config)
  tok = load_tokenizer("bytes")
  batch = next(make_batches(config, tok))
  decoded = [tok.decode(row) for row in batch["tokens"]]
  assert any("### Human: question" in d for d in decoded)
  assert any("plain text" in d for d in decoded)
  # Cross-entropy targets in chat rows are exactly the answers (and their eos).
  for row, weights in zip(batch["tokens"], batch["text_weights"]):
    text = tok.decode(row)
    if "### Human:" not in text:
      continue
    trained = tok.decode(row[1:][weights[:-1] > 0])
    assert trained.startswith("answer ") and "question" not in trained and "###" not in trained
