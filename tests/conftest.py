"""Test set-up: 8 simulated CPU devices, set before anything imports jax."""

import os
import pathlib

# One Eigen thread per process: pytest-xdist already runs a process per core,
# and threads fighting over the same cores made the suite ~25% slower.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = pathlib.Path(__file__).resolve().parents[1]
# Compiled steps are shared by the tests (and their subprocesses) through
# JAX's persistent cache: most tests compile the same tiny train step.
os.environ.setdefault("MONOFORMER_COMPILATION_CACHE",
                      str(REPO / ".pytest_cache" / "jax_compilation_cache"))

import pytest  # noqa: E402

from monoformer_jax import cli  # noqa: E402

cli.use_compilation_cache()
cli.keep_host_memory()   # as every entry point does (cli.run)
# The official implementation's outputs on a tiny model (a copy of the
# project's shared/fixtures/official_tiny; its README says how they were made).
FIXTURES = REPO / "tests" / "fixtures" / "official_tiny"


@pytest.fixture(scope="session")
def fixture_dir():
  assert FIXTURES.exists(), f"reference fixtures missing at {FIXTURES}"
  return FIXTURES


@pytest.fixture
def one_device(monkeypatch):
  """Meshes built during the test (a training run's, the sampler's) span the
  first device only, so a learning test runs no collective. XLA:CPU runs the
  8 simulated devices' collectives in-process, and under load an all-gather
  has waited for 8 participants while 7 arrived, until XLA aborted the
  process after 40 s: a few hundred steps of FSDP are where that struck. The
  sharding tests keep the 8 devices, in short runs."""
  import jax
  from monoformer_jax.parallel import sharding
  make_mesh = sharding.make_mesh
  monkeypatch.setattr(sharding, "make_mesh", lambda mesh_config, devices=None: make_mesh(
      mesh_config, jax.devices()[:1] if devices is None else devices))
