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
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
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
from monoformer_jax.data.sharded import data_state_of
from monoformer_jax.errors import (
  CheckpointError,
  ConfigError,
  MissingPathError,
  PathError,
  TrainingDiverged,
)
from monoformer_jax.eval import finite_json
from monoformer_jax.model.build import init_params
from monoformer_jax.train.checks import check_train_config
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


def _truncate_a_data_file(step_folder):
  data_files = sorted((step_folder / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
  with open(data_files[-1], "r+b") as f:
    f.truncate(1000)


def _a_data_state_of_wrong_content(step_folder):
  (step_folder / "data" / "metadata").write_text('{"shards": 1, "next_example": {"3": 8}}')


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_truncate_a_data_file, _a_data_state_of_wrong_content])
def test_resume_falls_back_from_an_unreadable_latest_step(
  run, tmp_path, absl_records, one_device, damage
):
  workdir = tmp_path / "copy"
  shutil.copytree(run, workdir)
  damage(workdir / "checkpoints" / "4")
  state, _, _ = train_and_evaluate(
    digits_config(num_steps=5, checkpoint_every=2, log_every=3), str(workdir), sample_at_end=False
  )
  assert int(state["step"]) == 5
  warned = [r for r in absl_records if "cannot be read" in r]
  assert len(warned) == 1 and "checkpoints/4 cannot be read" in warned[0]
  assert any("resumed from step 2, the newest readable one" in r for r in absl_records)
  # The broken step was moved aside, not deleted; steps 4 and 5 are new.
  assert (workdir / "checkpoints_unreadable" / "4" / "state").is_dir()
  assert _steps(workdir / "checkpoints") == [2, 4, 5]
  # The first run's rows past step 2 were replaced, and kept aside.
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  aside = [json.loads(x) for x in (workdir / "metrics_replaced.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [3, 5] and [r["step"] for r in aside] == [3, 4]
  # The resumed step 3 retraces the original one exactly (same data, same RNG).
  np.testing.assert_allclose(lines[0]["loss"], aside[0]["loss"], rtol=1e-6)


@pytest.mark.slow
def test_a_run_refuses_a_step_folder_copied_under_another_number(run, tmp_path):
  """Issue 36 #3 end to end: nothing is trained, written or deleted."""
  workdir = tmp_path / "copy"
  shutil.copytree(run, workdir)
  shutil.copytree(workdir / "checkpoints" / "2", workdir / "checkpoints" / "100")
  metrics = (workdir / "metrics.jsonl").read_text()
  with pytest.raises(CheckpointError, match=r"checkpoints/100 holds the state of step 2, not"):
    train_and_evaluate(digits_config(num_steps=8, keep_checkpoints=1), str(workdir))
  assert _steps(workdir / "checkpoints") == [2, 4, 100]
  assert (workdir / "metrics.jsonl").read_text() == metrics
  assert not (workdir / "samples").exists()
  # Sampling and evaluation read the same folder as step 100 no more.
  with pytest.raises(CheckpointError, match=r"checkpoints/100 holds the state of step 2, not"):
    load_params(str(workdir))


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


# A data state as the loop saves it (data/sharded.py): one shard at example 0.
_DATA = {"shards": 1, "next_example": {"0": 0}}


def _toy_state(value: float, step: int = 0, size: int = 4):
  return dict(step=jnp.array(step, jnp.int32), params={"w": jnp.full((size, size), value)})


def _abstract_toy(size: int = 4):
  state = _toy_state(0.0, size=size)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return abstract, jax.tree.map(lambda _: device, state)


def _restore_toy(directory, size: int = 4):
  """(step, w[0, 0], data state) of the newest readable step, as a resumed run reads it."""
  abstract, shardings = _abstract_toy(size)
  with TrainCheckpointer(directory, keep=3, save_every=1) as ckpt:
    step, state, data = ckpt.restore_latest(abstract, shardings, digits_config(), data_state_of)
  assert int(state["step"]) == step
  return step, float(state["params"]["w"][0, 0]), data


def _listing(directory):
  return sorted(os.listdir(directory))


def _files(folder) -> dict:
  """{relative path: bytes} of every file under `folder`."""
  folder = pathlib.Path(folder)
  return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


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


def _fail_the_commit_of(monkeypatch, step: int):
  """Orbax's commit of `step` (renaming `N.orbax-checkpoint-tmp` to `N` once
  its files are written) fails as on a full disk."""
  rename = ocp.path.atomicity.AtomicRenameTemporaryPath
  finalize = rename.finalize

  async def failing(self):
    if self.get_final().name == str(step):
      raise OSError(28, "No space left on device")
    await finalize(self)

  monkeypatch.setattr(rename, "finalize", failing)


def test_a_full_disk_stops_the_save_naming_bytes_and_keeps_earlier_steps(tmp_path, monkeypatch):
  """Issue 36 #1: the free-space check ran while step 2 was in flight, listed
  it as intact, and left it uncommitted. Each failure now waits for the save
  in flight and names the committed steps only; the disk holds those, whole."""
  config, c = digits_config(), tmp_path / "c"
  ckpt = TrainCheckpointer(c, keep=3, save_every=1)
  assert ckpt.save(1, _toy_state(1.0, 1), _DATA, config)
  assert ckpt.save(2, _toy_state(2.0, 2), _DATA, config)  # in flight
  monkeypatch.setattr(orbax_io, "free_bytes", lambda directory: 10)
  with pytest.raises(
    PathError,
    match=r"could not save step 3 to .*: 10 bytes are free there; a checkpoint needs about "
    r"68 bytes\. The committed steps there, \[1, 2\], are intact and resumable\. Free space",
  ):
    ckpt.save(3, _toy_state(3.0, 3), _DATA, config)
  assert _listing(c) == ["1", "2"]  # step 2 committed before the message named it
  monkeypatch.undo()

  # The save's own start fails (the disk filled up since).
  def failing_save(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(ckpt.manager, "save", failing_save)
  with pytest.raises(
    PathError,
    match=r"could not save step 3 .*OSError: \[Errno 28\] No space left on device; a "
    r"checkpoint needs about 68 bytes\. The committed steps there, \[1, 2\], are intact",
  ):
    ckpt.save(3, _toy_state(3.0, 3), _DATA, config)
  monkeypatch.undo()

  # The commit of step 3 fails in the background: the next save reports it (not
  # its own step), with step 3 neither listed nor left half-written.
  _fail_the_commit_of(monkeypatch, 3)
  assert ckpt.save(3, _toy_state(3.0, 3), _DATA, config)
  with pytest.raises(
    PathError,
    match=r"could not save step 3 .*OSError: \[Errno 28\] No space left on device; .* "
    r"The committed steps there, \[1, 2\], are intact",
  ):
    ckpt.save(4, _toy_state(4.0, 4), _DATA, config)
  assert _listing(c) == ["1", "2"]
  # And one that fails while the run stops: close() reports it, once.
  assert ckpt.save(3, _toy_state(3.0, 3), _DATA, config)
  with pytest.raises(PathError, match=r"could not save step 3 .* \[1, 2\], are intact"):
    ckpt.close()
  ckpt.close()  # again: nothing more to wait for or report
  monkeypatch.undo()
  assert _listing(c) == ["1", "2"]
  assert _restore_toy(c) == (2, 2.0, _DATA)


def test_a_failed_save_while_the_run_already_fails_is_logged_not_raised(
  tmp_path, monkeypatch, absl_records
):
  """close() in a `finally` (or a `with` block) must not hide the error that
  stops the run; the failed save is logged instead, the committed steps kept."""
  config, c = digits_config(), tmp_path / "c"
  _fail_the_commit_of(monkeypatch, 2)
  with pytest.raises(KeyboardInterrupt):
    with TrainCheckpointer(c, keep=3, save_every=1) as ckpt:
      ckpt.save(1, _toy_state(1.0, 1), _DATA, config)
      ckpt.save(2, _toy_state(2.0, 2), _DATA, config)
      raise KeyboardInterrupt
  monkeypatch.undo()
  assert any(r.startswith("checkpoint step 1 saved to ") for r in absl_records)
  assert not any(r.startswith("checkpoint step 2 saved") for r in absl_records)
  assert any(
    r.startswith("could not save step 2 ") and "[1], are intact" in r for r in absl_records
  )
  assert _listing(c) == ["1"]
  assert _restore_toy(c) == (1, 1.0, _DATA)


_TMPFS_SCENARIO = """
import os, sys
sys.path.insert(0, sys.argv[2])
import test_failures
test_failures.full_tmpfs_scenario(sys.argv[1])
print("scenario passed")
"""


def full_tmpfs_scenario(mount: str):
  """On a 1 MiB tmpfs, checkpoints of ~256 KB (random, so incompressible):
  the free-space check stops step 4 once step 3 has committed; with the check
  off (an estimate too low, another writer), Orbax's write of step 4 fails
  with ENOSPC in the background and close() names it. Either way the disk
  holds steps 1-3, whole, and no uncommitted folder."""
  config, c = digits_config(), os.path.join(mount, "c")
  w = lambda step: np.asarray(jax.random.normal(jax.random.PRNGKey(step), (256, 256)))
  state = lambda step: dict(step=jnp.array(step, jnp.int32), params={"w": jnp.asarray(w(step))})
  ckpt = TrainCheckpointer(c, keep=5, save_every=1)
  for step in (1, 2, 3):
    assert ckpt.save(step, state(step), _DATA, config)
  with pytest.raises(PathError) as caught:
    ckpt.save(4, state(4), _DATA, config)
  message = str(caught.value)
  assert (
    message.startswith(f"could not save step 4 to {c}: ") and " bytes are free there" in message
  )
  assert "The committed steps there, [1, 2, 3], are intact" in message, message
  assert _listing(c) == ["1", "2", "3"]
  ckpt.close()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(orbax_io, "free_bytes", lambda directory: None)
    ckpt = TrainCheckpointer(c, keep=5, save_every=1)
    assert ckpt.save(4, state(4), _DATA, config)
    with pytest.raises(
      PathError, match=r"could not save step 4 .*No space left on device"
    ) as caught:
      ckpt.close()
  assert "The committed steps there, [1, 2, 3], are intact" in str(caught.value)
  assert _listing(c) == ["1", "2", "3"]
  abstract, shardings = _abstract_toy(256)
  for step in (3, 2):  # each committed step restores whole
    with TrainCheckpointer(c, keep=5, save_every=1) as ckpt:
      got, restored, _ = ckpt.restore_latest(abstract, shardings, config, data_state_of)
    assert got == step
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), w(step))
    shutil.rmtree(os.path.join(c, str(step)))


@pytest.mark.timeout(120)
def test_a_real_full_disk_keeps_the_committed_steps(tmp_path):
  """Issue 36 #1 on a real small file system: a tmpfs mounted here as root,
  else in a user and mount namespace (`unshare -rm`), else skipped."""
  mount = tmp_path / "tmpfs"
  mount.mkdir()
  if os.geteuid() == 0 and _mount_tmpfs(mount):
    try:
      full_tmpfs_scenario(str(mount))
    finally:
      subprocess.run(["umount", str(mount)], check=True)
    return
  unshare = [
    "unshare",
    "-rm",
    "sh",
    "-c",
    f'mount -t tmpfs -o size=1m tmpfs {mount} && exec "$@"',
    "-",
  ]
  if shutil.which("unshare") is None or subprocess.run([*unshare, "true"]).returncode:
    pytest.skip("cannot mount a tmpfs here: not root, and no user namespaces (unshare -rm)")
  result = subprocess.run(
    [*unshare, sys.executable, "-c", _TMPFS_SCENARIO, str(mount), str(REPO / "tests")],
    capture_output=True,
    text=True,
    timeout=100,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert result.returncode == 0 and "scenario passed" in result.stdout, result.stderr[-3000:]


def _mount_tmpfs(path) -> bool:
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)])
  return mounted.returncode == 0


def _toy_checkpoints(directory, steps, keep=3):
  """Committed toy steps: step s holds w = s, its own step number and a data
  state at example 10 s."""
  with TrainCheckpointer(directory, keep=keep, save_every=1) as ckpt:
    for step in steps:
      data = {"shards": 1, "next_example": {"0": 10 * step}}
      assert ckpt.save(step, _toy_state(float(step), step), data, digits_config())


def test_a_step_folder_copied_under_another_number_is_refused(tmp_path):
  """Issue 36 #3: `cp -r checkpoints/2 checkpoints/100` resumed "from step 100"
  with step 2's state, and retention then deleted the good step 4."""
  c = tmp_path / "c"
  _toy_checkpoints(c, [2, 4])
  shutil.copytree(c / "2", c / "100")
  with pytest.raises(CheckpointError) as caught:
    _restore_toy(c)
  assert str(caught.value) == (
    f"checkpoint folder {c}/100 holds the state of step 2, not of step 100 (copied or "
    f"renamed?); rename it back to {c}/2 or move it out of {c}, then run again"
  )
  assert _listing(c) == ["100", "2", "4"]
  shutil.move(c / "100", tmp_path / "aside")  # the fix the message names
  assert _restore_toy(c) == (4, 4.0, {"shards": 1, "next_example": {"0": 40}})


def test_a_save_never_writes_over_a_step_folder_it_did_not_write(tmp_path):
  """save() skipped any existing step folder quietly; it may skip only the
  step it restored or saved itself (the same state), else it names the folder."""
  c, config = tmp_path / "c", digits_config()
  _toy_checkpoints(c, [1, 2])
  abstract, shardings = _abstract_toy()
  with TrainCheckpointer(c, keep=3, save_every=1) as ckpt:
    step, state, _ = ckpt.restore_latest(abstract, shardings, config, data_state_of)
    assert step == 2 and not ckpt.save(2, state, _DATA, config, force=True)  # its own
    shutil.copytree(c / "1", c / "3")  # another step 3 appears while it runs
    with pytest.raises(
      CheckpointError,
      match=rf"cannot save step 3: the folder {c}/3 already holds a checkpoint this run did "
      rf"not write \(copied in while it ran\?\); move it out of {c} and resume",
    ):
      ckpt.save(3, _toy_state(3.0, 3), _DATA, config)
  assert _listing(c) == ["1", "2", "3"]
  assert _files(c / "3") == _files(c / "1")  # untouched


_KILLED_SAVE = """
import os, signal, sys, time
import jax, jax.numpy as jnp
from monoformer_jax.checkpoints import TrainCheckpointer
from monoformer_jax.config import config_file
config = config_file("digits:tiny")
ckpt = TrainCheckpointer(sys.argv[1], keep=5, save_every=1)
for step in (1, 2, 3):
  # Step 3 is large (64 MB) so that its write lasts long after its folder appears.
  w = jnp.full((4096, 4096) if step == 3 else (512, 512), float(step))
  ckpt.save(step, dict(step=jnp.array(step, jnp.int32), params={"w": w}),
            {"shards": 1, "next_example": {"0": 10 * step}}, config)
  if step == 2:
    ckpt.wait()
# Killed once step 3's save is under way (the async save makes its folder later).
while not os.path.exists(os.path.join(sys.argv[1], "3.orbax-checkpoint-tmp")):
  if os.path.exists(os.path.join(sys.argv[1], "3")):
    sys.exit("step 3 was committed before it could be killed")
  time.sleep(0.001)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.timeout(120)
def test_a_save_killed_in_flight_is_cleaned_and_the_run_resumes_from_the_last_commit(
  tmp_path, absl_records
):
  """Issue 36 #9: what a kill during a save leaves (an uncommitted
  `3.orbax-checkpoint-tmp`) never counts as a step; the next run names it,
  removes it and resumes from step 2."""
  c = tmp_path / "c"
  killed = _python("-c", _KILLED_SAVE, str(c))
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert _listing(c) == ["1", "2", "3.orbax-checkpoint-tmp"]
  assert _restore_toy(c, 512) == (2, 2.0, {"shards": 1, "next_example": {"0": 20}})
  assert any(
    r == f"removing {c}/3.orbax-checkpoint-tmp: a save that never committed (killed or failed)"
    for r in absl_records
  )
  _toy_checkpoints(c, [3])  # the resumed run saves step 3 again
  assert _listing(c) == ["1", "2", "3"]


@pytest.mark.parametrize(
  "data, why",
  [
    ({"shards": 1}, r"the data state holds the keys \['shards'\], not 'shards' and 'next_example'"),
    (
      {"shards": 1, "next_example": {"0": 5}, "note": "x"},
      r"holds the keys \['next_example', 'note', 'shards'\]",
    ),
    ({"shards": 2, "next_example": {"0": 5}}, r"not one position for each of its 2 shards"),
    ({"shards": 1, "next_example": {"0": -3}}, r"the data state's shard 0 is -3, not an example"),
    ({"shards": 1, "next_example": {"0": "7"}}, r"shard 0 is '7', not an example index"),
    (
      {"shards": True, "next_example": {"0": 1}},
      r"the data state's shards is True, not an integer",
    ),
    ([3], r"the data state is list \[3\], not a dict"),
    ({"process_1": {"next_example": 4}}, r"is not a position for processes 0..0"),
  ],
)
def test_a_data_state_of_wrong_content_is_set_aside_like_a_broken_one(
  tmp_path, absl_records, data, why
):
  """Valid JSON that is no data state ended in a KeyError or IndexError (or
  read from a negative example), and the step was not set aside."""
  c, config = tmp_path / "c", digits_config()
  _toy_checkpoints(c, [1])
  with TrainCheckpointer(c, keep=3, save_every=1) as ckpt:
    ckpt.save(2, _toy_state(2.0, 2), data, config)
  assert _restore_toy(c) == (1, 1.0, {"shards": 1, "next_example": {"0": 10}})
  warned = [r for r in absl_records if "cannot be read" in r]
  assert len(warned) == 1 and re.search(
    rf"{re.escape(str(c))}/2 cannot be read: FileFormatError: .*{why}", warned[0]
  )
  assert _listing(c) == ["1"] and _listing(tmp_path / "c_unreadable") == ["2"]


def test_every_data_state_form_a_version_wrote_still_resumes():
  assert data_state_of({"next_example": 7}) == {"shards": 1, "next_example": {"0": 7}}
  assert data_state_of({"process_1": {"next_example": 5}, "process_0": {"next_example": 4}}) == {
    "shards": 2,
    "next_example": {"0": 4, "1": 5},
  }
  state = {"shards": 2, "next_example": {"1": 3, "0": 2}}
  assert data_state_of(state) == {"shards": 2, "next_example": {"0": 2, "1": 3}}


def test_only_committed_step_folders_count_as_steps(tmp_path):
  """A file named like a step, a zero-padded copy, an uncommitted save or a
  note beside the steps: training ignored them, but sampling and evaluation
  (`resolve`) took `7` or `0006` for the newest step and failed on it."""
  c = tmp_path / "c"
  _toy_checkpoints(c, [2, 4])
  (c / "7").write_text("not a step")
  shutil.copytree(c / "4", c / "0006")
  shutil.copytree(c / "4", c / "6.orbax-checkpoint-tmp")
  (c / "best").mkdir()
  assert orbax_io.resolve(str(c)) == orbax_io.resolve(str(c / "4")) == (str(c), 4)
  with pytest.raises(MissingPathError, match=r"no checkpoint in '.*0006'"):
    orbax_io.resolve(str(c / "0006"))
  assert _restore_toy(c)[0] == 4
  assert _listing(c) == ["0006", "2", "4", "7", "best"]  # the uncommitted save removed


def test_a_checkpoints_folder_that_cannot_take_a_step_is_refused_before_training(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(
    PathError,
    match=r"cannot keep checkpoints in .*file \(a file is there, not a folder\); move what is "
    r"there away or make it writable, or pass another --workdir",
  ):
    TrainCheckpointer(tmp_path / "file", keep=3, save_every=1)
  # A broken step that cannot be moved aside (here a file has the name of the
  # folder it would go to) stops the run naming both, the step left in place.
  c = tmp_path / "c"
  _toy_checkpoints(c, [1, 2])
  (c / "2" / "data" / "metadata").write_text("{")
  (tmp_path / "c_unreadable").write_text("x")
  with pytest.raises(
    CheckpointError,
    match=rf"checkpoint {c}/2 cannot be read \(JSONDecodeError: .*\) and could not be moved "
    rf"aside to {c}_unreadable/2 \(File exists\); move it out of {c} yourself and run again",
  ):
    _restore_toy(c)
  assert _listing(c) == ["1", "2"]


def test_a_step_that_retention_cannot_delete_does_not_fail_the_save(tmp_path, absl_records):
  """Orbax refuses to delete a step folder that is a symbolic link (a step
  kept on another disk); that came after the new step had committed, yet
  stopped the run calling the committed step not saved."""
  c, elsewhere = tmp_path / "c", tmp_path / "elsewhere"
  _toy_checkpoints(c, [1, 2], keep=2)
  shutil.move(c / "1", elsewhere)
  (c / "1").symlink_to(elsewhere)
  _toy_checkpoints(c, [3], keep=2)
  assert any(r.startswith("checkpoint step 3 saved to ") for r in absl_records)
  assert any(
    r.startswith(
      "checkpoint step 3 committed, but removing the steps past train.keep_checkpoints failed ("
    )
    for r in absl_records
  )
  assert _listing(c) == ["1", "2", "3"] and (elsewhere / "state").is_dir()
  assert _restore_toy(c)[:2] == (3, 3.0)


_RESTORE_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[2])
import monoformer_jax  # before jax, as in the entry points: no CUDA plugin lines on stderr
import jax
from helpers import digits_config
from monoformer_jax.checkpoints import TrainCheckpointer
from monoformer_jax.cli import quiet_logs
from monoformer_jax.data.sharded import data_state_of
from monoformer_jax.parallel import sharding
from monoformer_jax.train.state import make_optimizer, state_shardings
quiet_logs()   # what every entry point logs with
config = digits_config()
mesh = sharding.make_mesh(config.mesh)
with jax.set_mesh(mesh), sharding.logical_rules(config.sharding_rules):
  _, abstract, shardings = state_shardings(config, mesh, make_optimizer(config.optim)[0])
  step, state, _ = TrainCheckpointer(sys.argv[1], keep=3, save_every=1).restore_latest(
      abstract, shardings, config, data_state_of)
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
    ckpt.save(step, _toy_state(float(step), step), _DATA, config)
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
      abstract, shardings, config, data_state_of
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
  with pytest.raises(PathError, match=r"^--workdir is empty; pass a folder for the checkpoints"):
    train_and_evaluate(digits_config(), "")
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


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_config_flag_errors_are_one_line_before_jax_starts(tmp_path):
  """The issue's misspelt field (was a 57-line KeyError) and missing file (a
  48-line OSError), through two entry points. JAX_PLATFORMS names no backend,
  so a process that reached JAX's devices would fail otherwise."""
  env = dict(os.environ, JAX_PLATFORMS="no_such_backend")
  workdir = tmp_path / "w"
  misspelt = subprocess.run(
    [sys.executable, "-m", "monoformer_jax.train", TINY_CONFIG_FLAG, f"--workdir={workdir}"]
    + ["--config.train.num_step=3"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=100,
    env=env,
  )
  assert misspelt.returncode == 2, misspelt.stderr[-2000:]
  assert misspelt.stderr.splitlines() == [
    "error: train.num_step is not a config field (--config.train.num_step=3): did you mean "
    "train.num_steps? (every field and its default: monoformer_jax/config/schema.py)",
    "(--verbose shows the traceback)",
  ]
  missing = subprocess.run(
    [sys.executable, "-m", "monoformer_jax.evaluate", "--checkpoint=x", "--config=configs/nope.py"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=100,
    env=env,
  )
  assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 2, missing.stderr[-2000:]
  assert (
    missing.stderr.startswith("error: --config=configs/nope.py: there is no file configs/nope.py ")
    and "configs/digits.py, configs/imagenet256.py" in missing.stderr
  )
  assert not workdir.exists()  # nothing made


@pytest.fixture(scope="module")
def model_checkpoint(tmp_path_factory):
  config = digits_config()
  params = jax.jit(lambda: init_params(config.model, seed=3))()
  path = tmp_path_factory.mktemp("models") / "digits"
  save_model(path, config, params, ema=params)
  return path


# `python -m monoformer_jax.sample ARGS` (cli.run), then sample.main again on the
# same command line in the same process (its flags parsed afresh); between them
# it prints what the folder SHOWN holds. The second run finds the model compiled
# instead of paying a process's start, load and compilation again.
_SAMPLE_TWICE = """
import os, sys
from absl import flags
from monoformer_jax import cli, sample
def twice(argv):
  sample.main(argv)
  print("after the first:", sorted(os.listdir(os.environ["SHOWN"])), flush=True)
  flags.FLAGS.unparse_flags()
  sample.main(flags.FLAGS(["sample", *sys.argv[1:]]))
cli.run(twice)
"""


@pytest.mark.slow
def test_sample_cli_writes_beside_the_checkpoint_and_never_overwrites(
  model_checkpoint, monkeypatch
):
  flags = ("text", f"--checkpoint={model_checkpoint}", "--text_prompt=two", "--max_new_tokens=2")
  monkeypatch.setenv("SHOWN", str(model_checkpoint.parent))
  both = _python("-c", _SAMPLE_TWICE, *flags)
  assert both.returncode == 0, both.stderr[-2000:]
  # The first run wrote digits_samples_step0 beside the checkpoint.
  (shown,) = re.findall(r"^after the first: (.*)$", both.stdout, re.M)
  assert "'digits_samples_step0'" in shown and "step0-2" not in shown, shown
  assert (model_checkpoint.parent / "digits_samples_step0" / "text.txt").exists()
  # The second, on the same command line, writes a new folder beside it.
  assert (model_checkpoint.parent / "digits_samples_step0-2" / "text.txt").exists()
  # An --output_dir given that holds outputs is refused: test_sample_cli.py's refusals.
