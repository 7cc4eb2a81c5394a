"""What the tests share: the repository's config files and their test-size
variant, runs on one device, random checkpoints and models, a Hugging Face
hub cache laid out by hand."""

import contextlib
import os

from monoformer_jax.config import CONFIGS_DIR, config_file

# `python -m monoformer_jax.train` on the test-size model, for runs in a subprocess.
TINY_CONFIG_FLAG = f"--config={CONFIGS_DIR / 'digits.py'}:tiny"


def digits_config(**train):
  """configs/digits.py:tiny (2 layers, 8 rows of 64 tokens, FSDP over the 8
  simulated devices); `train` overrides config.train fields."""
  c = config_file("digits:tiny")
  c.train.update(train)
  return c


@contextlib.contextmanager
def on_one_device():
  """Meshes built inside (a training run's, the sampler's) span the first
  device only, so a learning test runs no collective. XLA:CPU runs the 8
  simulated devices' collectives in-process, and under load an all-gather has
  waited for its 8 participants while 7 arrived, until XLA aborted the process
  after 40 s: a few hundred steps of FSDP are where that struck. Tests of
  sharding keep the 8 devices, in short runs. `one_device_env()` does the
  same for a process the test starts."""
  import jax
  import pytest

  from monoformer_jax.parallel import sharding

  make_mesh = sharding.make_mesh
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(
      sharding,
      "make_mesh",
      lambda mesh_config, devices=None: make_mesh(
        mesh_config, jax.devices()[:1] if devices is None else devices
      ),
    )
    yield


def one_device_env(**env):
  """This environment, and `env`, for a process that computes on one device
  (the last device-count flag wins over conftest's 8)."""
  return dict(
    os.environ,
    XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1",
    **env,
  )


def random_digits_checkpoint(path):
  """A digits-shaped model (2 layers) saved at `path` with random weights, raw
  and EMA; the EMA weights give the zero-initialised heads small random values,
  so samples depend on the prompt (a shift of every weight instead made every
  sample NaN)."""
  return random_checkpoint(path, digits_config())


def random_checkpoint(path, config):
  """A model of `config` saved at `path` as `random_digits_checkpoint` saves the digits'."""
  import jax

  from monoformer_jax.checkpoints import save_model
  from monoformer_jax.model.build import init_params

  params = jax.jit(lambda: init_params(config.model, seed=3))()
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  ema = jax.tree.unflatten(
    tree, [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  )
  save_model(path, config, params, ema=ema)
  return path


def random_model(config, seed=0):
  """A MonoFormer of `config` whose zero-initialised layers are made non-zero
  (every parameter moved by N(0, 0.05)), so every input reaches the outputs."""
  import jax
  from flax import nnx

  from monoformer_jax.model.monoformer import MonoFormer

  model = MonoFormer(config.model, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  nnx.update(
    model,
    jax.tree.unflatten(
      tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    ),
  )
  return model


def benchmark_module(name):
  """benchmarks/{name}.py imported with none of its own absl flags left
  behind: the scripts share flag names with each other and with the
  package's CLIs (--output, --json), and the tests call their functions. The
  flags defined so far are set aside while it imports and put back after;
  those its imports define (grain's) stay."""
  import importlib
  import sys

  from absl import flags

  folder = str(CONFIGS_DIR.parent / "benchmarks")
  if folder not in sys.path:
    sys.path.insert(0, folder)
  saved = {n: flags.FLAGS[n] for n in list(flags.FLAGS) if flags.FLAGS[n].name == n}
  for n in list(flags.FLAGS):
    delattr(flags.FLAGS, n)
  try:
    return importlib.import_module(name)
  finally:
    for n in list(flags.FLAGS):
      if flags.FLAGS.find_module_defining_flag(n) == name:
        delattr(flags.FLAGS, n)
    for n, f in saved.items():
      flags.FLAGS[n] = f


def tensorboard_scalars(folder) -> dict:
  """{tag: [(step, value), ...]} as TensorBoard shows the event files of `folder`
  (a local folder or a gs:// one, read through etils.epath):
  read in name order (the names start with the second they were opened in),
  each record a u64 length, a u32 crc, the Event proto and a u32 crc. A
  SessionLog START at step s (tensorboardX's `purge_step`) hides the events
  read before it with a step >= s, as TensorBoard's EventAccumulator does."""
  import struct

  from etils import epath
  from tensorboardX.proto.event_pb2 import Event, SessionLog

  scalars = {}
  for path in sorted(epath.Path(folder).glob("events.out.tfevents.*"), key=lambda p: p.name):
    data, at = path.read_bytes(), 0
    while at + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[at : at + 8])
      if at + 12 + n + 4 > len(data):  # cut short by a kill: TensorBoard skips it too
        break
      event = Event.FromString(data[at + 12 : at + 12 + n])
      at += 12 + n + 4
      if event.HasField("session_log") and event.session_log.status == SessionLog.START:
        for tag, points in scalars.items():
          scalars[tag] = [(s, v) for s, v in points if s < event.step]
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def hub_repo(home, repo: str, files, under: str = ""):
  """Lays out `repo` in the hub cache under `home` (a pathlib.Path, HF_HOME)
  as a download leaves it: refs/main naming the snapshot `files` (paths) are
  copied into (into its folder `under`)."""
  import hashlib
  import shutil

  commit = hashlib.sha1(repo.encode()).hexdigest()
  root = home / "hub" / f"models--{repo.replace('/', '--')}"
  (root / "refs").mkdir(parents=True, exist_ok=True)
  (root / "refs" / "main").write_text(commit)
  snapshot = root / "snapshots" / commit
  (snapshot / under).mkdir(parents=True, exist_ok=True)
  for f in files:
    shutil.copyfile(f, snapshot / under / f.name)
  return snapshot
