"""Evaluation end to end: resumable sampling runs, the digits metric, the
`python -m monoformer_jax.evaluate` CLI and the evaluators inside training."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from helpers import digits_config

from monoformer_jax import inference
from monoformer_jax.checkpoints import load_model, save_model
from monoformer_jax.digits import evaluators as digits
from monoformer_jax.errors import ConfigError, FileFormatError
from monoformer_jax.eval.registry import check_metrics, make
from monoformer_jax.eval.sampling import _write_npz, chunk_seed, class_labels, quantize, sample_run
from monoformer_jax.eval.score import score_images

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_and_config(digits_checkpoint):
  model, config = load_model(digits_checkpoint)
  return model, config, inference.tokenizer_of(config)


def test_labels_uniform_or_balanced():
  uniform = class_labels(20_000, 10, seed=1)
  counts = np.bincount(uniform, minlength=10)
  assert counts.sum() == 20_000 and abs(counts - 2000).max() < 5 * np.sqrt(2000)  # ~5 sigma
  assert not np.array_equal(uniform, class_labels(20_000, 10, seed=2))
  np.testing.assert_array_equal(uniform, class_labels(20_000, 10, seed=1))
  balanced = class_labels(1003, 10, seed=1, balanced=True)
  np.testing.assert_array_equal(np.bincount(balanced), [101] * 3 + [100] * 7)
  assert (np.diff(balanced[:20]) != 1).any()  # shuffled, not 0, 1, 2, ...
  assert chunk_seed(0, 1) != chunk_seed(0, 2) and chunk_seed(0, 1) == chunk_seed(0, 1)


def test_quantize_rounds_as_the_reference():
  """The reference: clamp(127.5 x + 128, 0, 255).to(uint8) of x in [-1, 1]."""
  x = np.random.default_rng(0).uniform(-1.2, 1.2, (1000,)).astype(np.float32)
  reference = np.clip(127.5 * x + 128.0, 0, 255).astype(np.uint8)  # truncation, as torch
  ours = quantize((x + 1) / 2)
  assert (np.abs(ours.astype(int) - reference.astype(int)) <= 1).all()
  assert (ours == reference).mean() > 0.99  # they differ only at float rounding of .5


def test_streamed_npz_equals_numpy(tmp_path):
  rng = np.random.default_rng(0)
  parts = [rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8) for n in (3, 5, 2)]
  labels = [rng.integers(0, 10, n).astype(np.int32) for n in (3, 5, 2)]
  _write_npz(
    str(tmp_path / "s.npz"),
    dict(arr_0=((10, 4, 4, 3), np.uint8, iter(parts)), arr_1=((10,), np.int32, labels)),
  )
  with np.load(tmp_path / "s.npz") as z:
    np.testing.assert_array_equal(z["arr_0"], np.concatenate(parts))
    np.testing.assert_array_equal(z["arr_1"], np.concatenate(labels))
    assert sorted(z.files) == ["arr_0", "arr_1"]


def test_killed_run_resumes_to_the_same_npz(model_and_config, tmp_path):
  """A run stopped after 2 of 4 chunks (with a half-written chunk left
  behind), run again, ends with the same npz as an uninterrupted run; its
  images are those of generate_images for the chunk's labels and seed."""
  model, config, tok = model_and_config
  kw = dict(num_samples=28, chunk_size=8, num_steps=3, cfg_scale=2.0, seed=5)
  whole = sample_run(model, config, tok, str(tmp_path / "whole"), **kw)
  assert sample_run(model, config, tok, str(tmp_path / "cut"), stop_after=2, **kw) == ""
  chunks = sorted((tmp_path / "cut" / "chunks").iterdir())
  assert [c.name for c in chunks] == ["chunk_00000.npz", "chunk_00001.npz"]
  (tmp_path / "cut" / "chunks" / "chunk_00002.npz.tmp").write_bytes(b"half a chunk")
  resumed = sample_run(model, config, tok, str(tmp_path / "cut"), **kw)
  assert pathlib.Path(whole).read_bytes() == pathlib.Path(resumed).read_bytes()
  with np.load(whole) as z:
    images, labels = z["arr_0"], z["arr_1"]
  assert images.shape == (28, 8, 8, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, class_labels(28, 10, seed=5))
  # The last chunk (4 of 8 images, padded to 8) by hand.
  names = [f"Please generate an image of {digits_name(k)}." for k in labels[24:]]
  padding = ["Please generate an image of zero."] * 4
  x0 = inference.generate_images(
    model, tok, names + padding, config=config, num_steps=3, cfg_scale=2.0, seed=chunk_seed(5, 3)
  )
  expected = quantize(inference.to_pixels(x0, config))[:4]
  assert (np.abs(images[24:].astype(int) - expected.astype(int)) <= 1).all()
  # Other settings in the same folder are refused, not mixed.
  with pytest.raises(ConfigError, match="another run.*num_steps"):
    sample_run(model, config, tok, str(tmp_path / "cut"), **dict(kw, num_steps=4))
  with pytest.raises(ConfigError, match="multiple of 8"):
    sample_run(model, config, tok, str(tmp_path / "x"), **dict(kw, chunk_size=6))


def digits_name(k):
  return ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")[k]


def test_digits_metric_separates_real_from_noise():
  from sklearn.datasets import load_digits

  real = load_digits()
  images, labels = real.images[:, :, :, None] / 16.0, real.target
  on_real = digits.sample_metrics(images[:300], labels[:300])
  noise = np.random.default_rng(0).uniform(0, 1, (300, 8, 8, 1))
  on_noise = digits.sample_metrics(noise, labels[:300])
  assert on_real["classifier_accuracy"] > 0.95 and on_noise["classifier_accuracy"] < 0.3
  # All the real digits against themselves: the same Gaussian, distance 0.
  assert abs(digits.frechet_distance(images)) < 1e-6
  assert on_real["frechet_distance"] < 0.1 * on_noise["frechet_distance"]
  assert on_real["real_frechet_distance"] < 0.1 * on_noise["frechet_distance"]
  # The distance is FID's formula on the classifier's decision values.
  f_a, f_b = digits.classifier_features(noise), digits.classifier_features(images)
  mu_a, mu_b = f_a.mean(0), f_b.mean(0)
  s_a, s_b = np.cov(f_a, rowvar=False), np.cov(f_b, rowvar=False)
  w, v = np.linalg.eigh(s_a)
  root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
  expected = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross
  np.testing.assert_allclose(on_noise["frechet_distance"], expected, rtol=1e-4)


def test_metric_names_and_missing_inputs_name_the_fix():
  assert check_metrics(["fid", " digits"]) == ("fid", "digits")
  with pytest.raises(ConfigError, match="unknown metric.*'fd'.*choose among"):
    check_metrics(["fd"])
  with pytest.raises(ConfigError, match="twice"):
    check_metrics(["fid", "fid"])
  images = np.zeros((4, 8, 8, 1), np.uint8)
  with pytest.raises(ConfigError, match="--inception="):
    score_images(images, None, make(["fid"]))
  with pytest.raises(FileFormatError, match="no labels"):
    score_images(images, None, make(["digits"]))
  with pytest.raises(FileFormatError, match="uint8"):
    score_images(images.astype(np.float32), np.zeros(4), make(["digits"]))
  with pytest.raises(FileFormatError, match=r"8x8 grayscale.*\[16, 16, 3\]"):
    score_images(np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4), make(["digits"]))
  with pytest.raises(FileFormatError, match="4 samples but 3 labels"):
    score_images(images, np.zeros(3), make(["digits"]))


def _cli(*flags):
  return subprocess.run(
    [sys.executable, "-m", "monoformer_jax.evaluate", *flags],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.slow
def test_cli_digits_on_a_checkpoint_then_on_its_samples(digits_checkpoint, tmp_path):
  out = tmp_path / "eval"
  run = _cli(
    f"--checkpoint={digits_checkpoint}",
    "--metrics=digits",
    "--num_samples=40",
    "--chunk_size=16",
    "--num_steps=2",
    f"--sample_dir={out}",
  )
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert "sampling: 100%" in run.stderr and "img/s" in run.stderr  # the progress bar
  with np.load(out / "samples.npz") as z:
    images, labels = z["arr_0"], z["arr_1"]
  assert images.shape == (40, 8, 8, 1)
  expected = digits.sample_metrics(images / 255.0, labels)
  np.testing.assert_allclose(results["digits"].pop("per_digit"), expected.pop("per_digit"))
  assert results["digits"] == pytest.approx(expected, rel=1e-6)  # float32 pixels there
  assert results["samples"]["num_steps"] == 2 and results["checkpoint"]["step"] == 0
  # The same metric from the npz alone, no model.
  run = _cli(
    f"--samples={out / 'samples.npz'}", "--metrics=digits", f"--output={tmp_path / 'again.json'}"
  )
  assert run.returncode == 0, run.stderr[-3000:]
  again = json.loads((tmp_path / "again.json").read_text())["digits"]
  again.pop("per_digit")
  assert again == results["digits"]


@pytest.mark.slow
def test_cli_bad_flags_name_the_fix(digits_checkpoint, tmp_path):
  run = _cli(f"--checkpoint={digits_checkpoint}", "--metrics=fid,bleu")
  assert run.returncode == 2 and "unknown metric(s) ['bleu']" in run.stderr
  run = _cli(f"--checkpoint={digits_checkpoint}", "--metrics=fid")
  assert run.returncode == 2 and "need --inception" in run.stderr
  run = _cli(
    f"--checkpoint={digits_checkpoint}",
    "--metrics=fid",
    f"--inception={tmp_path / 'no.pth'}",
    f"--reference={tmp_path / 'ref.npz'}",
  )
  assert run.returncode == 2 and "no.pth" in run.stderr and "is not a file" in run.stderr
  run = _cli(f"--checkpoint={digits_checkpoint}", "--metrics=commonsense")
  assert run.returncode == 2 and "needs --tasks_dir" in run.stderr
  run = _cli("--metrics=digits")
  assert run.returncode != 0 and "give --checkpoint" in run.stderr


@pytest.mark.slow
def test_evals_inside_training_are_logged(tmp_path, one_device):
  """digits:tiny with the digits evaluator every 5 steps: eval/ rows in
  metrics.jsonl equal to scoring the checkpoint's EMA weights afterwards."""
  from monoformer_jax.eval.score import TrainingEvals
  from monoformer_jax.train.loop import train_and_evaluate

  config = digits_config(num_steps=10, checkpoint_every=10, log_every=5)
  config.evals.update(every=5, num_samples=16, num_steps=2)
  train_and_evaluate(config, str(tmp_path), sample_at_end=False)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "eval/digits_classifier_accuracy" in r]
  assert [r["step"] for r in evals] == [5, 10]
  model, saved = load_model(tmp_path, step=10)
  again = TrainingEvals(saved)(model, inference.tokenizer_of(saved))
  for key in ("eval/digits_classifier_accuracy", "eval/digits_frechet_distance"):
    assert evals[-1][key] == pytest.approx(again[key], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_last_evals_come_from_the_end_of_run_samples(tmp_path, monkeypatch, one_device):
  """With the evaluator's settings equal to the end-of-run samples' (the
  digits configs), the evaluator runs at step 5 only; step 10's eval/ row is
  the samples' scores (summary.json). Other settings: it runs at 10 too."""
  from monoformer_jax.eval import score
  from monoformer_jax.train.loop import train_and_evaluate

  calls = []
  original = score.TrainingEvals.__call__
  monkeypatch.setattr(
    score.TrainingEvals, "__call__", lambda self, *a: calls.append(1) or original(self, *a)
  )
  config = digits_config(num_steps=10, checkpoint_every=10, log_every=5)
  config.evals.update(every=5)
  assert score.end_samples_score_evals(config)
  train_and_evaluate(config, str(tmp_path / "same"))
  rows = [
    json.loads(line) for line in (tmp_path / "same" / "metrics.jsonl").read_text().splitlines()
  ]
  evals = [r for r in rows if "eval/digits_classifier_accuracy" in r]
  assert [r["step"] for r in evals] == [5, 10] and len(calls) == 1
  summary = json.loads((tmp_path / "same" / "samples" / "summary.json").read_text())
  assert evals[-1]["eval/digits_classifier_accuracy"] == summary["digits"]["classifier_accuracy"]
  assert evals[-1]["eval/digits_frechet_distance"] == summary["digits"]["frechet_distance"]
  assert set(evals[-1]) == set(evals[0]) - {"eval/seconds"}

  calls.clear()
  config.evals.num_steps = 3  # the samples take 10: no longer the evaluator's
  assert not score.end_samples_score_evals(config)
  train_and_evaluate(config, str(tmp_path / "other"))
  rows = [
    json.loads(line) for line in (tmp_path / "other" / "metrics.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in rows if "eval/seconds" in r] == [5, 10] and len(calls) == 2


@pytest.mark.slow
def test_cli_commonsense_equals_the_library(tmp_path):
  """The tiny HF Llama, converted and saved as a model checkpoint, scored by
  the CLI on two of the fixture's task files: the library's numbers."""
  from flax import nnx

  from monoformer_jax.convert import llama, verify
  from monoformer_jax.eval import commonsense
  from monoformer_jax.model.build import abstract_model
  from monoformer_jax.text.tokenizer import SentencePieceTokenizer

  tiny = REPO / "tests" / "fixtures" / "tiny_llama"
  tasks_dir = REPO / "tests" / "fixtures" / "commonsense"
  params, config = llama.load_llama(str(tiny), verify.fixture_config(), seed=0)
  save_model(tmp_path / "llama", config, params)
  run = _cli(
    f"--checkpoint={tmp_path / 'llama'}",
    "--metrics=commonsense",
    f"--tasks_dir={tasks_dir}",
    "--tasks=piqa,winogrande",
    f"--tokenizer={tiny / 'tokenizer.model'}",
    "--weights=raw",
    f"--output={tmp_path / 'r.json'}",
  )
  assert run.returncode == 0, run.stderr[-3000:]
  got = json.loads((tmp_path / "r.json").read_text())["commonsense"]
  model = nnx.merge(abstract_model(config.model)[0], params)
  want = commonsense.evaluate_tasks(
    model,
    SentencePieceTokenizer(str(tiny / "tokenizer.model")),
    ["piqa", "winogrande"],
    str(tasks_dir),
    progress=False,
  )
  assert set(got) == {"piqa", "winogrande"}
  for task in got:
    assert got[task] == pytest.approx(want[task])
  run = _cli(
    f"--checkpoint={tmp_path / 'llama'}",
    "--metrics=commonsense",
    f"--tasks_dir={tasks_dir}",
    "--tasks=piqa,mmlu",
  )
  assert run.returncode == 2 and "mmlu" in run.stderr


def test_vae_decoding_split_over_the_devices_equals_one_call():
  """Latents decoded `decode_batch` at a time over the 8 devices (5 latents,
  batches of 8 after rounding up) equal one unsharded decode of them all."""
  from monoformer_jax.eval.sampling import decode_to_unit
  from monoformer_jax.vae import load_vae

  vae = load_vae(str(REPO / "tests" / "fixtures" / "tiny_vae"))
  x0 = np.random.default_rng(0).normal(size=(5, 8, 8, 4)).astype(np.float32)
  got = decode_to_unit(x0, None, vae, decode_batch=3)
  np.testing.assert_allclose(got, inference.to_pixels(x0, None, vae), atol=1e-5)
  assert got.shape == (5, 16, 16, 3)


@pytest.mark.slow
def test_cli_inception_metrics_of_a_sample_file(tmp_path):
  """--samples with a reference of images only and Inception weights written
  by torch.save (seeded random weights): IS and precision/recall equal the
  library's on the same features; a reference of another resolution and an
  Inception file that is not one are refused, naming the fix. (FID and sFID
  take a 2048x2048 matrix root, ~30 s on this machine: the library tests
  check them, on smaller features.)"""
  torch = pytest.importorskip("torch")
  from inception_weights import random_state_dict

  from monoformer_jax.eval import fid, inception

  weights = random_state_dict(inception.expected_state_dict_shapes(), seed=1)
  torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, tmp_path / "inc.pth")
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (1, 1, 1, 3))  # images of their own colour and contrast
  samples = np.clip(
    base + rng.normal(0, 60, (12, 32, 32, 3)) * rng.uniform(0.2, 1, (12, 1, 1, 1)), 0, 255
  ).astype(np.uint8)
  reference = np.clip(base + rng.normal(0, 50, (14, 32, 32, 3)), 0, 255).astype(np.uint8)
  np.savez(tmp_path / "samples.npz", arr_0=samples)
  np.savez(tmp_path / "ref.npz", arr_0=reference)
  np.savez(tmp_path / "ref16.npz", arr_0=reference[:, :16, :16])
  flags = (
    f"--samples={tmp_path / 'samples.npz'}",
    f"--inception={tmp_path / 'inc.pth'}",
    "--metrics=is,precision_recall",
    "--batch_size=8",
  )
  run = _cli(*flags, f"--reference={tmp_path / 'ref.npz'}", f"--output={tmp_path / 'r.json'}")
  assert run.returncode == 0, run.stderr[-3000:]
  got = json.loads((tmp_path / "r.json").read_text())
  model = inception.inception_from_state_dict(weights)
  ours, theirs = (
    inception.inception_features(model, x, batch_size=8) for x in (samples, reference)
  )
  precision, recall = fid.precision_recall(theirs["pool"], ours["pool"], k=3)
  assert got["precision"] == pytest.approx(precision) and got["recall"] == pytest.approx(recall)
  assert got["inception_score"] == pytest.approx(
    fid.inception_score(ours["logits"], split_size=5000), rel=1e-5
  )
  run = _cli(*flags, f"--reference={tmp_path / 'ref16.npz'}")
  assert run.returncode == 2 and "32x32 but the reference batch is 16x16" in run.stderr
  run = _cli(
    *flags[:1],
    f"--inception={tmp_path / 'ref.npz'}",
    *flags[2:],
    f"--reference={tmp_path / 'ref.npz'}",
  )
  assert run.returncode == 2 and "ref.npz" in run.stderr
