"""Test set-up: 8 simulated CPU devices and unoptimised compiles, set before
anything imports jax; the fixtures many test files share. setup.cfg holds the
per-test timeout and the `slow` marker."""

import os
import pathlib

# One Eigen thread per process: pytest-xdist already runs a process per core,
# and threads fighting over the same cores made the suite ~25% slower.
# The H100 plan (tests/test_compile.py) compiles as launch/gpu_slurm.sh runs:
# matmuls by cuBLAS, not as Triton GEMM fusions (also ~10% less compile time).
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  " --xla_cpu_multi_thread_eigen=false --xla_gpu_enable_triton_gemm=false"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's time is XLA:CPU compiling hundreds of small programs that each
# run a few times: without LLVM's optimisations (JAX's switch for that) they
# compile in about 2/3 of the CPU time (tests/test_interleaved.py and
# test_editing.py from an empty cache: 123 -> 82 CPU seconds; the rare test
# that computes for long, the Inception CLI's, loses ~10 s). Set in the
# environment, so the CLI processes that tests start compile the same programs.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# No test reaches the network: a hub id (monoformer_jax/hub.py) is read from the
# hub cache only (tests/test_hub.py lays one out), in this process and the CLIs'.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = pathlib.Path(__file__).resolve().parents[1]
# Compiled steps are shared by the tests (and their subprocesses) through
# JAX's persistent cache: most tests compile the same tiny train step.
os.environ.setdefault(
  "MONOFORMER_COMPILATION_CACHE", str(REPO / ".pytest_cache" / "jax_compilation_cache")
)

import pytest  # noqa: E402

from monoformer_jax import cli  # noqa: E402

cli.use_compilation_cache()
cli.keep_host_memory()  # as every entry point does (cli.run)
# The official implementation's outputs on a tiny model (a copy of the
# project's shared/fixtures/official_tiny; its README says how they were made).
FIXTURES = REPO / "tests" / "fixtures" / "official_tiny"


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory):
  """helpers.random_digits_checkpoint, made once per test process for the
  tests that only read it (sampling and evaluation, in-process and by CLI)."""
  from helpers import random_digits_checkpoint

  return random_digits_checkpoint(tmp_path_factory.mktemp("digits_checkpoint"))


@pytest.fixture(scope="session")
def fixture_dir():
  assert FIXTURES.exists(), f"reference fixtures missing at {FIXTURES}"
  return FIXTURES


@pytest.fixture
def one_device():
  """The test's meshes span the first device only (helpers.on_one_device)."""
  from helpers import on_one_device

  with on_one_device():
    yield


# The modules that take longest, longest first (seconds of one CI worker,
# 2026-12-08: the pod run ~100-160, then 50-110 each). They start the run, and
# the rest follow by number of tests (what loadscope does by itself, and
# setup.cfg turns off with --no-loadscope-reorder): loadscope's own order put
# the launchers' few, long tests last, where one worker could be left with
# minutes of them while the other stood idle.
LONGEST_FIRST = (
  "test_launch.py",
  "test_evaluate.py",
  "test_gcs_train.py",
  "test_sharding.py",
  "test_sample_cli.py",
  "test_pallas_attention.py",
  "test_read_images.py",
  "test_interleaved.py",
  "test_failures.py",
  "test_gcs_checkpoints.py",
)


def pytest_collection_modifyitems(items):
  counts = {}
  for item in items:
    counts[item.path.name] = counts.get(item.path.name, 0) + 1

  def rank(item):
    name = item.path.name
    if name in LONGEST_FIRST:
      return (LONGEST_FIRST.index(name), 0)
    return (len(LONGEST_FIRST), -counts[name], name)

  items.sort(key=rank)  # stable: a module's tests keep their order


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook
def pytest_handlecrashitem(crashitem, report, sched):
  """A test that ends its worker (pytest-timeout's thread method, or XLA
  aborting a deadlocked collective) fails once. pytest-xdist's --dist
  loadscope puts it back in the queue with the rest of its module (the
  replacement worker would run it again, hang again, up to 8 times); marking
  it done leaves only the module's other tests to run."""
  for work_unit in getattr(sched, "workqueue", {}).values():
    if crashitem in work_unit:
      work_unit[crashitem] = True


def _emulator_download_names_the_generation():
  """GCS answers a download with the object's generation in `x-goog-generation`;
  the emulator leaves it out, and TensorStore, reading back an OCDBT manifest
  while Orbax saves, then fails with "Malformed StorageGeneration" (about every
  other training run's save). Added to the emulator's handler before its routes
  are built (server.py binds them when imported)."""
  from gcp_storage_emulator.handlers import objects

  if getattr(objects.download, "names_generation", False):
    return
  download = objects.download

  def with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # no such object: the 404 is already set
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])

  with_generation.names_generation = True
  objects.download = with_generation


def start_gcs_server(data_dir=None, port: int | None = None):
  """(server, url): a GCS-protocol server on localhost with the bucket
  `bucket`, in memory, or keeping its objects in `data_dir` (so it can be
  stopped and started again on `port` with them)."""
  import socket

  _emulator_download_names_the_generation()
  from gcp_storage_emulator.server import create_server

  if port is None:
    with socket.socket() as probe:
      probe.bind(("127.0.0.1", 0))
      port = probe.getsockname()[1]
  server = create_server(
    "127.0.0.1",
    port,
    in_memory=data_dir is None,
    default_bucket="bucket",
    data_dir=None if data_dir is None else os.fspath(data_dir),
  )
  server.start()
  return server, f"http://127.0.0.1:{port}"


def gcs_env(url: str) -> dict:
  """The standard variables that send every client to the server at `url`."""
  return dict(
    STORAGE_EMULATOR_HOST=url,
    TENSORSTORE_GCS_HTTP_URL=url,
    # gcsfs otherwise waits ~60 s on a gRPC bucket-type probe the server cannot answer.
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
  )


@pytest.fixture(scope="session")
def gcs_server():
  """A GCS-protocol server on localhost (gcp-storage-emulator, in memory, with
  the bucket `bucket`), reached through the standard variables every client
  reads: STORAGE_EMULATOR_HOST (google-cloud-storage, gcsfs, etils.epath) and
  TENSORSTORE_GCS_HTTP_URL (TensorStore: Orbax's arrays). Set in os.environ,
  so the processes tests start reach it too. Yields its URL."""
  server, url = start_gcs_server()
  env = gcs_env(url)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield url
  finally:
    server.stop()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@pytest.fixture
def gcs_path(gcs_server, request):
  """A fresh gs:// folder for one test, in the server's bucket."""
  import uuid

  return f"gs://bucket/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
