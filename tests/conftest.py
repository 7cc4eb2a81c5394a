"""Test set-up: 8 simulated CPU devices, set before anything imports jax."""

import os
import pathlib

# One Eigen thread per process: pytest-xdist already runs a process per core,
# and threads fighting over the same cores made the suite ~25% slower.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_multi_thread_eigen=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# The official implementation's outputs on a tiny model (a copy of the
# project's shared/fixtures/official_tiny; its README says how they were made).
FIXTURES = REPO / "tests" / "fixtures" / "official_tiny"


@pytest.fixture(scope="session")
def fixture_dir():
  assert FIXTURES.exists(), f"reference fixtures missing at {FIXTURES}"
  return FIXTURES
