"""The train step compiled ahead of time for TPU slices we do not have (train/aot.py).

The compile-only TPU devices come from libtpu (the `test` extra installs it)
and live beside the 8 simulated CPU devices: no array is ever put on them.
"""

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from monoformer_jax import perf
from monoformer_jax.config import CONFIGS_DIR, config_file
from monoformer_jax.data.datasets import class_prompt_rows
from monoformer_jax.errors import ConfigError, DoesNotFitError, NotInstalledError
from monoformer_jax.eval import finite_json
from monoformer_jax.model.build import train_flops_counter, train_flops_per_row
from monoformer_jax.parallel import sharding
from monoformer_jax.parallel.topology import devices_of, topology_of
from monoformer_jax.text.tokenizer import tokenizer_of
from monoformer_jax.train.aot import measured_rows, plan

GIB = 2**30


@pytest.mark.parametrize(
  "name, shape, chip",
  [
    ("v4-8", (2, 2, 1), "v4"),
    ("v5p-8", (2, 2, 1), "v5p"),
    ("v5p-32", (2, 2, 4), "v5p"),
    ("v5p-64", (2, 4, 4), "v5p"),
    ("v5p-128", (4, 4, 4), "v5p"),
    ("v5e-16", (4, 4), "v5e"),
    ("v6e-8", (2, 4), "v6e"),
    ("v5p:2x2x1", (2, 2, 1), "v5p"),
    ("v5e:2x4", (2, 4), "v5e"),
  ],
)
def test_topology_names_count_chips_as_cloud_tpu_does(name, shape, chip):
  # v4/v5p names count TensorCores (2 per chip), v5e/v6e names count chips.
  topology = topology_of(name)
  assert topology.shape == shape and topology.chip.name == chip
  cores_per_chip = 2 if name.split("-")[0] in ("v4", "v5p") else 1
  expected = int(name.split("-")[1]) // cores_per_chip if "-" in name else math.prod(shape)
  assert topology.chips == expected
  assert topology_of(name, num_slices=3).chips == 3 * expected


@pytest.mark.parametrize("name", ["v4-8", "v5p-32", "v5e-16", "v6e-8"])
def test_the_devices_are_one_per_chip_of_the_named_kind(name):
  topology = topology_of(name)
  devices = devices_of(topology)
  assert len(devices) == topology.chips
  assert {perf.chip_of(d) for d in devices} == {topology.chip}


def test_unknown_topologies_say_what_is_known():
  for name in ("v5p-12", "v5p-9", "v7-8", "tpu"):
    with pytest.raises(ConfigError, match=r"known: v4-8, .*v5p-32, .*v5e-16, .*v6e-8"):
      topology_of(name)
  with pytest.raises(ConfigError, match="3-D tori"):
    topology_of("v5p:4x4")
  with pytest.raises(ConfigError, match="only as h100-N .* compile on a host that has it"):
    topology_of("a100-8")
  assert topology_of("h100-16").shape == (2, 8) and topology_of("h100-16").chips == 16


@pytest.mark.slow
def test_the_entry_point_stops_on_a_bad_topology_before_compiling():
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "monoformer_jax.compile",
      f"--config={CONFIGS_DIR / 'imagenet256.py'}:tiny",
      "--topology=v5p-12",
    ],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert run.returncode == 2, run.stderr
  assert "error: --topology='v5p-12' is not a TPU slice this knows; known: v4-8" in run.stderr


def _has_cuda_plugin() -> bool:
  import importlib.util

  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:
    return False


def test_gpu_plans_without_the_cuda_plugin_say_what_to_install(monkeypatch):
  # .[test] installs the plugin: its absence is simulated where topology looks for it.
  import importlib.util

  find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *a: None if name.startswith("jax_plugins") else find_spec(name, *a),
  )
  with pytest.raises(NotInstalledError, match=r"pip install jax-cuda12-plugin==.*GPU host"):
    devices_of(topology_of("h100-8"))


@pytest.mark.skipif(
  not _has_cuda_plugin(), reason="needs JAX's CUDA plugin (.[test] installs it: jax[cuda12-local])"
)
def test_the_real_step_compiles_for_h100s_with_the_triton_kernels():
  result, _text = plan(_tiny(), topology_of("h100-8"))
  assert result.devices == 8 and result.platform == "gpu" and result.kernel_calls >= 3
  assert result.fits and result.argument_bytes > 0 and result.estimate == "peak"


def test_multi_slice_mesh_puts_the_data_axis_across_slices():
  devices = devices_of(topology_of("v5p-16", num_slices=2))  # 2 x 8 chips
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1, dcn_data=2), devices)
  assert dict(mesh.shape) == dict(data=2, fsdp=8, tensor=1)
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  # Each data index is one whole slice: FSDP's all-gathers stay on ICI.
  assert [set(slice_of[i].ravel()) for i in range(2)] == [{0}, {1}]
  with pytest.raises(
    ConfigError, match=r"dcn_data=1 .* 2 slice\(s\): set --config.mesh.dcn_data=2"
  ):
    sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1), devices)
  with pytest.raises(ConfigError, match=r"dcn_data=2 but the 8 devices form 1 slice"):
    sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1, dcn_data=2))  # the CPU devices


def _tiny(**model):
  config = config_file("imagenet256:tiny")
  config.model.update(model)
  return config


def _shard_bytes(abstract_tree) -> int:
  """Bytes of one device's shards of ShapeDtypeStructs carrying shardings."""
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    for x in jax.tree.leaves(abstract_tree)
  )


@pytest.fixture(scope="module")
def tiny_plan():
  config = _tiny()
  config.train.init_from = "/no/such/start"  # a plan reads no weights: not needed here
  return config, *plan(config, topology_of("v5p:2x2x1"))


def test_the_real_step_compiles_for_tpu_with_the_mosaic_kernels(tiny_plan):
  _config, result, text = tiny_plan
  assert result.devices == 4 and result.mesh == dict(data=1, fsdp=4, tensor=1)
  # 'auto' attention chose the Pallas TPU kernels for the TPU lowering: forward
  # and the two backward kernels of every attention call.
  assert "tpu_custom_call" in text and result.kernel_calls >= 3
  assert result.hbm_bytes == perf.chip_named("v5p").hbm_gib * GIB == 95 * GIB
  assert result.fits and result.total_bytes < result.hbm_bytes
  assert result.temp_bytes > 0 and result.code_bytes > 0
  assert result.xla_flops > 0 and result.estimate == "xla" and result.step_seconds > 0
  assert 0 < result.mfu <= 1


def test_the_compiled_step_holds_the_sharded_state_and_donates_it(tiny_plan):
  from monoformer_jax.train.aot import abstract_inputs
  from monoformer_jax.train.state import make_optimizer, state_shardings

  config, result, _ = tiny_plan
  devices = devices_of(topology_of("v5p:2x2x1"))
  mesh = sharding.make_mesh(config.mesh, devices)
  tx, _ = make_optimizer(config.optim)
  _, abstract, shardings = state_shardings(config, mesh, tx)
  state, batch, health = abstract_inputs(config, mesh, abstract, shardings)
  # TPU layouts pad small arrays to whole tiles, so the compiler's figures are
  # at least the logical bytes of this device's shards.
  assert result.argument_bytes >= _shard_bytes((state, batch, health))
  assert result.alias_bytes >= _shard_bytes(state)  # the donated state is written in place
  record = json.loads(finite_json(result.as_json()))
  assert record["total_bytes"] == result.total_bytes and record["fits"] is True
  assert record["model_flops"] == train_flops_per_row(config.model, 96) * 8


def test_the_plan_counts_the_non_padding_tokens_and_images(tiny_plan):
  """The tiny ImageNet rows (bytes tokenizer, 8x8 latents: 96 columns, one image
  of 16 tokens and its prompt per row) measured by the packer: FLOPs, MFU,
  tokens and images per second count what the rows hold, not their padding."""
  config, result, _ = tiny_plan
  rows = class_prompt_rows(config, tokenizer_of(config))
  assert result.padding == rows.padding and 0.3 < rows.padding < 0.7
  per_step = config.data.batch_size / rows.rows
  assert result.images_per_step == pytest.approx(8.0)  # one image per row
  useful = train_flops_counter(config.model)(rows.tokens * per_step, rows.attended * per_step)
  assert result.useful_flops == pytest.approx(useful) and useful < 0.8 * result.model_flops
  assert result.mfu == pytest.approx(
    useful / (result.step_seconds * 4 * perf.chip_named("v5p").bf16_tflops * 1e12)
  )
  assert result.images_per_s_per_chip == pytest.approx(8.0 / result.step_seconds / 4)
  report = result.report()
  assert f"rows: {rows.padding:.1%} padding in rows of 96 columns" in report
  assert "of the non-padding tokens" in report and "images/s per chip" in report
  # Without a tokenizer (or classes) nothing is measured, and the report says so.
  for field, value, why in [
    ("tokenizer", "", "data.tokenizer is empty"),
    ("name", "chat", "data.name='chat' has no class prompts"),
  ]:
    unmeasured = _tiny()
    unmeasured.data[field] = value
    assert measured_rows(unmeasured)[0] is None
    assert measured_rows(unmeasured)[1].startswith(f"padding not measured: {why}")


def test_a_step_too_large_for_the_chip_names_the_settings_to_change():
  # A 16M-wide MLP: the tiny model's activations need ~190 GiB of temporaries.
  with pytest.raises(DoesNotFitError) as failure:
    plan(_tiny(mlp_dim=2**24), topology_of("v5p:2x2x1"))
  message = str(failure.value)
  assert "RESOURCE_EXHAUSTED" in message and "HBM" in message  # the compiler's words
  for setting in (
    "--config.mesh.tensor",
    "--config.model.remat=True",
    "--config.optim.grad_accum_steps=2",
    "--config.data.batch_size",
  ):
    assert setting in message
