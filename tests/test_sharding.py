"""Sharded and single-device runs agree: init, loss and gradients, on any mesh."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import digits_config
from jax.sharding import PartitionSpec as P

from monoformer_jax.data.packing import pack_examples
from monoformer_jax.diffusion.gaussian import from_config
from monoformer_jax.layout import Example, row_spec
from monoformer_jax.model.build import abstract_model, init_params
from monoformer_jax.parallel import sharding
from monoformer_jax.text.tokenizer import ByteTokenizer
from monoformer_jax.train.state import create_train_state, make_optimizer, state_shardings
from monoformer_jax.train.step import accumulated_grads, make_loss_fn

MESHES = [(2, 4, 1), (1, 4, 2), (8, 1, 1)]


def _batch(config):
  """Eight rows of two packed examples each: an image example (a prompt of
  5 + r random tokens, the image, 3 more) and a text example of 10 + r tokens."""
  rng = np.random.default_rng(0)
  tok = ByteTokenizer()
  spec = row_spec(config, tok)
  words = lambda n: rng.integers(3, 259, n).tolist()
  examples = []
  for r in range(8):
    image = rng.uniform(-1, 1, spec.image_shape).astype(np.float32)
    examples += [Example(words(5 + r) + [tok.image_id] + words(3), [image]), Example(words(10 + r))]
  batch = pack_examples(examples, spec)
  assert batch["tokens"].shape == (8, 48) and (batch["segment_ids"].max(1) == 2).all()
  return batch


@pytest.fixture(scope="module")
def setup():
  config = digits_config()
  config.data.max_images_per_row = 2
  config.data.seq_len = 48
  graphdef, _, _ = abstract_model(config.model)
  diffusion = from_config(config.diffusion)
  loss_fn = make_loss_fn(graphdef, diffusion, config)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  params = jax.jit(lambda: init_params(config.model, config.seed))()
  batch = _batch(config)
  key = jax.random.PRNGKey(3)
  (loss, metrics), grads = jax.jit(grad_fn)(params, batch, key)
  assert metrics["images"] == 8 and metrics["text_tokens"] > 0
  return config, grad_fn, params, batch, key, (loss, grads)


def _sharded_loss_and_grads(config, grad_fn, params, batch, key, shape):
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
  tx, _ = make_optimizer(config.optim)
  with jax.set_mesh(mesh), sharding.logical_rules(config.sharding_rules):
    _, _, sh = state_shardings(config, mesh, tx)
    batch_sh = sharding.batch_sharding(mesh, config.sharding_rules, 1)
    f = jax.jit(
      grad_fn, in_shardings=(sh["params"], batch_sh, None), out_shardings=(None, sh["params"])
    )
    (loss, _), grads = f(jax.device_put(params, sh["params"]), jax.device_put(batch, batch_sh), key)
  return loss, grads


def _assert_same(loss_n, grads_n, loss_1, grads_1):
  # Same math, different reduction order across devices: float32 round-off only.
  np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5)
  flat_1 = jax.tree_util.tree_leaves_with_path(grads_1)
  flat_n = jax.tree.leaves(grads_n)
  for (path, g1), gn in zip(flat_1, flat_n):
    scale = float(jnp.abs(g1).max()) + 1e-12
    np.testing.assert_allclose(
      np.asarray(gn) / scale, np.asarray(g1) / scale, atol=2e-5, err_msg=jax.tree_util.keystr(path)
    )


@pytest.mark.parametrize("shape", MESHES)
def test_loss_and_gradients_match_one_device(setup, shape):
  config, grad_fn, params, batch, key, (loss_1, grads_1) = setup
  _assert_same(
    *_sharded_loss_and_grads(config, grad_fn, params, batch, key, shape), loss_1, grads_1
  )


@pytest.mark.slow
def test_pallas_attention_in_the_sharded_model_matches_xla_on_one_device(setup):
  # The model with the Pallas kernel (interpreted), per shard in shard_map:
  # batch over data x fsdp = 4, heads and kv heads over tensor = 2.
  config, _, params, batch, key, (loss_1, grads_1) = setup
  config = config.copy_and_resolve_references()
  config.model.attention_impl = "pallas"
  graphdef, _, _ = abstract_model(config.model)
  loss_fn = make_loss_fn(graphdef, from_config(config.diffusion), config)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  _assert_same(
    *_sharded_loss_and_grads(config, grad_fn, params, batch, key, (1, 4, 2)), loss_1, grads_1
  )


def test_sharded_init_places_each_shard_and_matches_unsharded(setup):
  config, _, params, _, _, _ = setup
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
  tx, _ = make_optimizer(config.optim)
  with jax.set_mesh(mesh):
    _, state, _ = create_train_state(config, mesh, tx)
  wq = state["params"]["decoder"]["layers"]["attn"]["wq"]  # [layers, E, H, D]
  assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
  n, e, h, d = wq.shape
  assert {s.data.shape for s in wq.addressable_shards} == {(n, e // 4, h // 2, d)}
  mu = state["opt_state"][1][0].mu["decoder"]["layers"]["attn"]["wq"]
  assert mu.sharding.spec == wq.sharding.spec
  chex.assert_trees_all_equal(state["params"], params)


def test_mesh_errors_name_the_fix():
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh(dict(data=2, fsdp=3, tensor=1))
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh(dict(data=-1, fsdp=-1, tensor=1))


class _Gpu:
  """A GPU as JAX describes one of a multi-node run: JAX gives each host's
  GPUs one slice_index (from the machine's boot id)."""

  def __init__(self, index, host, process_index):
    self.id, self.slice_index, self.process_index = index, host, process_index
    self.platform, self.device_kind = "gpu", "NVIDIA H100 80GB HBM3"

  def __repr__(self):
    return f"gpu{self.id}@host{self.slice_index}"


def test_a_gpu_cluster_mesh_keeps_fsdp_inside_each_node():
  """launch/gpu_slurm.sh's default (--config.mesh.dcn_data=-1 over the config's
  data=1, fsdp=-1): 3 nodes of 8 GPUs, one process per GPU, the device list
  interleaved across hosts so that the device order cannot place the axes."""
  gpus = [_Gpu(index=i, host=i % 3, process_index=i) for i in range(24)]
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1, dcn_data=-1), gpus)
  assert dict(mesh.shape) == dict(data=3, fsdp=8, tensor=1)
  host_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  # Each FSDP group (one data index) is one whole node: its all-gathers stay on NVLink.
  assert [sorted(set(host_of[i].ravel())) for i in range(3)] == [[0], [1], [2]]
  assert sorted(d.id for d in mesh.devices.ravel()) == list(range(24))
  # A user's per-node split: 2-way tensor inside the node, FSDP over the other 4 GPUs.
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=2, dcn_data=-1), gpus)
  assert dict(mesh.shape) == dict(data=3, fsdp=4, tensor=2)
  assert all(len(set(host_of_row)) == 1 for host_of_row in _hosts(mesh))
  # The schema default (dcn_data=1) on several hosts says what to set.
  with pytest.raises(ValueError, match=r"dcn_data=1 but the 24 devices form 3 slice.*=3 \(or -1"):
    sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1), gpus)
  with pytest.raises(ValueError, match=r"mesh.dcn_data=0: must be >= 1, or -1"):
    sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1, dcn_data=0), gpus)
  # One host (the CPU devices here): -1 is one slice, the config's mesh as before.
  assert dict(sharding.make_mesh(dict(data=2, fsdp=-1, tensor=1, dcn_data=-1)).shape) == dict(
    data=2, fsdp=4, tensor=1
  )


def _hosts(mesh):
  host_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  return [host_of[i].ravel() for i in range(mesh.shape["data"])]


@pytest.mark.slow
def test_gradient_accumulation_averages_the_micro_batch_gradients(setup):
  config, grad_fn, params, batch, key, _ = setup
  graphdef, _, _ = abstract_model(config.model)
  loss_fn = make_loss_fn(graphdef, from_config(config.diffusion), config)
  grads_acc, metrics_acc = jax.jit(accumulated_grads(loss_fn, 2))(params, batch, key)
  halves = [jax.tree.map(lambda x, i=i: x[i * 4 : (i + 1) * 4], batch) for i in range(2)]
  parts = [jax.jit(grad_fn)(params, h, jax.random.fold_in(key, i)) for i, h in enumerate(halves)]
  np.testing.assert_allclose(metrics_acc["loss"], (parts[0][0][0] + parts[1][0][0]) / 2, rtol=1e-6)
  expected = jax.tree.map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1])
  chex.assert_trees_all_close(grads_acc, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_masters_and_tracks_float32_loss(setup):
  config, _, params, batch, key, (loss_32, _) = setup
  config_bf16 = config.copy_and_resolve_references()
  config_bf16.model.dtype = "bfloat16"
  graphdef, _, _ = abstract_model(config_bf16.model)
  loss_fn = make_loss_fn(graphdef, from_config(config_bf16.diffusion), config_bf16)
  (loss_16, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, key)
  chex.assert_type(jax.tree.leaves(grads), jnp.float32)
  chex.assert_tree_all_finite(grads)
  # bfloat16 has an 8-bit mantissa: a few percent on the loss, no more.
  np.testing.assert_allclose(loss_16, loss_32, rtol=0.05)
  # The update of the float32 masters from those gradients, as the train step
  # applies it, keeps them float32.
  tx, _ = make_optimizer(config_bf16.optim)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  chex.assert_type(jax.tree.leaves(new), jnp.float32)
  chex.assert_tree_all_finite(new)
