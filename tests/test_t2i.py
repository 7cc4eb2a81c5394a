"""Text-to-image on a user's own captions: a long caption cut as the reference
cuts it and counted (the packer, the training log), configs/t2i.py against the
reference's train_journeydb.py, and `sample.prompts` (a list or a file)."""

import importlib.util
import json
import logging

import numpy as np
import pytest
from helpers import on_one_device

from monoformer_jax.config import CONFIGS_DIR, base, complete, config_file
from monoformer_jax.data import datasets, prompts
from monoformer_jax.data.packing import PackedBatches, pack_examples
from monoformer_jax.errors import ConfigError, FileFormatError, MissingPathError
from monoformer_jax.layout import HOST_KEYS, RowSpec, batch_shapes, expanded_length
from monoformer_jax.text.tokenizer import load_tokenizer
from monoformer_jax.train.checks import check_train_config

TOK = load_tokenizer("bytes")
REFERENCE_SOURCE_MAX = 128  # configs/train_journeydb.py source_max_length


def _spec(seq_len, p=16, cond=True):
  return RowSpec(
    seq_len=seq_len,
    max_images=1,
    image_shape=(4, 4, 4),
    tokens_per_image=p,
    image_id=TOK.image_id,
    pad_id=TOK.pad_id,
    cond_token=cond,
  )


def _reference_ids(prompt: str, keep: int) -> list[int]:
  """What the reference's tokenize_conversation makes of `<s> prompt` cut at
  `keep` prompt ids (truncation from the right), then the image's side."""
  t = TOK
  source = ([t.bos_id] + list(t.encode(prompt)))[: 1 + keep]
  return source + [t.im_start_id, t.image_id, t.im_end_id] + list(t.encode("\n")) + [t.eos_id]


IMAGE = np.zeros((4, 4, 4), np.float32)


def test_a_long_caption_is_cut_from_its_end_to_fit_the_row_and_counted():
  spec = _spec(64)  # room: 64 - 16 - 1 + 1 = 48 ids, 6 of them fixed -> 42 prompt bytes
  room = prompts.caption_room(spec)
  assert room == 48
  long, short = "x" * 30 + "y" * 40, "a cat"
  cut = prompts.image_example(long, IMAGE, TOK, max_ids=room)
  assert list(cut.ids) == _reference_ids(long, 42) and cut.cut == 70 - 42
  assert expanded_length(cut, spec) == spec.seq_len  # exactly fills the row
  kept = prompts.image_example(short, IMAGE, TOK, max_ids=room)
  assert list(kept.ids) == _reference_ids(short, 5) and kept.cut == 0
  # A row that could hold the long caption whole still cuts it at the reference's
  # source_max_length: <s> and 127 prompt ids.
  wide = prompts.caption_room(_spec(512))
  very_long = "z" * 300
  at_limit = prompts.image_example(very_long, IMAGE, TOK, max_ids=wide)
  assert list(at_limit.ids) == _reference_ids(very_long, REFERENCE_SOURCE_MAX - 1)
  assert at_limit.cut == 300 - (REFERENCE_SOURCE_MAX - 1)
  # Packed: the rows say how many examples of each were cut; nothing raised.
  # Packed (one image a row): each row says how many of its examples were cut.
  stream = [cut, kept, kept, cut, cut, kept]
  batch = next(PackedBatches(lambda i: stream[i % 6], rows=4, spec=spec))
  assert batch["examples_cut"].tolist() == [1, 0, 0, 1]
  assert batch["examples_cut"].dtype == np.int32
  text = TOK.decode(batch["tokens"][0][batch["image_ids"][0] == 0])
  assert "x" * 30 + "y" * 12 in text and "y" * 13 not in text
  two = RowSpec(**{**_spec(128).__dict__, "max_images": 2})
  assert pack_examples([cut, cut, kept], two)["examples_cut"].tolist() == [2, 0]


def test_an_image_that_cannot_fit_a_row_still_raises():
  """Cutting the caption helps only when the image itself fits: an image of
  more tokens than the row's columns raises at the boundary, as before."""
  spec = _spec(16, p=16)
  example = prompts.image_example("a cat", IMAGE, TOK, max_ids=prompts.caption_room(spec))
  assert example.cut == 0  # nothing cut: no cut would make it fit
  # 11 ids (<s>, 5 bytes, <|im_start|> <image> <|im_end|> \n </s>), the image 16 + 1 for 1
  with pytest.raises(
    ConfigError, match=r"example 0 needs 27 tokens .* raise --config.data.seq_len to at least 27"
  ):
    pack_examples([example], spec)


def test_the_count_is_host_side_only():
  """The compiled step's batch has no count (it stays on the host)."""
  shapes = batch_shapes(config_file("t2i:tiny"))
  assert HOST_KEYS == ("examples_cut",) and not set(HOST_KEYS) & set(shapes)


# --------------------------------------------------------------- configs/t2i.py

# The reference's values (MonoFormer/MonoFormer at 8087266), written here, not
# read from our config: configs/train_journeydb.py, scripts/train_journeydb.sh,
# train.py's defaults, scripts/sample_t2i.sh.
JOURNEYDB = dict(
  llm_pretrained_path="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
  prompt_type="prompt",
  patch_size=2,
  in_channels=4,
  learn_sigma=True,
  decoder_t_embed="add_before_image_tokens",
  tokenizer_max_length=512,
  source_max_length=128,
  use_lr_decay=False,
  loss_dict={"loss_lm": 0.01, "loss_diffusion": 1.0},
)
JOURNEYDB_SH = dict(
  gradient_accumulation_steps=2,
  batch_size_per_gpu=16,
  nproc_per_node=8,
  lr=1e-4,
  max_grad_norm=2.0,
  max_steps=500_000,
  log_steps=100,
  resolution=256,
)
SAMPLE_T2I_SH = dict(steps=20, cfg=4.0)
ROWS = [
  ("data.name", "text_to_image"),
  ("model.conditioning", JOURNEYDB["decoder_t_embed"]),
  ("model.patch_size", JOURNEYDB["patch_size"]),
  ("model.in_channels", JOURNEYDB["in_channels"]),
  ("model.learn_sigma", JOURNEYDB["learn_sigma"]),
  ("model.image_size", JOURNEYDB_SH["resolution"] // 8),
  ("model.vocab_size", 32000 + 4),
  ("model.hidden_size", 2048),
  ("model.num_layers", 22),
  ("data.seq_len", JOURNEYDB["tokenizer_max_length"]),
  (
    "data.batch_size",
    JOURNEYDB_SH["batch_size_per_gpu"]
    * JOURNEYDB_SH["nproc_per_node"]
    * JOURNEYDB_SH["gradient_accumulation_steps"],
  ),
  ("data.cfg_drop_prob", 0.1),
  ("data.random_flip", False),
  ("data.latent_sample", True),
  ("loss.w_lm", JOURNEYDB["loss_dict"]["loss_lm"]),
  ("loss.w_diff", JOURNEYDB["loss_dict"]["loss_diffusion"]),
  ("optim.lr", JOURNEYDB_SH["lr"]),
  ("optim.schedule", "constant"),
  ("optim.weight_decay", 0.0),
  ("optim.grad_clip", JOURNEYDB_SH["max_grad_norm"]),
  ("optim.ema_decay", 0.9999),
  ("train.num_steps", JOURNEYDB_SH["max_steps"]),
  ("train.log_every", JOURNEYDB_SH["log_steps"]),
  ("sample.num_steps", SAMPLE_T2I_SH["steps"]),
  ("sample.cfg_scale", SAMPLE_T2I_SH["cfg"]),
  ("seed", 0),
  ("data.tokenizer", JOURNEYDB["llm_pretrained_path"].split("/")[1]),
  ("train.init_from", JOURNEYDB["llm_pretrained_path"].split("/")[1] + "-monoformer"),
]


def _get(config, path):
  for name in path.split("."):
    config = config[name]
  return config


@pytest.mark.parametrize("field, value", ROWS, ids=[r[0] for r in ROWS])
def test_t2i_is_the_references_journeydb_setting(field, value):
  assert _get(config_file("t2i"), field) == value


def test_t2i_table_and_checks(tmp_path, monkeypatch):
  assert prompts.PROMPT_MAX_IDS == JOURNEYDB["source_max_length"]
  spec = importlib.util.spec_from_file_location("t2i", CONFIGS_DIR / "t2i.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for key in [*JOURNEYDB, "vae_pretrained_path", "--max_grad_norm", "--text_dropout_prob"]:
    assert key in module.__doc__, key
  for path, _ in ROWS:
    assert path.split(".")[-1] in module.__doc__, path
  c = config_file("t2i")
  assert complete(c).to_dict() == c.to_dict()
  assert c.sample.num_per_class == 0 and c.sample.prompts == () and dict(c.data.mix) == {}
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ConfigError, match="train.init_from='TinyLlama-1.1B-Chat-v1.0-monoformer'"):
    check_train_config(c, reads_data=False)
  (tmp_path / c.train.init_from).mkdir()
  assert check_train_config(c, reads_data=False).to_dict() == c.to_dict()
  tiny = config_file("t2i:tiny")
  assert check_train_config(tiny, reads_data=False).data.name == "text_to_image"
  assert base().sample.prompts == ()


# ------------------------------------------------------------ runs and samples

TINY_VAE = CONFIGS_DIR.parent / "tests" / "fixtures" / "tiny_vae"


def _prepared(folder, captions):
  rng = np.random.default_rng(0)
  records = [
    dict(
      key=f"{i:03d}",
      prompt=caption,
      caption="",
      mean=rng.standard_normal((8, 8, 4)).astype(np.float32),
      std=np.full((8, 8, 4), 0.1, np.float32),
    )
    for i, caption in enumerate(captions)
  ]
  return datasets.source("text_to_image").write(
    str(folder), {"train": lambda: iter(records)}, latent_shape=(8, 8, 4)
  )


def _grid_cell(png: np.ndarray, i: int, cols: int, size: int, scale: int) -> np.ndarray:
  """Image i of an image_grid PNG (1-pixel white borders), one pixel per pixel."""
  r, c = divmod(i, cols)
  side = size * scale + 1
  cell = png[1 + r * side : 1 + r * side + size * scale, 1 + c * side : 1 + c * side + size * scale]
  return cell[::scale, ::scale]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_run_on_long_captions_counts_the_cuts_and_draws_its_prompts_file(tmp_path, caplog):
  """Every caption is longer than a tiny row holds beside its image: none is
  fatal, every example is cut, and each log line and metrics.jsonl row says
  how many (8 rows of one image a step); the end-of-run images are drawn from
  a prompts file, one per line."""
  from monoformer_jax.train.loop import train_and_evaluate

  room = 96 - 16 - 1 + 1  # t2i:tiny: seq_len 96, 16 image tokens and a timestep token
  captions = [f"caption {i} " + "long " * 40 for i in range(12)]
  assert all(len(c) > room for c in captions)
  config = config_file("t2i:tiny")
  config.data.dir = _prepared(tmp_path / "data", captions)
  config.data.cfg_drop_prob = 0.0  # every example keeps (and so cuts) its caption
  config.vae.path = str(TINY_VAE)
  lines = ["a red square", "a blue circle on grass", "three green dots"]
  (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n\n")
  config.sample.prompts = (str(tmp_path / "prompts.txt"),)
  config.sample.num_steps = 1
  with on_one_device(), caplog.at_level(logging.INFO, logger="absl"):
    state, _, _ = train_and_evaluate(config, str(tmp_path / "run"))
  assert int(state["step"]) == 4
  rows = [
    json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  ]
  rows = [r for r in rows if "loss" in r]
  assert [r["examples_cut"] for r in rows] == [8, 8, 8, 8]
  logged = [m for m in caplog.messages if m.startswith("step ")]
  assert len(logged) == 4
  assert all(m.endswith("8 examples cut to fit a row since the last line") for m in logged)
  saved = np.load(tmp_path / "run" / "samples" / "prompts.npz")
  assert saved["prompts"].tolist() == lines
  images = saved["images"]
  assert images.shape == (3, 16, 16, 3) and 0 <= images.min() and images.max() <= 1
  from PIL import Image

  png = np.asarray(Image.open(tmp_path / "run" / "samples" / "prompts.png"))
  assert png.shape == (1 + 2 * 16 + 1, 1 + 3 * (2 * 16 + 1), 3)  # one row of 3, scale 2
  for i in range(3):
    want = (np.clip(images[i], 0, 1) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(_grid_cell(png, i, 3, 16, 2), want)


def test_a_missing_prompts_file_stops_the_run_before_its_first_step(tmp_path, caplog):
  from monoformer_jax.train.loop import train_and_evaluate

  config = config_file("t2i:tiny")
  config.data.dir = _prepared(tmp_path / "data", ["a cat"] * 2)
  config.vae.path = str(TINY_VAE)
  config.sample.prompts = (str(tmp_path / "nowhere.txt"),)
  with caplog.at_level(logging.INFO, logger="absl"), pytest.raises(MissingPathError) as caught:
    train_and_evaluate(config, str(tmp_path / "run"))
  assert str(caught.value) == (
    f"sample.prompts: {str(tmp_path / 'nowhere.txt')!r} is not there; give a text file of "
    "image prompts, one per line"
  )
  assert "compiling the train step" not in caplog.text
  assert not (tmp_path / "run").exists()


# -------------------------------------------------- evaluate: FID from a folder

# Runs `evaluate.main` on each (argv, may_load) of a JSON list, in one process:
# the Inception network replaced by a cheap feature map (6 features: each
# channel's mean and standard deviation), so FID is the Frechet distance of
# those, and the prompts each sampling call draws recorded; a case that may not
# load has the model loader replaced by a failure (its refusal must come first).
_CASES = r"""
import contextlib, io, json, sys
import numpy as np
from absl import app, flags
from monoformer_jax import evaluate, inference
from monoformer_jax.errors import UserError
from monoformer_jax.eval import inception, sampling
from monoformer_jax.eval.image_metrics import InceptionMetrics

def toy(images):
  x = np.asarray(images, np.float64) / 255.0
  return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)

inception.load_inception = lambda path: None
InceptionMetrics._features = lambda self, images, what: {"pool": toy(images)}
drawn = []
real_generate = inference.generate_images
def spy(model, tokenizer, prompts, **kw):
  drawn.append(list(prompts))
  return real_generate(model, tokenizer, prompts, **kw)
sampling.inference.generate_images = spy
real_loader = evaluate.model_on_mesh
def loaded(*_, **__):
  raise AssertionError("loaded a model before checking")

for argv, may_load in json.loads(sys.argv[1]):
  evaluate.model_on_mesh = real_loader if may_load else loaded
  flags.FLAGS.unparse_flags()
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      evaluate.main(flags.FLAGS(["evaluate", *argv]))
    error = "no error"
  except (app.UsageError, UserError) as e:
    error = f"{type(e).__name__}: {e}"
  print(json.dumps([error, drawn]))
  drawn = []
"""


def _toy_features(images) -> np.ndarray:
  x = np.asarray(images, np.float64) / 255.0
  return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)


def _frechet(a, b) -> float:
  from scipy import linalg

  mu_a, mu_b = a.mean(0), b.mean(0)
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = linalg.sqrtm(s_a @ s_b).real
  return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def _adm_crop_16(path) -> np.ndarray:
  """A 40x24 image as ADM crops it to 16: bicubic to 27x16, the centre 16 columns."""
  from PIL import Image

  image = Image.open(path).convert("RGB").resize((27, 16), Image.BICUBIC)
  return np.asarray(image.crop((5, 0, 21, 16)))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_evaluate_fid_of_a_prompts_file_against_a_folder_of_images(tmp_path):
  """`evaluate --prompts=FILE --reference=FOLDER`: 8 samples of 3 prompts
  (prompt i mod 3), FID against the folder's images ADM-cropped to the
  samples' 16x16, equal to numpy's Frechet distance of the same features of
  the saved samples and of the images cropped here with PIL. Bad inputs are
  refused before the model loads."""
  import shutil
  import subprocess
  import sys

  from helpers import one_device_env, random_checkpoint
  from PIL import Image

  config = config_file("t2i:tiny")
  ck = str(random_checkpoint(tmp_path / "ck", config))
  lines = ["a red square", "a blue circle", "three green dots"]
  (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
  (tmp_path / "empty.txt").write_text("\n\n")
  (tmp_path / "long.txt").write_text("a cat\n" + "a very long prompt " * 6 + "\n")
  ref = tmp_path / "ref"
  (ref / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(9):
    pixels = rng.integers(0, 256, (24, 40, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(ref / ("sub" if i % 2 else "") / f"r{i}.png")
  (ref / "notes.txt").write_text("not an image")
  few = tmp_path / "few"
  few.mkdir()
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (24, 40, 3)).astype(np.uint8)).save(few / f"{i}.png")
  (tmp_path / "none").mkdir()
  broken = tmp_path / "broken"
  shutil.copytree(ref, broken)
  (broken / "sub" / "r3.png").write_bytes((ref / "sub" / "r3.png").read_bytes()[:60])
  (tmp_path / "inc.pth").write_bytes(b"replaced")  # the network is the script's toy
  base = [
    f"--checkpoint={ck}",
    f"--vae={TINY_VAE}",
    "--metrics=fid",
    "--num_samples=8",
    "--num_steps=2",
    "--cfg_scale=4",
    f"--inception={tmp_path / 'inc.pth'}",
  ]
  good = [*base, f"--prompts={tmp_path / 'prompts.txt'}", f"--reference={ref}"]
  cases = [
    ([*base, f"--prompts={tmp_path / 'nowhere.txt'}", f"--reference={ref}"], False),
    ([*base, f"--prompts={tmp_path / 'empty.txt'}", f"--reference={ref}"], False),
    ([*base, f"--prompts={tmp_path / 'prompts.txt'}", f"--reference={tmp_path / 'none'}"], False),
    ([*base, f"--prompts={tmp_path / 'prompts.txt'}", f"--reference={few}"], False),
    ([*base, f"--prompts={tmp_path / 'long.txt'}", f"--reference={ref}"], False),
    ([*base, f"--prompts={tmp_path / 'prompts.txt'}", f"--reference={broken}"], False),
    ([*base[:-1], f"--prompts={tmp_path / 'prompts.txt'}", "--metrics=commonsense"], False),
    ([*good, f"--sample_dir={tmp_path / 's'}", f"--output={tmp_path / 'r.json'}"], True),
  ]
  run = subprocess.run(
    [sys.executable, "-c", _CASES, json.dumps(cases)],
    cwd=CONFIGS_DIR.parent,
    env=one_device_env(),  # one device: no collectives to compile
    capture_output=True,
    text=True,
    timeout=280,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  outcomes = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("[")]
  missing, empty, no_images, too_few, long, broken_image, no_sample_metric, ran = outcomes
  # A damaged reference image stops the run before the model loads, not after sampling.
  assert broken_image == [
    f"FileFormatError: reference folder {broken}: image {broken / 'sub' / 'r3.png'}: its PNG "
    "data cannot be decoded (image file is truncated); the file is damaged: re-download or "
    "re-save it (or remove it)",
    [],
  ]
  # 114 bytes of prompt, <s>, <|im_start|>, then the image's 16 + 1 columns: past 96.
  assert long[0] == (
    "ConfigError: --prompts[1] takes 116 positions and its image takes 17: 133 in all, past the 96 "
    "of the rows the model was trained on (data.seq_len); shorten it by 37 tokens"
  )
  assert no_sample_metric[0] == (
    "UsageError: --prompts are drawn for the sample metrics, and --metrics=commonsense names "
    "none; leave --prompts out"
  )
  assert missing == [
    f"MissingPathError: --prompts: {str(tmp_path / 'nowhere.txt')!r} is not there; give a "
    "text file of image prompts, one per line",
    [],
  ]
  assert empty[0] == (
    f"FileFormatError: --prompts: {tmp_path / 'empty.txt'} holds no prompt; write one "
    "prompt per line"
  )
  assert no_images[0].startswith(
    f"FileFormatError: reference folder {tmp_path / 'none'} holds no image (.png,"
  )
  assert too_few[0] == (
    f"FileFormatError: reference folder {few} holds 3 image(s), fewer than the 8 samples of "
    f"the sampling run of {ck} (--num_samples=8): score at most 3 samples "
    "(--num_samples=3) or give a folder of more reference images"
  )
  assert ran[0] == "no error"
  assert ran[1] == [[lines[i % 3] for i in range(8)]]  # one chunk of 8, prompt i mod 3
  with np.load(tmp_path / "s" / "samples.npz") as z:
    samples, labels = z["arr_0"], z["arr_1"]
  assert samples.shape == (8, 16, 16, 3) and labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
  files = sorted((p for p in ref.rglob("*.png")), key=lambda p: str(p.relative_to(ref)))
  reference = np.stack([_adm_crop_16(p) for p in files])
  assert reference.shape == (9, 16, 16, 3)
  want = _frechet(_toy_features(samples), _toy_features(reference))
  got = json.loads((tmp_path / "r.json").read_text())
  assert got["fid"] == pytest.approx(want, rel=1e-6)
  assert got["samples"]["prompts"]["count"] == 3
  assert json.loads((tmp_path / "s" / "run.json").read_text())["prompts"]["count"] == 3


@pytest.mark.timeout(120)
def test_sample_prompts_from_a_list_make_the_end_of_run_images(tmp_path):
  """write_samples (the end of a run) draws one image per prompt of the list:
  the saved images are what the sampler draws for those prompts with
  config.sample's steps, guidance and seed, decoded by vae.path."""
  from helpers import random_model

  from monoformer_jax import inference
  from monoformer_jax.train.samples import write_samples

  config = config_file("t2i:tiny")
  config.vae.path = str(TINY_VAE)
  config.sample.num_steps = 1
  assert config.sample.prompts == ("a red square", "a blue circle")
  model, tok = random_model(config), inference.tokenizer_of(config)
  with on_one_device():
    write_samples(model, config, tok, str(tmp_path / "samples"))
    x0 = inference.generate_images(
      model,
      tok,
      ["a red square", "a blue circle"],
      num_steps=1,
      cfg_scale=4.0,
      seed=0,
      config=config,
      batch_size=config.data.batch_size,
    )
  want = inference.to_pixels(x0, config, inference.load_vae_of(config))
  saved = np.load(tmp_path / "samples" / "prompts.npz")
  assert saved["prompts"].tolist() == ["a red square", "a blue circle"]
  np.testing.assert_allclose(saved["images"], want, atol=1e-6)
  assert saved["images"].shape == (2, 16, 16, 3)
  assert (tmp_path / "samples" / "prompts.png").is_file()
  assert not (tmp_path / "samples" / "text_to_image.npz").exists()  # no class samples
  summary = json.loads((tmp_path / "samples" / "summary.json").read_text())
  assert summary["num_samples"] == 0 and summary["prompt_images"] == 2


def test_sample_prompts_bad_values_are_refused_naming_the_fix(tmp_path):
  """Each refused with one line, at the config check or when a run starts."""
  with pytest.raises(ConfigError, match=r"sample.prompts\[1\]=' ': is empty; give each image"):
    complete(dict(sample=dict(prompts=("a cat", " "))))
  with pytest.raises(ConfigError, match="must be a list of strings"):
    complete(dict(sample=dict(prompts="a cat")))
  gap = tmp_path / "gap.txt"
  gap.write_text("a cat\n\na dog\n")
  with pytest.raises(FileFormatError) as caught:
    prompts.read_prompts((str(gap),))
  assert str(caught.value) == (
    f"sample.prompts: line 2 of {gap} is blank between prompts; give one prompt per line, "
    "with no blank line"
  )
  (tmp_path / "dir.txt").mkdir()
  with pytest.raises(MissingPathError, match=r"'.*dir.txt' is a folder; give a text file"):
    prompts.read_prompts((str(tmp_path / "dir.txt"),))
  latin = tmp_path / "latin.txt"
  latin.write_bytes("caf\xe9\n".encode("latin-1"))
  with pytest.raises(FileFormatError, match=r"latin.txt is not UTF-8 text .* save it as UTF-8"):
    prompts.read_prompts(str(latin))
  # Two entries are prompts, even one ending in .txt; trailing blank lines end a file.
  assert prompts.read_prompts(("a cat", "notes.txt")) == ["a cat", "notes.txt"]
  gap.write_text("a cat\na dog\n\n\n")
  assert prompts.read_prompts((str(gap),)) == ["a cat", "a dog"]
  # A byte-order mark and CRLF line ends (a Windows editor's file) are not prompt text.
  gap.write_bytes(b"\xef\xbb\xbfa cat\r\na dog\r\n")
  assert prompts.read_prompts((str(gap),)) == ["a cat", "a dog"]
  # A prompt whose image does not fit the rows stops the run when it starts.
  from monoformer_jax.text.tokenizer import tokenizer_of
  from monoformer_jax.train.samples import check_samples

  config = config_file("t2i:tiny")
  config.sample.prompts = ("a cat", "x" * 80)
  with pytest.raises(ConfigError, match=r"^sample.prompts\[1\] takes 82 positions and its image"):
    check_samples(config, tokenizer_of(config))


@pytest.mark.timeout(60)
def test_prompts_and_a_reference_folder_on_a_bucket(gcs_path, tmp_path):
  """sample.prompts / --prompts and --reference=FOLDER read from gs:// as from
  a local folder (a subfolder and a non-image file included); a missing
  prompts file there is one line naming it."""
  from etils import epath
  from PIL import Image

  from monoformer_jax.eval import fid

  rng = np.random.default_rng(2)
  local = tmp_path / "ref"
  (local / "sub").mkdir(parents=True)
  for name in ("b.png", "sub/a.png"):
    Image.fromarray(rng.integers(0, 256, (24, 40, 3)).astype(np.uint8)).save(local / name)
  (local / "notes.txt").write_text("not an image")
  for path in local.rglob("*"):
    if path.is_file():
      epath.Path(f"{gcs_path}/ref/{path.relative_to(local)}").write_bytes(path.read_bytes())
  epath.Path(f"{gcs_path}/p.txt").write_bytes(b"a cat\na dog\n")
  assert prompts.read_prompts((f"{gcs_path}/p.txt",)) == ["a cat", "a dog"]
  with pytest.raises(MissingPathError) as caught:
    prompts.read_prompts(f"{gcs_path}/none.txt", "--prompts")
  assert str(caught.value) == (
    f"--prompts: '{gcs_path}/none.txt' is not there; give a text file of image prompts, one "
    "per line"
  )
  remote, here = fid.reference_of(f"{gcs_path}/ref"), fid.reference_of(str(local))
  assert isinstance(remote, fid.ReferenceFolder) and remote.num_images == here.num_images == 2
  shape = (2, 16, 16, 3)
  np.testing.assert_array_equal(remote.images_like(shape), here.images_like(shape))
  np.testing.assert_array_equal(
    here.images_like(shape), np.stack([_adm_crop_16(local / n) for n in ("b.png", "sub/a.png")])
  )
