"""Checkpoints in a bucket (gs://, conftest's GCS-protocol server on localhost)
as inputs and outputs: loading every path form, `train.init_from`, and the
`sample` and `evaluate` entry points reading from and writing to the bucket."""

import io
import json
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from etils import epath
from PIL import Image

from monoformer_jax import inference
from monoformer_jax.checkpoints import beside, load_model, load_params, resolve, save_model
from monoformer_jax.errors import PathError
from monoformer_jax.paths import fresh_output_dir, whole_file

REPO = pathlib.Path(__file__).resolve().parents[1]


def _copy_tree(src, dst):
  """Copies the local folder `src` to `dst` (a gs:// folder), file by file."""
  src, dst = pathlib.Path(src), epath.Path(dst)
  for file in src.rglob("*"):
    if file.is_file():
      target = dst / file.relative_to(src).as_posix()
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(file.read_bytes())


def _cli(module, *flags):
  return subprocess.run(
    [sys.executable, "-m", f"monoformer_jax.{module}", *flags],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.timeout(120)
def test_load_params_from_the_bucket_equals_the_local_load_in_every_path_form(
  digits_checkpoint, gcs_path
):
  model_dir, workdir = f"{gcs_path}/model", f"{gcs_path}/run"
  _copy_tree(digits_checkpoint, model_dir)
  _copy_tree(digits_checkpoint, f"{workdir}/checkpoints")  # a training workdir's layout
  local, local_config, _ = load_params(str(digits_checkpoint))
  forms = {
    model_dir: (model_dir, 0),  # a save_model folder
    f"{model_dir}/0/": (model_dir, 0),  # its step folder
    workdir: (f"{workdir}/checkpoints", 0),  # a workdir: its latest step
    f"{workdir}/checkpoints": (f"{workdir}/checkpoints", 0),
    f"{workdir}/checkpoints/0": (f"{workdir}/checkpoints", 0),
  }
  for path, resolved in forms.items():
    assert resolve(path) == resolved, path
    params, config, step = load_params(path)
    assert step == 0 and config.to_dict() == local_config.to_dict(), path
    chex.assert_trees_all_equal(params, local)  # bit for bit
  raw, _, _ = load_params(model_dir, weights="raw")
  chex.assert_trees_all_equal(raw, load_params(str(digits_checkpoint), weights="raw")[0])
  # Outputs beside a checkpoint in the bucket stay in the bucket, named as locally.
  assert beside(workdir, 0, "samples") == f"{workdir}/samples_step0"
  assert beside(model_dir, 0, "eval") == f"{model_dir}_eval_step0"
  for missing, message in (
    (f"{gcs_path}/nothing", "does not exist"),
    (f"{workdir}/checkpoints/7", "does not exist"),
  ):
    with pytest.raises(Exception, match=message):
      resolve(missing)


@pytest.mark.timeout(120)
def test_save_model_to_the_bucket_and_train_init_from_it(gcs_path):
  from helpers import digits_config

  from monoformer_jax.model.build import init_params
  from monoformer_jax.parallel import sharding
  from monoformer_jax.train.loop import initial_state
  from monoformer_jax.train.state import make_optimizer

  config = digits_config()
  params = jax.jit(lambda: init_params(config.model, seed=5))()
  save_model(f"{gcs_path}/converted", config, params)
  assert sorted(p.name for p in epath.Path(f"{gcs_path}/converted").iterdir()) == ["0"]
  config.train.init_from = f"{gcs_path}/converted"
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), sharding.logical_rules(config.sharding_rules):
    _, state, _ = initial_state(config, mesh, make_optimizer(config.optim)[0])
  assert int(state["step"]) == 0
  chex.assert_trees_all_equal(jax.device_get(state["params"]), jax.device_get(params))
  chex.assert_trees_all_equal(jax.device_get(state["ema"]), jax.device_get(params))


@pytest.mark.timeout(60)
def test_a_failed_write_to_the_bucket_leaves_no_object(gcs_path):
  for size in (100, 6 << 20):  # within one upload request, and a resumable upload of parts
    path = epath.Path(f"{gcs_path}/chunk_{size}.npz")
    with pytest.raises(RuntimeError), whole_file(path) as f:
      f.write(b"x" * size)
      raise RuntimeError("killed mid-write")
    assert not path.exists(), size  # no half-written chunk to be taken for a whole one
    with whole_file(path) as f:
      f.write(b"y" * size)
    assert path.read_bytes() == b"y" * size


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sample_reads_and_writes_the_bucket(digits_checkpoint, gcs_path):
  checkpoint, out = f"{gcs_path}/model", f"{gcs_path}/samples"
  _copy_tree(digits_checkpoint, checkpoint)
  run = _cli(
    "sample",
    "images",
    f"--checkpoint={checkpoint}",
    "--class_name=seven",
    "--num_samples=2",
    "--num_steps=2",
    f"--output_dir={out}",
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert sorted(p.name for p in epath.Path(out).iterdir()) == ["images.npz", "images.png"]
  saved = np.load(io.BytesIO((epath.Path(out) / "images.npz").read_bytes()))
  assert saved["prompts"].tolist() == ["Please generate an image of seven."] * 2

  model, config = load_model(str(digits_checkpoint))  # the local run's images
  x0 = inference.generate_images(
    model,
    inference.tokenizer_of(config),
    saved["prompts"].tolist(),
    config=config,
    num_steps=2,
    cfg_scale=config.sample.cfg_scale or None,
    seed=0,
  )
  images = inference.to_pixels(x0, config)
  np.testing.assert_allclose(saved["images"], images, atol=1e-4)
  png = Image.open(io.BytesIO((epath.Path(out) / "images.png").read_bytes()))
  assert png.size == inference.image_grid(saved["images"], rows=1, scale=8).size

  # A folder in the bucket is never overwritten either (the CLI's check, in-process).
  with pytest.raises(PathError, match=r"already holds \['images.png', 'images.npz'\]"):
    fresh_output_dir(out, ("images.png", "images.npz"), "--output_dir")


# `python -m monoformer_jax.evaluate` (cli.run) on the command line given, then,
# in the same process, evaluate.main on a second one (its flags parsed afresh):
# the second run finds the sampler compiled instead of paying a process's start,
# load and compilation again.
_EVALUATE_TWICE = """
import json, sys
from absl import flags
from monoformer_jax import cli, evaluate
second = json.loads(sys.argv.pop(1))
def both(argv):
  evaluate.main(argv)
  flags.FLAGS.unparse_flags()
  evaluate.main(flags.FLAGS(["evaluate", *second]))
cli.run(both)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_evaluate_reads_and_writes_the_bucket(digits_checkpoint, gcs_path, tmp_path):
  checkpoint = f"{gcs_path}/model"
  _copy_tree(digits_checkpoint, checkpoint)
  flags = ["--metrics=digits", "--num_samples=16", "--chunk_size=8", "--num_steps=2"]
  sample_dir, output = f"{gcs_path}/eval", f"{gcs_path}/scores/results.json"
  # The bucket's run through the command line, then the local one it is held to.
  local = [f"--checkpoint={digits_checkpoint}", f"--sample_dir={tmp_path / 'eval'}", *flags]
  run = subprocess.run(
    [
      sys.executable,
      "-c",
      _EVALUATE_TWICE,
      json.dumps(local),
      f"--checkpoint={checkpoint}",
      f"--sample_dir={sample_dir}",
      f"--output={output}",
      *flags,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  theirs = json.loads((tmp_path / "eval" / "results.json").read_text())
  ours = json.loads(epath.Path(output).read_text())
  assert ours["digits"] == theirs["digits"] and ours["digits"]
  assert ours["checkpoint"]["fingerprint"] == theirs["checkpoint"]["fingerprint"]
  bucket = epath.Path(sample_dir)
  assert sorted(p.name for p in bucket.iterdir()) == ["chunks", "run.json", "samples.npz"]
  assert sorted(p.name for p in (bucket / "chunks").iterdir()) == [
    "chunk_00000.npz",
    "chunk_00001.npz",
  ]
  assert json.loads((bucket / "run.json").read_text())["checkpoint"]["path"] == checkpoint
  remote = np.load(io.BytesIO((bucket / "samples.npz").read_bytes()))
  with np.load(tmp_path / "eval" / "samples.npz") as there:
    assert remote["arr_0"].shape == (16, 8, 8, 1) and remote["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(remote["arr_0"], there["arr_0"])
    np.testing.assert_array_equal(remote["arr_1"], there["arr_1"])


@pytest.mark.timeout(60)
def test_a_sample_folder_in_the_bucket_is_bound_and_its_broken_chunks_redone(gcs_path):
  from monoformer_jax.errors import ConfigError
  from monoformer_jax.eval import sampling

  out = epath.Path(f"{gcs_path}/eval")
  record = dict(path="gs://bucket/m", step=0, weights="ema", fingerprint="a" * 16)
  settings = dict(checkpoint=record, num_samples=16, chunk_size=8)
  sampling._bind(str(out), settings)  # an empty folder: taken, run.json written
  assert json.loads((out / "run.json").read_text()) == settings
  labels = np.arange(16) % 10
  chunk = lambda i: out / "chunks" / f"chunk_{i:05d}.npz"
  with whole_file(chunk(0)) as f:
    np.savez(f, images=np.zeros((8, 8, 8, 1), np.uint8), labels=labels[:8])
  chunk(1).write_bytes(b"PK\x03\x04 cut short")  # a chunk copied in half-written
  assert sampling._done_chunks(str(out), labels, 8, (8, 8, 1)) == [0]
  assert sorted(p.name for p in (out / "chunks").iterdir()) == [
    "chunk_00000.npz",
    "chunk_00001.npz.bad",  # set aside in the bucket, sampled again
  ]
  other = dict(settings, checkpoint=dict(record, fingerprint="b" * 16))
  with pytest.raises(ConfigError, match="holds samples of gs://bucket/m step 0"):
    sampling._bind(str(out), other)  # samples of another save are not mixed in
