"""Evaluation end to end: resumable sampling runs, the digits metric, the
`python -m monoformer_jax.evaluate` CLI and the evaluators inside training."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import digits_config, random_checkpoint, random_digits_checkpoint

from monoformer_jax import inference
from monoformer_jax.checkpoints import fingerprint, load_model, save_model
from monoformer_jax.config import config_file
from monoformer_jax.config.schema import Evals
from monoformer_jax.digits import evaluators as digits
from monoformer_jax.errors import ConfigError, FileFormatError
from monoformer_jax.eval import fid
from monoformer_jax.eval.image_metrics import InceptionMetrics
from monoformer_jax.eval.registry import Evaluator, check_metrics, make, sampling_protocol
from monoformer_jax.eval.sampling import (
  _write_npz,
  bind_folder,
  check_chunk_size,
  chunk_seed,
  class_labels,
  default_chunk_size,
  quantize,
  run_settings,
  sample_run,
  sample_shape,
)
from monoformer_jax.eval.score import (
  check_samples,
  end_samples_score_evals,
  score_images,
  training_protocol,
)

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


def test_killed_run_resumes_to_the_same_npz(model_and_config, digits_checkpoint, tmp_path):
  """A run stopped after 2 of 4 chunks (with a half-written chunk left
  behind), run again, ends with the same npz as an uninterrupted run; its
  images are those of generate_images for the chunk's labels and seed."""
  model, config, tok = model_and_config
  kw = dict(
    checkpoint=str(digits_checkpoint),
    step=0,
    num_samples=28,
    chunk_size=8,
    num_steps=3,
    cfg_scale=2.0,
    guided_channels=None,
    seed=5,
  )
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


def _tree(folder) -> dict[str, bytes]:
  """Every file under `folder`, by relative path: what a refused run must leave as it was."""
  folder = pathlib.Path(folder)
  return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.timeout(120)
def test_a_sample_folder_resumes_only_for_its_checkpoint(
  model_and_config, digits_checkpoint, tmp_path
):
  """run.json binds the folder to the checkpoint's path, step, weights and
  fingerprint: another checkpoint, other weights, the same path saved again
  (a workdir trained anew) and a folder without the record are refused in
  one line, the folder left byte for byte; a copy of the same save resumes
  without sampling, and a broken chunk is set aside and sampled again."""
  model, config, tok = model_and_config
  a = tmp_path / "a"
  shutil.copytree(digits_checkpoint, a)
  assert fingerprint(a) == fingerprint(digits_checkpoint)  # a copy is the same save
  kw = dict(
    step=0, num_samples=8, chunk_size=8, num_steps=3, cfg_scale=2.0, guided_channels=None, seed=5
  )
  out = tmp_path / "eval"
  npz = sample_run(model, config, tok, str(out), checkpoint=str(a), **kw)
  record = json.loads((out / "run.json").read_text())["checkpoint"]
  assert record == dict(path=str(a), step=0, weights="ema", fingerprint=fingerprint(a))
  before = _tree(out)

  def refused(match, checkpoint=a, **changes) -> str:
    with pytest.raises(ConfigError, match=match) as e:
      sample_run(model, config, tok, str(out), checkpoint=str(checkpoint), **{**kw, **changes})
    assert "\n" not in str(e.value) and _tree(out) == before
    return str(e.value)

  b = random_digits_checkpoint(tmp_path / "b")  # the same weights, saved apart: another save
  assert fingerprint(b) != fingerprint(a)
  message = refused("holds samples of", checkpoint=b)
  assert f"of {a} step 0 (ema weights, fingerprint {fingerprint(a)}), not of {b} step 0" in message
  assert message.endswith(f"pass another --sample_dir, or delete {out} to sample it again")
  refused(rf"not of {a} step 0 \(raw weights", weights="raw")
  refused(r"settings then -> now: \{'seed': \(5, 6\)\}", seed=6)

  c = tmp_path / "c"  # the same save elsewhere: resumed, nothing sampled
  shutil.copytree(a, c)
  assert sample_run(model, config, tok, str(out), checkpoint=str(c), stop_after=0, **kw) == npz
  assert _tree(out) == before
  # A chunk cut short (a copy, a full disk) is set aside and sampled again, to the same npz.
  chunk = out / "chunks" / "chunk_00000.npz"
  chunk.write_bytes(before["chunks/chunk_00000.npz"][:200])
  assert sample_run(model, config, tok, str(out), checkpoint=str(c), **kw) == npz
  assert _tree(out) == {
    **before,
    "chunks/chunk_00000.npz.bad": before["chunks/chunk_00000.npz"][:200],
  }
  (out / "chunks" / "chunk_00000.npz.bad").unlink()

  shutil.rmtree(a)  # the workdir deleted and trained again: the same path and step
  random_digits_checkpoint(a)
  refused(rf"not of {a} step 0 .*; it was saved again since \(trained anew\?\)")
  # A folder of an older version: chunks, but no record of their checkpoint.
  run = json.loads((out / "run.json").read_text())
  del run["checkpoint"]
  (out / "run.json").write_text(json.dumps(run))
  before = _tree(out)
  message = refused(f"{out} holds samples but no run.json saying which checkpoint", checkpoint=c)
  assert message.endswith("(a samples.npz in it can still be scored with --samples)")


def test_the_fid_protocol_is_the_references_sample_ddp():
  """The Inception metrics sample as the reference's sample_ddp.py at its
  defaults (create_diffusion("20"), --cfg-scale 1.5, eps[:, :3] guided):
  evaluate's defaults and config.evals' (the same numbers, so they cannot
  drift); flags override; all channels when asked and on a 1-channel model."""
  latent = config_file("imagenet256:tiny")  # 4 latent channels
  fid_metrics = ("fid", "sfid", "is", "precision_recall")
  assert sampling_protocol(fid_metrics, latent) == dict(
    num_steps=20, cfg_scale=1.5, guided_channels=3
  )
  assert sampling_protocol(("fid",), latent, num_steps=7, cfg_scale=4.0) == dict(
    num_steps=7, cfg_scale=4.0, guided_channels=3
  )
  assert sampling_protocol(("fid",), latent, guide_all_channels=True)["guided_channels"] is None
  assert sampling_protocol(("fid",), latent, cfg_scale=0)["guided_channels"] is None  # unguided
  assert sampling_protocol(("commonsense",), latent) == dict(
    num_steps=latent.sample.num_steps, cfg_scale=latent.sample.cfg_scale, guided_channels=None
  )
  one_channel = digits_config()
  assert sampling_protocol(("fid",), one_channel)["guided_channels"] is None
  assert sampling_protocol(("digits",), one_channel) == dict(
    num_steps=one_channel.sample.num_steps,
    cfg_scale=one_channel.sample.cfg_scale,
    guided_channels=None,
  )
  # config.evals: the same protocol by default, every channel on request.
  evals = Evals()
  assert (evals.num_steps, evals.cfg_scale, evals.guide_all_channels) == (
    InceptionMetrics.num_steps,
    InceptionMetrics.cfg_scale,
    False,
  )
  latent.evals.update(metrics=("fid",), every=10)
  assert training_protocol(latent) == dict(num_steps=20, cfg_scale=1.5, guided_channels=3)
  # The end-of-run samples guide every channel: their scores are not the evaluator's.
  latent.sample.update(num_classes=0, num_per_class=1, num_steps=20, cfg_scale=1.5)
  latent.evals.num_samples = 1000
  latent.sample.metrics = ("fid",)
  assert not end_samples_score_evals(latent)
  latent.evals.guide_all_channels = True
  assert training_protocol(latent)["guided_channels"] is None
  assert end_samples_score_evals(latent)


def test_evals_inside_training_sample_with_the_metrics_protocol(monkeypatch):
  """TrainingEvals hands sample_classes the eps channels its metrics' protocol
  guides (a digits metric made to guide 3, on a 4-channel model), or every
  channel with evals.guide_all_channels; the steps and scale are evals'."""
  from monoformer_jax.eval import sampling
  from monoformer_jax.eval.score import TrainingEvals

  monkeypatch.setattr(digits.Classifier, "guided_channels", 3)
  asked = []

  def sample_classes(model, config, tokenizer, labels, **kw):
    asked.append(kw)
    raise StopIteration  # what was asked is all this test reads

  monkeypatch.setattr(sampling, "sample_classes", sample_classes)
  config = digits_config()
  config.model.in_channels = 4
  config.evals.update(every=5, metrics=("digits",), num_samples=10, num_steps=3, cfg_scale=2.5)
  for guide_all in (False, True):
    config.evals.guide_all_channels = guide_all
    with pytest.raises(StopIteration):
      TrainingEvals(config)(None, None)
  assert [(k["num_steps"], k["cfg_scale"], k["guided_channels"]) for k in asked] == [
    (3, 2.5, 3),
    (3, 2.5, None),
  ]


def test_chunk_sizes_split_over_the_devices():
  """The default chunk is the largest multiple of the device count <= 500 (at
  least one image per device), or fewer samples rounded up to the devices;
  any other size must be a multiple too, and no bigger than that."""
  for devices, chunk in [(1, 500), (3, 498), (8, 496), (32, 480), (500, 500), (512, 512)]:
    assert default_chunk_size(devices=devices) == chunk
    assert chunk % devices == 0 and (chunk <= 500 < chunk + devices or chunk == devices)
    assert default_chunk_size(50_000, devices) == chunk  # FID-50K
  assert default_chunk_size(40, 32) == 64 and default_chunk_size(2, 1) == 2
  assert default_chunk_size() == 496 and check_chunk_size(16) == 16  # 8 simulated devices
  assert default_chunk_size(40) == 40 and default_chunk_size(41) == 48
  assert check_chunk_size(48, 41) == 48
  for bad, message in [
    (
      12,
      "--chunk_size=12 does not split over the 8 devices: use a multiple of 8 (e.g. 8 or "
      "16), or leave --chunk_size out for 496",
    ),
    (
      3,
      "--chunk_size=3 does not split over the 8 devices: use a multiple of 8 (e.g. 8), or "
      "leave --chunk_size out for 496",
    ),
    (0, "--chunk_size=0: must be >= 1; pass e.g. --chunk_size=496"),
  ]:
    with pytest.raises(ConfigError) as e:
      check_chunk_size(bad)
    assert str(e.value) == message
  with pytest.raises(ConfigError) as e:  # a chunk of padding
    check_chunk_size(56, 41)
  assert str(e.value) == (
    "--chunk_size=56 is more than --num_samples=41 take: every chunk is padded to 56 "
    "images, the padding drawn and dropped; pass at most 48 (the samples rounded up to the "
    "8 devices), or leave --chunk_size out"
  )


@pytest.mark.timeout(240)
def test_evaluate_samples_as_sample_guide_eps_0_to_2(tmp_path):
  """On a model of 4 channels (the digits model drawing 4-channel pixels, so
  that every channel reaches the uint8 images undecoded), the FID protocol's
  sampling run (sample_run with the Inception metrics' protocol, as
  evaluate calls it) draws the images that `sample images
  --guide_eps_0_to_2` draws for the same class prompts and seed
  (inference.generate_images with guided_channels=3, then to_pixels);
  guiding every channel draws other images, run.json says which, and a
  folder sampled one way is refused the other way."""
  config = digits_config()
  config.model.in_channels = 4
  ck = str(random_checkpoint(tmp_path / "ck", config))
  model, config = load_model(ck)
  tok = inference.tokenizer_of(config)
  # scripts/sample_dit.sh's scale 4: the fourth channel's guidance shows more than at 1.5
  protocol = sampling_protocol(("fid",), config, num_steps=2, cfg_scale=4.0)
  assert protocol == dict(num_steps=2, cfg_scale=4.0, guided_channels=3)
  kw = dict(checkpoint=ck, step=0, num_samples=8, chunk_size=8, seed=3)
  guided = tmp_path / "guided"
  with np.load(sample_run(model, config, tok, str(guided), **kw, **protocol)) as z:
    images, labels = z["arr_0"], z["arr_1"]
  assert images.shape == (8, 8, 8, 4) and images.dtype == np.uint8
  # What `sample images --class_name=... --guide_eps_0_to_2 --seed=S --num_steps=2` draws.
  prompts = [inference.class_name_prompt(int(k), config) for k in labels]
  draw = lambda guided_channels: quantize(
    inference.to_pixels(
      inference.generate_images(
        model,
        tok,
        prompts,
        config=config,
        num_steps=2,
        cfg_scale=4.0,
        guided_channels=guided_channels,
        seed=chunk_seed(3, 0),
        batch_size=8,
      ),
      config,
    )
  ).astype(int)
  expected = draw(3)
  assert np.abs(images.astype(int) - expected).max() <= 1
  all_channels = dict(protocol, guided_channels=None)
  with np.load(sample_run(model, config, tok, str(tmp_path / "all"), **kw, **all_channels)) as z:
    other = z["arr_0"].astype(int)
  # Other images (the fourth channel's eps unguided or guided), beyond the tolerance above
  # (29 values of these mostly saturated samples of a random model).
  assert (np.abs(other - expected) > 1).sum() >= 8
  runs = [json.loads((tmp_path / d / "run.json").read_text()) for d in ("guided", "all")]
  assert [r.pop("guided_channels") for r in runs] == [3, None]
  assert runs[0] == runs[1]  # nothing else differs
  before = _tree(guided)
  with pytest.raises(ConfigError) as e:
    sample_run(model, config, tok, str(guided), **kw, **all_channels)
  assert str(e.value) == (
    f"{guided} holds samples of another run (settings then -> now: {{'guided_channels': "
    "(3, None)}); pass the same settings (guided_channels None is evaluate's "
    "--guide_all_channels) to resume it, or another --sample_dir"
  )
  assert _tree(guided) == before


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
    score_images(np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4, int), make(["digits"]))
  with pytest.raises(FileFormatError, match=r"labels have shape \[3\] for 4 images"):
    score_images(images, np.zeros(3, int), make(["digits"]))


class _Picky(Evaluator):
  """A sample evaluator that refuses every sample shape."""

  def check_samples(self, shape, source):
    raise FileFormatError(f"{source}: picky")


def test_sample_files_are_checked_before_anything_is_scored(tmp_path, monkeypatch):
  """Each flaw of a sample npz is one line naming the file, the value and the
  fix, found before any evaluator scores (the digits metric used to answer
  labels 1..10 with a wrong accuracy, and 0 or 1 images or float labels with
  a traceback)."""
  scored = []
  monkeypatch.setattr(digits.Classifier, "score_samples", lambda self, *a: scored.append(1))
  images = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
  labels = np.arange(20) % 10
  cases = {
    "1to10": (
      dict(arr_0=images, arr_1=labels + 1),
      r"labels \[10\] \(2 of 20\) lie outside "
      r"the classes 0..9 that \['digits'\] score: save class indices from 0 \(labels - 1, as",
    ),
    "minus1": (
      dict(arr_0=images, arr_1=labels - 1),
      r"labels \[-1\] \(2 of 20\) lie outside the classes 0..9 that \['digits'\] score: save "
      "class indices from 0$",
    ),
    "zero": (
      dict(arr_0=images[:0], arr_1=labels[:0]),
      r"holds 0 image\(s\), but \['digits'\] "
      "need at least 2: score at least 2 samples",
    ),
    "one": (dict(arr_0=images[:1], arr_1=labels[:1]), r"holds 1 image\(s\)"),
    "float": (
      dict(arr_0=images, arr_1=labels + 0.5),
      r"labels are float64, not integers \(e.g. "
      r"\[0.5, 1.5, 2.5\]\)",
    ),
    "column": (dict(arr_0=images, arr_1=labels[:, None]), r"shape \[20, 1\] for 20 images"),
    "short": (dict(arr_0=images, arr_1=labels[:19]), r"shape \[19\] for 20 images"),
    "none": (
      dict(arr_0=images),
      r"has no labels, but \['digits'\] score each image against its class",
    ),
    "rgb": (dict(arr_0=np.repeat(images, 3, -1), arr_1=labels), r"holds \[8, 8, 3\] images"),
  }
  for name, (arrays, match) in cases.items():
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    got_images, got_labels = fid.load_samples_npz(path)
    with pytest.raises(FileFormatError, match=match) as e:
      score_images(got_images, got_labels, make(["digits"]), f"--samples={path}")
    assert f"--samples={path}" in str(e.value) and "\n" not in str(e.value)
  np.savez(tmp_path / "pickled.npz", arr_0=images, arr_1=labels.astype(object))
  with pytest.raises(FileFormatError, match="pickled.npz: array 'arr_1' cannot be read"):
    fid.load_samples_npz(tmp_path / "pickled.npz")
  # Every evaluator checks before any scores: a later one's refusal stops the digits metric too.
  with pytest.raises(FileFormatError, match="the samples: picky"):
    score_images(images, labels, make(["digits"]) + [_Picky(["x"], {})])
  assert scored == []
  check_samples(images.shape, labels, make(["digits"]))  # labels 0..9: fine
  np.testing.assert_array_equal(fid.load_samples_npz(tmp_path / "rgb.npz")[1], labels)


def test_reference_batches_are_checked_when_the_evaluator_is_made(tmp_path):
  """Statistics with NaN, or too few reference images for the metric, are
  refused before any sample is made or scored (a NaN mean used to end the
  run with a traceback after the samples' Inception features)."""
  np.savez(tmp_path / "nan.npz", mu=np.full(4, np.nan), sigma=np.eye(4))
  with pytest.raises(FileFormatError, match="nan.npz: 'mu' or 'sigma' holds NaN or infinity"):
    fid.ReferenceBatch(tmp_path / "nan.npz").check(["fid"])
  np.savez(tmp_path / "three.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
  three = fid.ReferenceBatch(tmp_path / "three.npz")
  three.check(["fid", "sfid", "is"])  # 2 images make a covariance
  with pytest.raises(FileFormatError, match="holds 3 image.*precision_recall needs at least 4"):
    three.check(["precision_recall"])
  np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
  with pytest.raises(ConfigError, match="sfid needs the reference images.*or drop sfid"):
    fid.ReferenceBatch(tmp_path / "stats.npz").check(["fid", "sfid"])


def test_training_refuses_too_few_samples_for_its_metrics(tmp_path):
  """evals.num_samples below what a metric needs stops the config check, not
  the first evaluation inside training (precision_recall's 3 neighbours
  need 4 samples; the check reads only that the files are there)."""
  from monoformer_jax.eval.registry import check_training_metrics

  (tmp_path / "inception.pth").touch()
  (tmp_path / "reference.npz").touch()
  config = digits_config()
  config.evals.update(
    metrics=("is", "precision_recall"),
    inception=str(tmp_path / "inception.pth"),
    reference=str(tmp_path / "reference.npz"),
    num_samples=3,
    every=5,
  )
  with pytest.raises(ConfigError) as e:
    check_training_metrics(config, "evals.metrics")
  assert str(e.value) == (
    "evals.metrics=('is', 'precision_recall'): scores 3 samples, and ['is', "
    "'precision_recall'] need at least 4; raise --config.evals.num_samples"
  )
  config.evals.num_samples = 4
  check_training_metrics(config, "evals.metrics")


def _cli(*flags):
  return subprocess.run(
    [sys.executable, "-m", "monoformer_jax.evaluate", *flags],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


# Runs `evaluate.main` on each command line (a JSON list of argv lists) in one
# process, with the model loader and the digits metric replaced by failures (a
# refusal must come before them; not with an argument "scoring") and, with an
# argument "lose_folder",
# for the last command line, the results written into a folder that is
# replaced by a file once scored. Prints each command line's error and what
# it printed. (One process for many refusals: each process costs seconds.) A
# command line that scores with neither (Inception's metrics of a sample file)
# runs as the CLI runs it, its programs in the suite's compilation cache.
_EVALUATE_CASES = r"""
import contextlib, io, json, os, shutil, sys
from absl import app, flags
from monoformer_jax import cli, evaluate
from monoformer_jax.digits import evaluators
from monoformer_jax.errors import UserError

def loaded(*_, **__):
  raise AssertionError("loaded a model or scored before checking")

if "scoring" not in sys.argv[2:]:
  evaluate.model_on_mesh = evaluators.Classifier.score_samples = loaded
def scored_then_folder_lost(*_, **__):
  folder = os.path.dirname(flags.FLAGS.output)
  shutil.rmtree(folder)
  open(folder, "w").close()
  return {"digits": {"classifier_accuracy": 0.25}}

cli.use_compilation_cache()
cases = json.loads(sys.argv[1])
for k, argv in enumerate(cases):
  if k == len(cases) - 1 and "lose_folder" in sys.argv[2:]:
    evaluate.score_images = scored_then_folder_lost
  flags.FLAGS.unparse_flags()
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      evaluate.main(flags.FLAGS(["evaluate", *argv]))
    error = "no error"
  except (app.UsageError, UserError) as e:
    error = f"{type(e).__name__}: {e}"
  print(json.dumps([error, out.getvalue()]))
"""


def _evaluate_cases(argvs, *how, stderr=None) -> list[tuple[str, str]]:
  """[error, printed] of each command line of `argvs`, run in one process
  (_EVALUATE_CASES); what it wrote to stderr appended to the list `stderr`."""
  run = subprocess.run(
    [sys.executable, "-c", _EVALUATE_CASES, json.dumps(argvs), *how],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  if stderr is not None:
    stderr.append(run.stderr)
  return [json.loads(line) for line in run.stdout.splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cli_refuses_before_loading_or_scoring_and_loses_no_results(digits_checkpoint, tmp_path):
  """evaluate's refusals come before the model loads and before anything is
  scored, and leave the disk as it was: a sample folder bound to other
  weights, too few samples, a bad seed, a bucket for the chunks, labels
  outside the digits, an --output that is a folder (it used to fail after
  scoring, the results lost). A write that fails anyway prints the results.
  In the same process (one process for all: each costs seconds), the flags
  that name the fix: Inception's metrics without --inception or with one that
  is not there, commonsense without --tasks_dir or with a task it does not
  know, and no --checkpoint (test_cli_bad_flags_name_the_fix's exit status 2
  is the entry point's, for all of them)."""
  ck = str(digits_checkpoint)
  bound = tmp_path / "bound"
  settings = run_settings(
    digits_config(),
    checkpoint=ck,
    step=0,
    weights="ema",
    num_samples=8,
    chunk_size=8,
    num_steps=2,
    cfg_scale=2.0,
    sampler="ddpm",
    seed=0,
    balanced=False,
  )
  bind_folder(str(bound), settings)
  (bound / "chunks" / "chunk_00000.npz").write_bytes(b"the ema weights' samples")
  images = np.zeros((20, 8, 8, 1), np.uint8)
  np.savez(tmp_path / "wrong.npz", arr_0=images, arr_1=np.arange(20) % 10 + 1)
  np.savez(tmp_path / "ok.npz", arr_0=images, arr_1=np.arange(20) % 10)
  (tmp_path / "folder").mkdir()
  (tmp_path / "results").mkdir()
  before = _tree(tmp_path)
  sampling = [f"--checkpoint={ck}", "--metrics=digits", "--num_steps=2", "--chunk_size=8"]
  cases = [
    (
      [*sampling, f"--sample_dir={bound}", "--num_samples=8", "--weights=raw"],
      f"ConfigError: {bound} holds samples of {ck} step 0 (ema weights, fingerprint "
      f"{fingerprint(ck)}), not of {ck} step 0 (raw weights, fingerprint {fingerprint(ck)}): "
      f"pass another --sample_dir, or delete {bound} to sample it again",
    ),
    (
      [*sampling, f"--sample_dir={tmp_path / 'x'}", "--num_samples=1"],
      f"FileFormatError: the sampling run of {ck} (--num_samples=1) holds 1 image(s), but "
      "['digits'] need at least 2: score at least 2 samples",
    ),
    (
      [*sampling, f"--sample_dir={tmp_path / 'x'}", "--num_samples=8", "--seed=-1"],
      "ConfigError: --seed=-1: must be >= 0; pass e.g. --seed=0",
    ),
    (  # before the checkpoint is even read (there is none here)
      [f"--checkpoint={tmp_path / 'none'}", "--metrics=digits", "--chunk_size=12"],
      "ConfigError: --chunk_size=12 does not split over the 8 devices: use a multiple of 8 "
      "(e.g. 8 or 16), or leave --chunk_size out for 496",
    ),
    (  # the default chunk size (496 on 8 devices) is the run's: not the bound folder's 8
      [*sampling[:3], "--cfg_scale=2", f"--sample_dir={bound}", "--num_samples=1000"],
      f"ConfigError: {bound} holds samples of another run (settings then -> now: "
      "{'num_samples': (8, 1000), 'chunk_size': (8, 496)}); pass the same settings to resume "
      "it, or another --sample_dir",
    ),
    (
      [
        f"--samples={tmp_path / 'wrong.npz'}",
        "--metrics=digits",
        f"--output={tmp_path / 'w.json'}",
      ],
      f"FileFormatError: --samples={tmp_path / 'wrong.npz'}: labels [10] (2 of 20) lie outside "
      "the classes 0..9 that ['digits'] score: save class indices from 0 (labels - 1, as they "
      "count from 1)",
    ),
    (
      [f"--samples={tmp_path / 'ok.npz'}", "--metrics=digits", f"--output={tmp_path / 'folder'}"],
      f"PathError: --output='{tmp_path / 'folder'}' is a folder; pass the path of a file for "
      "the results (one in that folder, say)",
    ),
    (
      [
        f"--samples={tmp_path / 'ok.npz'}",
        "--metrics=digits",
        f"--output={tmp_path / 'results' / 'r.json'}",
      ],
      f"PathError: the results could not be written to '{tmp_path / 'results' / 'r.json'}' "
      "(Not a directory); they are printed above",
    ),
  ]
  ck_flag = f"--checkpoint={ck}"
  tasks_dir = REPO / "tests" / "fixtures" / "commonsense"
  named = [
    ([ck_flag, "--metrics=fid"], ("ConfigError:", "need --inception")),
    (
      [
        ck_flag,
        "--metrics=fid",
        f"--inception={tmp_path / 'no.pth'}",
        f"--reference={tmp_path / 'ref.npz'}",
      ],
      ("no.pth", "is not a file"),
    ),
    ([ck_flag, "--metrics=commonsense"], ("needs --tasks_dir",)),
    (
      [ck_flag, "--metrics=commonsense", f"--tasks_dir={tasks_dir}", "--tasks=piqa,mmlu"],
      ("ConfigError:", "unknown commonsense task 'mmlu'"),
    ),
    (["--metrics=digits"], ("UsageError:", "give --checkpoint")),
  ]
  got = _evaluate_cases([argv for argv, _ in named + cases], "lose_folder")
  named_errors = [error for error, _ in got[: len(named)]]
  assert all(
    all(part in error for part in parts) for error, (_, parts) in zip(named_errors, named)
  ), named_errors
  assert named_errors[0].startswith("ConfigError:") and named_errors[-1].startswith("UsageError:")
  got = got[len(named) :]
  assert [error for error, _ in got] == [want for _, want in cases]
  assert json.loads(got[-1][1]) == {"digits": {"classifier_accuracy": 0.25}}  # printed
  # Nothing written by the refusals; the last one's folder is the file put in its place.
  after = _tree(tmp_path)
  assert after.pop("results") == b"" and not (tmp_path / "x").exists()
  assert after == {k: v for k, v in before.items() if not k.startswith("results")}


@pytest.mark.slow
def test_cli_digits_on_a_checkpoint_then_on_its_samples(digits_checkpoint, tmp_path):
  """The digits metric of a checkpoint's samples, then of its samples.npz
  alone: one process runs both (_evaluate_cases, scoring; a process costs
  seconds). The entry point around them is the other CLI tests'."""
  out = tmp_path / "eval"
  stderr = []
  outcomes = _evaluate_cases(
    [
      [
        f"--checkpoint={digits_checkpoint}",
        "--metrics=digits",
        "--num_samples=40",
        "--chunk_size=16",
        "--num_steps=2",
        f"--sample_dir={out}",
      ],
      [
        f"--samples={out / 'samples.npz'}",
        "--metrics=digits",
        f"--output={tmp_path / 'again.json'}",
      ],
    ],
    "scoring",
    stderr=stderr,
  )
  assert [error for error, _ in outcomes] == ["no error", "no error"]
  results = json.loads((out / "results.json").read_text())
  assert "sampling: 100%" in stderr[0] and "img/s" in stderr[0]  # the progress bar
  with np.load(out / "samples.npz") as z:
    images, labels = z["arr_0"], z["arr_1"]
  assert images.shape == (40, 8, 8, 1)
  expected = digits.sample_metrics(images / 255.0, labels)
  np.testing.assert_allclose(results["digits"].pop("per_digit"), expected.pop("per_digit"))
  assert results["digits"] == pytest.approx(expected, rel=1e-6)  # float32 pixels there
  assert results["samples"]["num_steps"] == 2 and results["checkpoint"]["step"] == 0
  # the digits model (1 channel) guides every channel; the chunk size asked for
  assert results["samples"]["guided_channels"] is None and results["samples"]["chunk_size"] == 16
  assert json.loads((out / "run.json").read_text())["guided_channels"] is None
  # The same metric from the npz alone, no model.
  again = json.loads((tmp_path / "again.json").read_text())["digits"]
  again.pop("per_digit")
  assert again == results["digits"]


@pytest.mark.slow
def test_cli_bad_flags_name_the_fix(digits_checkpoint, tmp_path):
  """The entry point's exit status 2 and its error line. The other flags
  that name a fix are refused in test_cli_refuses_before_loading_or_scoring_and_loses_no_results'
  process (_evaluate_cases: one process for all)."""
  run = _cli(f"--checkpoint={digits_checkpoint}", "--metrics=fid,bleu")
  assert run.returncode == 2
  assert run.stderr.startswith("error: --metrics names unknown metric(s) ['bleu']")
  assert not list(tmp_path.iterdir())


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
  # A task it does not know: test_cli_refuses_before_loading_or_scoring_and_loses_no_results.


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
  # What evaluate checks the metrics against before sampling: the decoded shape.
  latent = digits_config()
  latent.model.update(image_size=8, in_channels=4)
  assert sample_shape(latent, vae) == got.shape[1:]


@pytest.mark.slow
def test_cli_inception_metrics_of_a_sample_file(tmp_path):
  """--samples with a reference of images only and Inception weights written
  by torch.save (seeded random weights): IS and precision/recall equal the
  library's on the same features; a reference of another resolution and an
  Inception file that is not one are refused, naming the fix. (FID and sFID
  take a 2048x2048 matrix root, ~30 s on this machine: the library tests
  check them, on smaller features.) The scoring and the refusals run in one
  process (_evaluate_cases: a process costs seconds); the entry point's own
  handling is the other CLI tests'."""
  torch = pytest.importorskip("torch")
  from inception_weights import random_state_dict

  from monoformer_jax.eval import fid, inception

  weights = random_state_dict(inception.expected_state_dict_shapes(), seed=1)
  torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, tmp_path / "inc.pth")
  rng = np.random.default_rng(0)
  base = rng.integers(0, 256, (1, 1, 1, 3))  # images of their own colour and contrast
  # One Inception batch each (--batch_size=8): a 299x299 Inception costs ~1 s per image here.
  samples = np.clip(
    base + rng.normal(0, 60, (8, 32, 32, 3)) * rng.uniform(0.2, 1, (8, 1, 1, 1)), 0, 255
  ).astype(np.uint8)
  reference = np.clip(base + rng.normal(0, 50, (7, 32, 32, 3)), 0, 255).astype(np.uint8)
  np.savez(tmp_path / "samples.npz", arr_0=samples)
  np.savez(tmp_path / "ref.npz", arr_0=reference)
  np.savez(tmp_path / "ref16.npz", arr_0=reference[:, :16, :16])
  flags = (
    f"--samples={tmp_path / 'samples.npz'}",
    f"--inception={tmp_path / 'inc.pth'}",
    "--metrics=is,precision_recall",
    "--batch_size=8",
  )
  scored, resolution, not_inception = (
    error
    for error, _ in _evaluate_cases(
      [
        [*flags, f"--reference={tmp_path / 'ref.npz'}", f"--output={tmp_path / 'r.json'}"],
        [*flags, f"--reference={tmp_path / 'ref16.npz'}"],
        [
          *flags[:1],
          f"--inception={tmp_path / 'ref.npz'}",
          *flags[2:],
          f"--reference={tmp_path / 'ref.npz'}",
        ],
      ]
    )
  )
  assert scored == "no error"
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
  assert "32x32 images but the reference batch is 16x16" in resolution
  assert not_inception.startswith(("FileFormatError", "CheckpointError")) and "ref.npz" in (
    not_inception
  )
