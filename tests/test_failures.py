"""Bad runs and bad input: nothing is lost, nothing is silently wrong, and the
message names the fix.

Each test provokes one class of failure and asserts both halves: the error
(its type and a message naming the field or path and what to do) and the
state on disk afterwards (the checkpoints still there and readable).
"""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging as absl_logging
from helpers import TINY_CONFIG_FLAG, digits_config, on_one_device

from monoformer_jax import inference
from monoformer_jax.checkpoints import (
  TrainCheckpointer,
  load_model,
  load_params,
  orbax_io,
  save_model,
)
from monoformer_jax.checks import check_train_config
from monoformer_jax.errors import CheckpointError, ConfigError, PathError, TrainingDiverged
from monoformer_jax.eval import finite_json
from monoformer_jax.model.build import init_params
from monoformer_jax.train.loop import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]


def _steps(checkpoints):
  return sorted(int(p.name) for p in pathlib.Path(checkpoints).iterdir() if p.name.isdigit())


def _all_finite(tree):
  return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


@pytest.fixture
def absl_records():
  """The absl log records of the test (absl logs through Python's logging)."""
  records = []

  class Keep(absl_logging.logging.Handler):
    def emit(self, record):
      records.append(record.getMessage())

  handler = Keep()
  logger = absl_logging.get_absl_logger()
  old = logger.level
  logger.addHandler(handler)
  logger.setLevel(absl_logging.logging.INFO)
  yield records
  logger.removeHandler(handler)
  logger.setLevel(old)


# ------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step tiny run with checkpoints at steps 2 and 4, on one device."""
  workdir = tmp_path_factory.mktemp("run")
  with on_one_device():
    train_and_evaluate(
      digits_config(num_steps=4, checkpoint_every=2, log_every=3), str(workdir), sample_at_end=False
    )
  assert _steps(workdir / "checkpoints") == [2, 4]
  return workdir


@pytest.mark.slow
def test_a_diverging_run_stops_and_keeps_its_last_good_state(tmp_path, absl_records, one_device):
  """lr 1e30 after a warmup: step 1 (lr 0) and step 2 are finite, step 3 is
  not. With checkpoints every 2 steps and logs every 3 (not a multiple), the
  old loop saved the NaN state at step 4 and the keep-1 policy deleted step 2."""
  config = digits_config(num_steps=8, checkpoint_every=2, log_every=3, keep_checkpoints=1)
  config.optim.update(lr=1e30, warmup_steps=5)
  with pytest.raises(TrainingDiverged) as caught:
    train_and_evaluate(config, str(tmp_path), sample_at_end=False)
  message = str(caught.value)
  assert message.startswith("step 3 is not finite (")
  assert "no non-finite state was saved" in message and "Lower --config.optim.lr" in message
  assert f"{tmp_path / 'checkpoints'}: [2]" in message
  # Step 2 is on disk, readable and finite; nothing later was written.
  assert _steps(tmp_path / "checkpoints") == [2]
  params, _, step = load_params(str(tmp_path), weights="raw")
  assert step == 2 and _all_finite(params)
  # What the run said on the way: the compile and its time, the committed save.
  assert "compiling the train step ..." in absl_records
  assert any(r.startswith("compiled the train step in ") for r in absl_records)
  assert any(r.startswith("checkpoint step 2 saved to ") and "committed" in r for r in absl_records)
  assert any("below the ~400 steps" in r for r in absl_records)  # the short-run warning
  # metrics.jsonl is JSON (no bare NaN), one line per logged finite step.
  assert (tmp_path / "metrics.jsonl").exists() is False or all(
    json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
  )


@pytest.mark.slow
def test_resume_falls_back_from_an_unreadable_latest_step(run, tmp_path, absl_records, one_device):
  workdir = tmp_path / "copy"
  shutil.copytree(run, workdir)
  data_files = sorted(
    (workdir / "checkpoints" / "4" / "state").rglob("d/*"), key=lambda p: p.stat().st_size
  )
  with open(data_files[-1], "r+b") as f:  # a truncated data file
    f.truncate(1000)
  state, _ = train_and_evaluate(
    digits_config(num_steps=5, checkpoint_every=2, log_every=3), str(workdir), sample_at_end=False
  )
  assert int(state["step"]) == 5
  warned = [r for r in absl_records if "cannot be read" in r]
  assert len(warned) == 1 and "checkpoints/4 cannot be read" in warned[0]
  assert any("resumed from step 2, the newest readable one" in r for r in absl_records)
  # The broken step was moved aside, not deleted; steps 4 and 5 are new.
  assert (workdir / "checkpoints_unreadable" / "4" / "state").is_dir()
  assert _steps(workdir / "checkpoints") == [2, 4, 5]
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [3, 4, 3, 5]  # the first run's, then the resumed
  # The resumed step 3 retraces the original one exactly (same data, same RNG).
  np.testing.assert_allclose(lines[2]["loss"], lines[0]["loss"], rtol=1e-6)


@pytest.mark.slow
def test_resuming_with_other_model_settings_is_refused_unless_asked(run, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(run, workdir)
  config = digits_config(num_steps=6)
  config.model.rope_theta = 500.0
  with pytest.raises(
    CheckpointError,
    match=r"model.rope_theta=10000.0 there, 500.0 here\. "
    r"They change what the weights compute.*"
    r"--config.train.allow_model_changes=True",
  ):
    train_and_evaluate(config, str(workdir), sample_at_end=False)
  assert _steps(workdir / "checkpoints") == [2, 4]
  # The same for loading a model with another config.
  with pytest.raises(CheckpointError, match=r"model.rope_theta=10000.0 there, 500.0 here"):
    load_params(str(workdir), config=config)
  params, _, _ = load_params(str(workdir), config=config, allow_model_changes=True)
  assert _all_finite(params)


# ------------------------------------------------ checkpointer, no training


def _toy_state(value: float):
  return dict(step=jnp.array(0, jnp.int32), params={"w": jnp.full((4, 4), value)})


def _abstract_toy():
  state = _toy_state(0.0)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return abstract, jax.tree.map(lambda _: device, state)


def test_keep_checkpoints_below_one_is_rejected_before_anything_is_written(tmp_path):
  with pytest.raises(
    ConfigError,
    match=r"train.keep_checkpoints=0: must be >= 1; keep at "
    r"least the newest checkpoint: --config.train.keep_checkpoints=1",
  ):
    train_and_evaluate(digits_config(keep_checkpoints=0), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  with pytest.raises(CheckpointError, match="keep=0"):
    TrainCheckpointer(tmp_path / "c", keep=0, save_every=1)


def test_a_full_disk_stops_the_save_naming_bytes_and_keeps_earlier_steps(tmp_path, monkeypatch):
  config = digits_config()
  ckpt = TrainCheckpointer(tmp_path / "c", keep=3, save_every=1)
  assert ckpt.save(1, _toy_state(1.0), {}, config)
  ckpt.wait()
  monkeypatch.setattr(orbax_io, "_free_bytes", lambda directory: 10)
  with pytest.raises(
    PathError,
    match=r"could not save step 2 to .*: 10 bytes are free there; "
    r"a checkpoint needs about 68 bytes\. The steps already there \[1\] "
    r"are intact\. Free space there",
  ):
    ckpt.save(2, _toy_state(2.0), {}, config)
  monkeypatch.undo()

  def failing_save(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(ckpt.manager, "save", failing_save)
  with pytest.raises(
    PathError,
    match=r"could not save step 3 .*OSError: \[Errno 28\] No space "
    r"left on device; a checkpoint needs about 68 bytes",
  ):
    ckpt.save(3, _toy_state(3.0), {}, config)
  monkeypatch.undo()
  ckpt.close()
  abstract, shardings = _abstract_toy()
  step, state, _ = TrainCheckpointer(tmp_path / "c", keep=3, save_every=1).restore_latest(
    abstract, shardings, config
  )
  assert step == 1 and float(state["params"]["w"][0, 0]) == 1.0


_RESTORE_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
import jax
from helpers import digits_config
from monoformer_jax.checkpoints import TrainCheckpointer
from monoformer_jax.cli import quiet_logs
from monoformer_jax.parallel import sharding
from monoformer_jax.train.state import make_optimizer, state_shardings
quiet_logs()   # what every entry point logs with
config = digits_config()
mesh = sharding.make_mesh(config.mesh)
with jax.set_mesh(mesh), sharding.logical_rules(config.sharding_rules):
  _, abstract, shardings = state_shardings(config, mesh, make_optimizer(config.optim)[0])
  step, state, _ = TrainCheckpointer(sys.argv[1], keep=3, save_every=1).restore_latest(
      abstract, shardings, config)
print("restored", step, int(state["step"]))
"""


@pytest.mark.slow
def test_a_failed_restore_is_one_warning_not_pages_of_tracebacks(run, tmp_path):
  """Orbax's failed reads go on failing in background threads after the
  restore has raised, each printing a traceback (thousands of lines for the
  tiny model): in a real process only our warning shows."""
  workdir = tmp_path / "copy"
  shutil.copytree(run, workdir)
  data = max((workdir / "checkpoints" / "4" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[:1000])
  result = _python("-c", _RESTORE_SCRIPT, str(workdir / "checkpoints"), str(REPO / "tests"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "restored 2 2"
  assert "checkpoints/4 cannot be read: " in result.stderr
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr
  assert len(result.stderr.splitlines()) < 10, result.stderr[-3000:]


def test_no_readable_checkpoint_names_every_step_and_the_fix(tmp_path):
  config = digits_config()
  ckpt = TrainCheckpointer(tmp_path / "c", keep=3, save_every=1)
  for step in (1, 2):
    ckpt.save(step, _toy_state(float(step)), {}, config)
  ckpt.wait()
  ckpt.close()
  for step in (1, 2):
    (tmp_path / "c" / str(step) / "state" / "_METADATA").write_text("{not json")
  abstract, shardings = _abstract_toy()
  with pytest.raises(
    CheckpointError,
    match=r"no readable checkpoint in .*: step 2 \(.*\); "
    r"step 1 \(.*\)\. They were moved to .*c_unreadable/; start again",
  ):
    TrainCheckpointer(tmp_path / "c", keep=3, save_every=1).restore_latest(
      abstract, shardings, config
    )
  assert sorted(os.listdir(tmp_path / "c_unreadable")) == ["1", "2"]


def test_a_checkpoint_with_non_finite_weights_is_not_loaded(tmp_path):
  config = digits_config()
  params = jax.jit(lambda: init_params(config.model, seed=0))()
  params["lm_head"] = params["lm_head"].at[0, 0].set(jnp.nan)
  save_model(tmp_path / "m", config, params)
  with pytest.raises(
    CheckpointError,
    match=r"holds non-finite 'params' weights in 1 arrays "
    r"\(\['lm_head'\]\); it was saved from a diverged run",
  ):
    load_model(str(tmp_path / "m"), weights="raw")


# ------------------------------------------------------- config and input


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("train.num_steps", -5, r"train.num_steps=-5: must be >= 1"),
    ("train.checkpoint_every", 0, r"train.checkpoint_every=0: must be >= 1"),
    ("train.log_every", 0, r"train.log_every=0: must be >= 1"),
    ("optim.lr", math.nan, r"optim.lr=nan: must be a finite number"),
    ("optim.b2", 1.0, r"optim.b2=1.0: must be in \[0, 1\)"),
    ("data.cfg_drop_prob", 1.5, r"data.cfg_drop_prob=1.5: must be in \[0, 1\]"),
    (
      "model.num_kv_heads",
      3,
      r"model.num_heads=4: must be a multiple of "
      r"model.num_kv_heads=3",
    ),
    ("model.patch_size", 3, r"model.image_size=8: must be a multiple of model.patch_size=3"),
    (
      "model.attention_impl",
      "flash",
      r"model.attention_impl='flash': must be one of "
      r"\('xla', 'pallas', 'auto'\)",
    ),
    ("sample.num_steps", 0, r"sample.num_steps=0: must be >= 1"),
    (
      "sample.num_steps",
      1001,
      r"sample.num_steps=1001: must be in \[1, 1000\]; the schedule "
      r"has diffusion.num_timesteps=1000 steps",
    ),
    ("model.hidden_size", 130, r"model.hidden_size=130: must be a multiple of 4"),
    (
      "diffusion.beta_schedule",
      "cosine",
      r"diffusion.beta_schedule='cosine': must be one of "
      r"\('linear',\)",
    ),
    ("sample.cfg_scale", math.inf, r"sample.cfg_scale=inf: must be a finite number"),
    ("train.init_from", "/nowhere", r"train.init_from='/nowhere': is not a folder"),
  ],
)
def test_bad_config_fields_name_the_field_and_the_allowed_values(field, value, message):
  config = digits_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=message):
    check_train_config(config)


def test_the_batch_must_split_over_the_mesh_before_compiling(tmp_path):
  config = digits_config()
  config.data.batch_size = 12  # 8 devices of fsdp
  with pytest.raises(
    ConfigError,
    match=r"data.batch_size=12: gives micro-batches of 12 rows, "
    r"which the 8 batch shards \(mesh.data=1 x mesh.fsdp=8\) do not divide; "
    r"use a multiple of 8 rows",
  ):
    train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_workdir_problems_are_found_before_training(tmp_path, monkeypatch):
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(PathError, match=r"--workdir='.*afile' is a file, not a folder"):
    train_and_evaluate(digits_config(), str(afile))
  import tempfile

  def read_only(*args, **kwargs):
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
  with pytest.raises(
    PathError,
    match=r"--workdir='.*ro': cannot write the checkpoints, metrics "
    r"and samples there \(Permission denied\); pass a folder you can write to",
  ):
    train_and_evaluate(digits_config(), str(tmp_path / "ro"))


def test_python_api_refuses_nonsense_before_touching_the_model():
  config = digits_config()
  tok = inference.tokenizer_of(config)
  with pytest.raises(
    ConfigError,
    match=r"prompts must be a list of strings, got the string "
    r"'two plus'; pass \['two plus'\]",
  ):
    inference.complete_text(None, tok, "two plus", config=config)
  with pytest.raises(ConfigError, match=r"num_steps=0: must be in \[1, 1000\]"):
    inference.generate_images(None, tok, ["a seven"], config=config, num_steps=0)
  with pytest.raises(ConfigError, match=r"cfg_scale=nan: must be a finite number"):
    inference.generate_images(None, tok, ["a seven"], config=config, cfg_scale=math.nan)
  with pytest.raises(ConfigError, match=r"top_p=0.0: must be in \(0, 1\]"):
    inference.complete_text(None, tok, ["two"], config=config, top_p=0.0)


def test_metrics_records_are_strict_json():
  text = finite_json(dict(loss=math.nan, grad_norm=math.inf, per=[1.5, -math.inf], step=3))
  assert json.loads(text) == dict(loss=None, grad_norm=None, per=[1.5, None], step=3)


def test_configs_declare_every_train_field_the_docs_name():
  from monoformer_jax.config import config_file

  for name in ("digits", "digits:tiny", "imagenet256"):
    t = config_file(name).train
    assert t.init_from == "" and t.allow_model_changes is False, name


# -------------------------------------------------------- the entry points


def _python(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
  )


@pytest.mark.slow
def test_train_cli_prints_one_line_not_a_traceback(tmp_path):
  run = _python(
    "-m",
    "monoformer_jax.train",
    TINY_CONFIG_FLAG,
    f"--workdir={tmp_path / 'w'}",
    "--config.train.init_from=/nowhere",
  )
  assert run.returncode == 2
  assert "error: train.init_from='/nowhere': is not a folder; pass a model checkpoint" in run.stderr
  assert "Traceback" not in run.stderr and "Unable to initialize backend" not in run.stderr
  verbose = _python(
    "-m",
    "monoformer_jax.train",
    TINY_CONFIG_FLAG,
    f"--workdir={tmp_path / 'w'}",
    "--config.train.init_from=/nowhere",
    "--verbose",
  )
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


@pytest.fixture(scope="module")
def model_checkpoint(tmp_path_factory):
  config = digits_config()
  params = jax.jit(lambda: init_params(config.model, seed=3))()
  path = tmp_path_factory.mktemp("models") / "digits"
  save_model(path, config, params, ema=params)
  return path


@pytest.mark.slow
@pytest.mark.parametrize(
  "flag, message",
  [
    ("--num_steps=0", "error: --num_steps=0: must be in [1, 1000]"),
    ("--cfg_scale=nan", "error: --cfg_scale=nan: must be a finite number"),
    ("--num_samples=0", "error: --num_samples=0: must be >= 1"),
  ],
)
def test_sample_cli_checks_flags_before_loading(model_checkpoint, flag, message):
  run = _python(
    "-m",
    "monoformer_jax.sample",
    "images",
    f"--checkpoint={model_checkpoint}",
    "--class_name=3",
    flag,
  )
  assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
  assert "Traceback" not in run.stderr
  assert not list(model_checkpoint.parent.glob("*_samples_step*"))  # nothing written


@pytest.mark.slow
def test_sample_cli_writes_beside_the_checkpoint_and_never_overwrites(model_checkpoint):
  flags = ("text", f"--checkpoint={model_checkpoint}", "--text_prompt=two", "--max_new_tokens=2")
  first = _python("-m", "monoformer_jax.sample", *flags)
  assert first.returncode == 0, first.stderr[-2000:]
  out = model_checkpoint.parent / "digits_samples_step0"
  assert (out / "text.txt").exists()
  second = _python("-m", "monoformer_jax.sample", *flags)
  assert second.returncode == 0, second.stderr[-2000:]
  assert (model_checkpoint.parent / "digits_samples_step0-2" / "text.txt").exists()
  again = _python("-m", "monoformer_jax.sample", *flags, f"--output_dir={out}")
  assert again.returncode == 2
  assert (
    f"--output_dir='{out}' already holds ['text.txt']; pass another --output_dir or "
    "--overwrite to replace them" in again.stderr
  )
