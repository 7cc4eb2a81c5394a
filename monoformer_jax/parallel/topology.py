"""Accelerator slices by name, and their devices without the accelerators.

`topology_of("v5p-32")` reads a Cloud TPU name; `devices_of(topology)` gives
its compile-only devices (`jax.experimental.topologies`, through libtpu: `pip
install -e ".[tpu]"`): a program can be lowered and compiled for them from
any host, a CPU laptop included, but they hold no arrays.

Names count what Cloud TPU counts. v4-N and v5p-N count TensorCores, two per
chip, and JAX sees one device per chip (megacore), so v5p-32 is 16 chips on a
2x2x4 torus; v5e-N and v6e-N count chips, on a 2-D torus (v5e-16 is 4x4).
The raw form `v5p:2x2x4` (generation:chips per torus dimension) names any
other shape. `num_slices` > 1 is that many such slices joined by the
data-centre network (TPU multi-slice; devices carry their `slice_index`).

GPUs: jax 0.10.2 makes no compile-only GPU devices by itself. JAX's CUDA
plugin does (`pip install jax-cuda12-plugin==<jax version>`; its CUDA
libraries are not needed) from a description of the GPU, and only in a
process whose CUDA backend is off (JAX_PLATFORMS=cpu: without CUDA the plugin
registers only then). `h100-N` (N GPUs, 8 per host) uses XLA's description
of an H100 SXM; other GPUs have none here: plan on a GPU host of that kind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile

from monoformer_jax import perf
from monoformer_jax.errors import ConfigError, NotInstalledError

# Chips per torus dimension of one slice, by generation and the count in its name.
_TORUS_3D = {
  4: (2, 2, 1),
  8: (2, 2, 2),
  16: (2, 2, 4),
  32: (2, 4, 4),
  64: (4, 4, 4),
  128: (4, 4, 8),
  256: (4, 8, 8),
  512: (8, 8, 8),
  1024: (8, 8, 16),
  2048: (8, 16, 16),
}
_TORUS_2D = {
  1: (1, 1),
  4: (2, 2),
  8: (2, 4),
  16: (4, 4),
  32: (4, 8),
  64: (8, 8),
  128: (8, 16),
  256: (16, 16),
}
# generation -> (named shapes, torus dimensions, TensorCores per chip in the name)
_GENERATIONS = {
  "v4": (_TORUS_3D, 3, 2),
  "v5p": (_TORUS_3D, 3, 2),
  "v5e": (_TORUS_2D, 2, 1),
  "v6e": (_TORUS_2D, 2, 1),
}
GPU_PREFIXES = ("h100", "h200", "a100", "b200", "gb200", "gpu", "cuda")
GPUS_PER_HOST = 8
# What XLA's GPU compiler plans for: an H100 SXM 80 GB, as XLA describes it
# (its GpuTargetConfigProto, xla/backends/gpu/target_config/specs/h100_sxm).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
runtime_version { major: 12 minor: 8 }
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


@dataclasses.dataclass(frozen=True)
class Topology:
  """One or more identical TPU slices, or GPU hosts."""

  name: str  # as the user wrote it, e.g. 'v5p-32'
  generation: str  # 'v4', 'v5p', 'v5e', 'v6e'; 'h100'
  shape: tuple[int, ...]  # TPU: chips per torus dimension of one slice;
  # GPU: (hosts, GPUs per host)
  num_slices: int = 1

  @property
  def platform(self) -> str:
    return "gpu" if self.generation == "h100" else "tpu"

  @property
  def chip(self) -> perf.Chip:
    return perf.chip_named(self.generation.upper() if self.platform == "gpu" else self.generation)

  @property
  def chips(self) -> int:
    """Chips (JAX devices) of all the slices."""
    return math.prod(self.shape) * self.num_slices

  @property
  def libtpu_name(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.shape))}"

  def __str__(self):
    if self.platform == "gpu":
      return f"{self.name} ({self.shape[0]} host(s) x {self.shape[1]} {self.chip.name})"
    slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
    return f"{self.name} ({self.libtpu_name}, {math.prod(self.shape)} chips{slices})"


def known_names() -> list[str]:
  """Every name `topology_of` accepts besides the raw 'gen:AxBxC' form."""
  return [
    f"{gen}-{chips * cores}"
    for gen, (shapes, _, cores) in _GENERATIONS.items()
    for chips in sorted(shapes)
  ]


def topology_of(name: str, num_slices: int = 1) -> Topology:
  """The Topology of a Cloud TPU name ('v5p-32', 'v5e-16') or raw 'v5p:2x2x4'."""
  if not isinstance(num_slices, int) or num_slices < 1:
    raise ConfigError(f"--num_slices={num_slices!r}: must be an integer >= 1")
  text = name.strip().lower()
  if text.startswith(GPU_PREFIXES):
    return _gpu_topology(name, text, num_slices)
  raw = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)*)", text)
  named = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", text)
  if raw:
    generation = raw.group(1)
    shape = tuple(int(d) for d in raw.group(2).split("x"))
    dims = _GENERATIONS[generation][1]
    if len(shape) != dims or min(shape) < 1:
      raise ConfigError(
        f"--topology={name!r}: {generation} slices are {dims}-D tori of "
        f"chips, e.g. {'2x2x4' if dims == 3 else '4x4'}"
        f" written {generation}:" + "x".join(["N"] * dims)
      )
  else:
    generation, count = (named.group(1), int(named.group(2))) if named else ("", 0)
    shapes, _, cores = _GENERATIONS.get(generation, ({}, 0, 1))
    if count % cores or count // cores not in shapes:
      raise ConfigError(
        f"--topology={name!r} is not a TPU slice this knows; known: "
        f"{', '.join(known_names())}; or any torus as generation:shape, e.g. v5p:2x2x4 "
        "or v5e:4x4"
      )
    shape = shapes[count // cores]
  return Topology(name=name, generation=generation, shape=shape, num_slices=num_slices)


def _gpu_topology(name: str, text: str, num_slices: int) -> Topology:
  gpus = re.fullmatch(r"h100-(\d+)", text)
  count = int(gpus.group(1)) if gpus else 0
  if not gpus or count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
    raise ConfigError(
      f"--topology={name!r}: GPUs are planned here only as h100-N (N H100s, "
      f"{GPUS_PER_HOST} per host: h100-8, h100-16, ...), the one GPU whose compiler "
      "description this has; for another GPU, compile on a host that has it "
      "(`python -m monoformer_jax.train` compiles the same step)"
    )
  if num_slices != 1:
    raise ConfigError(
      f"--num_slices={num_slices} is for TPU slices; name the GPUs of "
      f"every host instead, e.g. --topology=h100-{GPUS_PER_HOST * num_slices}"
    )
  hosts = max(1, count // GPUS_PER_HOST)
  return Topology(name=name, generation="h100", shape=(hosts, count // hosts))


def _host_bounds(topology: Topology) -> tuple[int, int, int]:
  """Chips per host: 2x2x1 (4-chip hosts) on every slice but the single-host
  v5e/v6e ones of 1 and 8 chips."""
  if topology.generation in ("v5e", "v6e"):
    per_slice = math.prod(topology.shape)
    if per_slice == 1:
      return (1, 1, 1)
    if per_slice == 8:
      return (2, 4, 1)
  return (2, 2, 1)


@contextlib.contextmanager
def _quiet_stderr():
  """Holds back what C++ writes to stderr meanwhile (libtpu's first load off a
  TPU VM complains that it found no TPU metadata), and lets it out only if
  the block raises."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      held.seek(0)
      sys.stderr.write(held.read().decode(errors="replace"))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def devices_of(topology: Topology) -> list:
  """The compile-only devices of `topology`, one per chip, in libtpu's order."""
  from jax.experimental import topologies

  if topology.platform == "gpu":
    devices = _gpu_devices(topology)
  else:
    # libtpu takes a lock file so that one process owns a host's TPUs; a
    # compile-only load owns none, and must work beside another one (a second
    # plan, the test workers) or beside a training job on a TPU VM.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
      with _quiet_stderr():
        description = topologies.get_topology_desc(
          platform="tpu",
          topology_name=topology.libtpu_name,
          chip_config_name="megacore" if topology.generation in ("v4", "v5p") else "default",
          chips_per_host_bounds=_host_bounds(topology),
          num_slices=topology.num_slices,
        )
    except RuntimeError as error:
      if "TPU support not installed" in str(error):
        raise NotInstalledError(
          f"compiling for {topology} needs libtpu, which is not installed: "
          'pip install -e ".[tpu]" (jax[tpu] of the installed jax version)'
        ) from error
      raise
    devices = list(description.devices)
  if len(devices) != topology.chips:  # a libtpu that counts otherwise: a bug here
    raise RuntimeError(
      f"{len(devices)} compile-only devices for {topology}, expected "
      f"one per chip ({topology.chips})"
    )
  return devices


def _gpu_devices(topology: Topology) -> list:
  import importlib.util

  import jax
  from jax.experimental import topologies

  try:
    plugin = importlib.util.find_spec("jax_plugins.xla_cuda12")
  except ModuleNotFoundError:  # no jax_plugins at all
    plugin = None
  if plugin is None:
    raise NotInstalledError(
      f"compiling for {topology} without a GPU needs JAX's CUDA plugin, which is not "
      f"installed: pip install jax-cuda12-plugin=={jax.__version__} (its CUDA libraries "
      "are not needed); or compile on a GPU host"
    )
  hosts, per_host = topology.shape
  try:
    with _quiet_stderr():
      description = topologies.get_topology_desc(
        platform="cuda",
        topology_name=topology.generation,
        topology=f"1x{hosts}x{per_host}",
        target_config=H100_TARGET,
      )
  except NotImplementedError as error:  # the plugin did not register a cuda backend
    raise NotInstalledError(
      "JAX's CUDA plugin is installed but did not register: without CUDA libraries it "
      "does so only when JAX_PLATFORMS leaves cuda out; run with JAX_PLATFORMS=cpu (what "
      "`python -m monoformer_jax.compile` sets unless told otherwise)"
    ) from error
  return list(description.devices)
