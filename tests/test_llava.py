"""LLaVA's instruction data: reading and checking the annotations, the example
of a record, preparation into array_record, and the `llava` stream (alone and
mixed with text_to_image) packed into rows that read their image."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from monoformer_jax.config import CONFIGS_DIR, config_file
from monoformer_jax.data import builders, datasets, prompts
from monoformer_jax.data.datasets import check_data, make_batches
from monoformer_jax.data.sources import llava
from monoformer_jax.errors import ConfigError, FileFormatError, MissingPathError
from monoformer_jax.model.clip import read_clip_config
from monoformer_jax.text.tokenizer import load_tokenizer

REPO = CONFIGS_DIR.parent
TINY_CLIP = REPO / "tests" / "fixtures" / "tiny_clip"
TOK = load_tokenizer("bytes")


def _conv(*values):
  return [{"from": ("human", "gpt")[k % 2], "value": v} for k, v in enumerate(values)]


LONG_ANSWER = "Once upon a time. " * 12
# id -> (image, conversation): what the annotation file holds, in order.
RECORDS = [
  dict(
    id="a",
    image="coco/a.png",
    conversations=_conv("<image>\nWhat color is it?", "Red.", "Are you sure?", "Yes, red."),
  ),
  dict(
    id="b", image="coco/b.jpg", conversations=_conv("Describe this.\n<image>", "A blue square.")
  ),
  dict(id="broken", image="coco/broken.jpg", conversations=_conv("<image>\nWhat?", "Noise.")),
  dict(id="gone", image="coco/missing.jpg", conversations=_conv("<image>\nWhat?", "Gone.")),
  dict(id="gpt_first", conversations=[{"from": "gpt", "value": "Hi."}]),
  dict(id="text", conversations=_conv("Name a prime?", "Seven.")),
  dict(id="two_markers", image="coco/a.png", conversations=_conv("<image> <image>?", "No.")),
  dict(id="no_marker", image="coco/c.png", conversations=_conv("What shape?", "Square.")),
  dict(id="long", image="coco/b.jpg", conversations=_conv("<image>\nTell a story?", LONG_ANSWER)),
]
ANSWERS = ("Red.", "Yes, red.", "A blue square.", "Noise.", "Seven.", "Square.", LONG_ANSWER)


def _write_images(root):
  (root / "coco").mkdir(parents=True)
  rng = np.random.default_rng(0)
  Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "coco" / "a.png")
  Image.new("L", (24, 36), 90).save(root / "coco" / "c.png")
  noise = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
  noise.save(root / "coco" / "b.jpg", quality=90)
  data = (root / "coco" / "b.jpg").read_bytes()
  (root / "coco" / "broken.jpg").write_bytes(data[: len(data) // 2])  # header, then cut


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """(annotations json, image root) of RECORDS."""
  base = tmp_path_factory.mktemp("llava")
  _write_images(base / "images")
  annotations = base / "mix.json"
  annotations.write_text(json.dumps(RECORDS, indent=1))
  return annotations, base / "images"


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory):
  """The `prepare llava` command's folder and log."""
  annotations, root = source
  out = tmp_path_factory.mktemp("prepared")
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "monoformer_jax.data.prepare",
      "llava",
      f"--input_dir={root}",
      f"--annotations={annotations}",
      f"--output_dir={out}",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert run.returncode == 0, run.stderr[-3000:]
  return builders.prepared_dir(str(out), "llava"), run.stderr


def _config(folder="", **data):
  """configs/digits.py:tiny's model reading through the tiny CLIP fixture."""
  c = config_file("digits:tiny")
  c.model.update(
    vision_encoder="clip",
    vision=read_clip_config(TINY_CLIP),
    conditioning="add_before_image_tokens",
  )
  c.data.update(
    name="llava", dir=folder, max_read_images_per_row=1, seq_len=128, batch_size=4, prefetch=0
  )
  c.data.update(data)
  return c


# ----------------------------------------------------------------------------- reader


def test_reader_keeps_checked_records_and_counts_the_rest(source, tmp_path):
  annotations, root = source
  reader = llava.read_llava(annotations, root)
  kept = list(reader)
  r = reader.report
  assert [k["key"].split(":")[1] for k in kept] == ["a", "b", "broken", "text", "no_marker", "long"]
  assert (r.records, r.kept, r.text_only, r.malformed, r.missing_images) == (9, 6, 1, 2, 1)
  assert any("missing.jpg" in reason for reason in r.reasons)
  assert any("expected 'human'" in reason for reason in r.reasons)
  assert any("2 '<image>' markers but 1 image" in reason for reason in r.reasons)
  assert kept[0]["turns"][1] == {"role": "assistant", "content": "Red."}
  assert kept[0]["image"] == os.path.join(root, "coco/a.png")
  assert kept[3]["image"] is None
  # JSON lines read the same; a line that is not JSON is one more malformed record.
  lines = tmp_path / "mix.jsonl"
  lines.write_text("\n".join(json.dumps(x) for x in RECORDS) + "\n{not json\n\n")
  again = llava.read_llava(lines, root)
  assert [k["turns"] for k in again] == [k["turns"] for k in kept]
  assert (again.report.records, again.report.malformed) == (10, 3)


def test_bad_paths_and_files_raise_naming_them(source, tmp_path):
  annotations, root = source
  with pytest.raises(MissingPathError, match=r"nowhere.json.*llava_v1_5_mix665k.json"):
    llava.read_llava(tmp_path / "nowhere.json", root)
  with pytest.raises(MissingPathError, match=r"image root .*no_root.*relative to"):
    llava.read_llava(annotations, tmp_path / "no_root")
  (tmp_path / "object.json").write_text('{"conversations": []}')
  with pytest.raises(FileFormatError, match=r"not a list of records"):
    list(llava.read_llava(tmp_path / "object.json", root))
  (tmp_path / "broken.json").write_text('[{"id": 1},')
  with pytest.raises(FileFormatError, match=r"not valid JSON"):
    list(llava.read_llava(tmp_path / "broken.json", root))


# ----------------------------------------------------------------------------- examples


def _turns(*values):
  return [{"role": ("user", "assistant")[k % 2], "content": v} for k, v in enumerate(values)]


def test_the_image_sits_inside_im_start_im_end_where_the_marker_was():
  image = np.zeros((32, 32, 3), np.float32)
  ex = llava.llava_example(
    _turns("Look:\n<image>\nWhat color?", "Red.", "Sure?", "Yes."), image, TOK
  )
  ids = list(ex.ids)
  at = ids.index(TOK.image_id)
  assert ids[at - 1 : at + 2] == [TOK.im_start_id, TOK.image_id, TOK.im_end_id]
  assert TOK.decode(ids[: at - 1]).endswith("### Human: Look:\n")  # the text before the marker
  assert TOK.decode(ids[at + 2 :]).startswith("\nWhat color?")  # its newline kept
  assert ex.read == [True] and ex.images[0].shape == (32, 32, 3) and ids.count(TOK.image_id) == 1
  # Cross-entropy exactly on the answers and the eos closing each.
  trained = [i for i, m in zip(ids, ex.text_mask) if m]
  assert trained == TOK.encode("Red.") + [TOK.eos_id] + TOK.encode("Yes.") + [TOK.eos_id]
  # No marker: the image opens the first question, then "\n", as LLaVA places it.
  ex = llava.llava_example(_turns("What shape?", "Square."), image, TOK, template="concat")
  assert list(ex.ids[:5]) == [
    TOK.bos_id,
    TOK.im_start_id,
    TOK.image_id,
    TOK.im_end_id,
    TOK.encode("\n")[0],
  ]
  # The trained format begins with the prompt a reading model is sampled with.
  prompt = prompts.read_prompt_example("What shape?", image, TOK)
  assert list(ex.ids[: len(prompt.ids)]) == list(prompt.ids)
  # With train_on_source every token trains but bos and the placeholder.
  ex = llava.llava_example(_turns("<image>\nQ?", "A."), image, TOK, train_on_source=True)
  assert [i for i, m in zip(ex.ids, ex.text_mask) if not m] == [TOK.bos_id, TOK.image_id]
  text = llava.llava_example(_turns("Q?", "A."), None, TOK)
  assert text.images == () and text.read is None
  with pytest.raises(ValueError, match="1 '<image>' markers but 0 image"):
    llava.llava_example(_turns("<image>\nQ?", "A."), None, TOK)


def test_configs_that_cannot_read_llava_name_the_fix():
  with pytest.raises(ConfigError, match=r"vision_encoder is ''.*vision_encoder=clip"):
    llava.LlavaExamples(_with(model=dict(vision_encoder="")), TOK)
  with pytest.raises(
    ConfigError,
    match=r"'vae' on a latent model.*use "
    r"model.vision_encoder='clip'.*or a pixel model",
  ):
    llava.LlavaExamples(_with(model=dict(vision_encoder="vae")), TOK)
  with pytest.raises(ConfigError, match=r"max_read_images_per_row=0.*=1"):
    llava.LlavaExamples(_with(data=dict(max_read_images_per_row=0)), TOK)
  with pytest.raises(ConfigError, match=r"seq_len=16 .*raise --config.data.seq_len"):
    llava.LlavaExamples(_with(data=dict(seq_len=16)), TOK)
  with pytest.raises(ConfigError, match=r"data.dir is empty.*prepare llava"):
    check_data(_config())


def _with(model=(), data=()):
  c = _config()
  c.model.update(dict(model))
  c.data.update(dict(data))
  return c


# ------------------------------------------------------------------- prepared records


@pytest.mark.slow
def test_prepare_writes_the_kept_records_and_reports_the_skipped(prepared, source):
  folder, log = prepared
  _, root = source
  assert "skipped 2 malformed and 1 whose image is missing" in log and "missing.jpg" in log
  assert "llava records" in log  # the progress bar
  records = builders.data_source(folder, "train", kind="llava")
  by_id = {
    r["key"].decode().split(":")[1]: r for r in map(records.__getitem__, range(len(records)))
  }
  assert sorted(by_id) == sorted(["a", "b", "broken", "text", "no_marker", "long"])
  assert by_id["b"]["image"] == (root / "coco" / "b.jpg").read_bytes()  # the file, as it is
  assert by_id["text"]["image"] == b""
  assert json.loads(by_id["a"]["conversation"]) == _turns(
    "<image>\nWhat color is it?", "Red.", "Are you sure?", "Yes, red."
  )
  to_example = llava.LlavaExamples(_config(folder), TOK)
  ex = to_example(by_id["long"])  # cut at the end to fit a row with its 16 + 1 image tokens
  assert len(ex.ids) == 128 - 17 + 1 and to_example.cut == 1 and ex.read == [True]
  full = llava.llava_example(
    json.loads(by_id["long"]["conversation"]),
    ex.images[0],
    TOK,
    template=to_example.template,
    train_on_source=to_example.train_on_source,
  )
  # The example says how much went (the training log counts it: Example.cut).
  assert ex.cut == len(full.ids) - len(ex.ids) > 0 and list(ex.ids) == list(full.ids)[: len(ex.ids)]
  ex = to_example(by_id["no_marker"])
  assert ex.images[0].shape == (32, 32, 3) and ex.images[0].dtype == np.float32
  with pytest.raises(llava.SkippedRecord, match="broken.*not readable"):
    to_example(by_id["broken"])


def _answers_only(batch):
  """Every row's cross-entropy targets are whole answers (and eos) only."""
  for tokens, weights in zip(batch["tokens"], batch["text_weights"]):
    trained = TOK.decode(tokens[1:][weights[:-1] > 0])
    for answer in sorted(ANSWERS, key=len, reverse=True):
      trained = trained.replace(answer, "")
    assert trained == "" or set(trained) <= set("Once upon a time. "), trained


@pytest.mark.slow
def test_the_llava_stream_skips_the_broken_image_and_packs_reading_rows(prepared):
  folder, _ = prepared
  config = _config(folder)
  check_data(config)
  stream = datasets.source("llava").examples(config, TOK, 0)
  examples = [stream(i) for i in range(12)]  # two epochs of 6 records
  assert stream.skipped["unreadable image"] >= 2 and set(stream.skipped) == {"unreadable image"}
  assert all(ex.read == [True] or not ex.images for ex in examples)
  again = datasets.source("llava").examples(config, TOK, 0)
  assert [list(again(i).ids) for i in range(12)] == [list(ex.ids) for ex in examples]
  batch = next(make_batches(config, TOK))
  assert batch["read_images"].shape == (4, 1, 32, 32, 3) and batch["read_valid"].sum() >= 2
  assert not batch["image_valid"].any()
  valid = batch["read_valid"][:, 0]
  cols = batch["read_columns"][valid, 0]
  rows = np.flatnonzero(valid)
  for r, c in zip(rows, cols):
    assert (batch["tokens"][r, c] == TOK.image_id).all()
    assert batch["tokens"][r, c[0] - 2] == TOK.im_start_id  # then the timestep token
    assert batch["tokens"][r, c[-1] + 1] == TOK.im_end_id
    assert batch["read_cond_columns"][r, 0] == c[0] - 1
  assert batch["text_weights"].sum() > 0
  _answers_only(batch)


@pytest.mark.slow
def test_llava_mixes_with_text_to_image(prepared, tmp_path):
  folder, _ = prepared
  rng = np.random.default_rng(0)
  latents = [
    dict(
      key=f"{i:03d}",
      prompt=f"a red square {i}",
      caption="",
      mean=rng.standard_normal((8, 8, 1)).astype(np.float32),
      std=np.full((8, 8, 1), 0.1, np.float32),
    )
    for i in range(6)
  ]
  t2i = datasets.source("text_to_image").write(
    str(tmp_path), {"train": lambda: iter(latents)}, latent_shape=(8, 8, 1)
  )
  config = _config("", name="mix", batch_size=8)
  config.data.mix = {"text_to_image": 1, "llava": 1}
  config.data.dirs = {"text_to_image": t2i, "llava": folder}
  check_data(config)
  batch = next(make_batches(config, TOK))
  assert batch["image_valid"].any() and batch["read_valid"].any()
  assert batch["latents"].shape == (8, 1, 8, 8, 1)
  decoded = [TOK.decode(row) for row in batch["tokens"]]
  assert any("a red square" in d for d in decoded) and any("### Assistant:" in d for d in decoded)
  _answers_only(batch)


def test_t2i_llava_config():
  from monoformer_jax.layout import read_image_spec
  from monoformer_jax.train.checks import check_train_config

  c = config_file("t2i_llava")
  check_train_config(c, reads_data=False)
  assert read_image_spec(c.model) == ((224, 224, 3), 256)
  assert c.model.vision.to_dict() == dict(
    hidden_size=1024,
    mlp_dim=4096,
    num_layers=24,
    num_heads=16,
    image_size=224,
    patch_size=14,
    num_channels=3,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
  )
  assert dict(c.data.mix) == {"text_to_image": 1.0, "llava": 1.0}
  assert c.model.conditioning == "add_before_image_tokens" and c.data.seq_len == 512
  assert c.data.max_read_images_per_row == 1
