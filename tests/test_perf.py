"""The model-FLOP count behind MFU, against XLA's own count of the compiled step."""

import types

import jax
import pytest

from monoformer_jax import perf
from monoformer_jax.config import config_file
from monoformer_jax.data.datasets import make_batches
from monoformer_jax.diffusion.gaussian import from_config
from monoformer_jax.model.build import abstract_model, init_params, train_flops_per_row
from monoformer_jax.text.tokenizer import tokenizer_of
from monoformer_jax.train.step import make_loss_fn


def _xla_flops_of_the_gradient(config) -> float:
  graphdef, _, _ = abstract_model(config.model)
  diffusion = from_config(config.diffusion)
  loss = make_loss_fn(graphdef, diffusion, config)
  batch = next(make_batches(config, tokenizer_of(config)))
  grad = jax.jit(jax.grad(lambda p, b, k: loss(p, b, k)[0]))
  compiled = grad.lower(init_params(config.model, 0), batch, jax.random.PRNGKey(0)).compile()
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


@pytest.mark.slow
def test_the_count_is_xlas_for_one_layer_and_xla_sees_a_scanned_layer_once():
  config = config_file("digits")
  # The count is the decoder's and its heads': a model that reads no image (a
  # reading one adds im_embedder on its read tokens, which the count leaves out).
  config.model.update(
    num_layers=1,
    hidden_size=256,
    head_dim=64,
    mlp_dim=704,
    dtype="float32",
    remat=False,
    vision_encoder="",
    scan_unroll=1,
  )
  config.data.update(
    batch_size=4, seq_len=128, prefetch=0, max_read_images_per_row=0, read_fraction=0.0
  )
  ours = train_flops_per_row(config.model, 128) * 4
  # One layer: XLA counts what we count plus the elementwise work (norms,
  # softmax, activations, the loss): a few percent more, never less.
  assert 1.0 <= _xla_flops_of_the_gradient(config) / ours < 1.05
  # Three scanned layers: XLA still counts the body once, so its count falls
  # well short of the model's; MFU cannot be taken from it.
  config.model.num_layers = 3
  ours = train_flops_per_row(config.model, 128) * 4
  assert _xla_flops_of_the_gradient(config) / ours < 0.6


def test_chips_are_found_by_device_kind():
  kind = lambda k: types.SimpleNamespace(device_kind=k)
  assert perf.chip_of(kind("TPU v5 lite")).name == "v5e"
  assert perf.chip_of(kind("TPU v5p")).name == "v5p"
  assert perf.chip_of(kind("TPU v4")).bf16_tflops == 275.0
  assert perf.chip_of(kind("NVIDIA H200")).name == "H200"
  assert perf.chip_of(kind("cpu")) is None
  with pytest.raises(KeyError, match="known"):
    perf.chip_named("v9")
