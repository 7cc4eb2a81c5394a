"""The samplers: prompt cache and KV cache against recomputation, guidance,
seeds, token sampling, sharded inference against one device, and the
config's diffusion process in every sampler.

The model is the digits architecture (2 layers) with every parameter drawn at
random, so no output is trivially zero (the fresh model's diffusion head is).
Cached and uncached runs do the same float32 math in another order and
grouping: their images agree to ~1e-6 after 5 steps; 1e-4 still catches a
wrong position, a stale cache or a mask leak (each moves them by > 1e-2).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import digits_config

from monoformer_jax import inference
from monoformer_jax.config import config_file
from monoformer_jax.data.packing import pack_examples
from monoformer_jax.data.prompts import image_prompt_example, image_rows
from monoformer_jax.diffusion.gaussian import BETAS, GaussianDiffusion
from monoformer_jax.diffusion.sample_images import sample_images
from monoformer_jax.inference import generate_images
from monoformer_jax.layout import Example, Row, RowSpec
from monoformer_jax.model.build import abstract_model, param_shardings
from monoformer_jax.parallel import sharding
from monoformer_jax.text.generate import generate, sample_token
from monoformer_jax.text.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
TOL = dict(rtol=1e-4, atol=1e-4)
PROMPTS = ["Please generate an image of seven.", "two", None]  # None: unconditional


@pytest.fixture(scope="module")
def config():
  return digits_config()


@pytest.fixture(scope="module")
def model(config):
  graphdef, abstract, _ = abstract_model(config.model)
  rng = np.random.default_rng(1)

  def draw(path, x):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    return 1 + 0.1 * noise if path[-1].key == "scale" else 0.08 * noise

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract))


def _packed_rows(prompts, guidance):
  """The same prompts as right-padded packed training rows (uncached only)."""
  spec = RowSpec(
    seq_len=64,
    max_images=1,
    image_shape=(8, 8, 1),
    tokens_per_image=16,
    image_id=TOK.image_id,
    pad_id=TOK.pad_id,
  )
  prompts = list(prompts) + ([None] * len(prompts) if guidance else [])
  return Row.of(
    pack_examples(
      [image_prompt_example(p, TOK, (8, 8, 1)) for p in prompts], spec, one_per_row=True
    )
  )


def _guided_ddpm(model, rows, use_cache=True):
  d5 = GaussianDiffusion.create(1000, respacing="5")
  return np.asarray(
    sample_images(model, rows, d5, jax.random.PRNGKey(0), cfg_scale=2.0, use_cache=use_cache)
  )


def test_prompt_cache_equals_recomputing_the_row(model):
  # (The cache is the same for DDIM: only the update of x_t differs.)
  rows = image_rows(PROMPTS, TOK, 16, guidance=True)
  cached = _guided_ddpm(model, rows)
  assert cached.shape == (3, 8, 8, 1) and np.isfinite(cached).all()
  np.testing.assert_allclose(cached, _guided_ddpm(model, rows, use_cache=False), **TOL)
  # Left-padded prompt rows and right-padded packed rows are the same input.
  np.testing.assert_allclose(
    cached, _guided_ddpm(model, _packed_rows(PROMPTS, True), use_cache=False), **TOL
  )
  assert np.abs(cached[0] - cached[1]).max() > 1e-2  # the prompt matters


def test_every_image_sampler_runs_the_configs_process(monkeypatch):
  """generate_images, generate_interleaved and edit_images sample with the
  process of the config's diffusion section: its num_timesteps steps of its
  schedule (here a second one put in the table), respaced to num_steps."""
  steeper = lambda t: np.linspace(2e-4, 0.03, t)
  monkeypatch.setitem(BETAS, "steeper", steeper)
  config = config_file("digits")  # reads images, so it can edit
  config.diffusion.update(num_timesteps=400, beta_schedule="steeper")
  ran = []

  def sample_images(model, rows, diffusion, key, **kwargs):
    ran.append(diffusion)
    return np.zeros((len(rows.row.tokens), 8, 8, 1), np.float32)

  def interleave(model, rows, *, diffusion, **kwargs):
    ran.append(diffusion)
    return []

  monkeypatch.setattr(inference, "sample_images", sample_images)
  monkeypatch.setattr(inference, "interleave", interleave)
  model = types.SimpleNamespace(tokens_per_image=16, cond_token=False)  # never run
  inference.generate_images(model, TOK, ["two"], config=config, num_steps=5)
  inference.generate_interleaved(model, TOK, ["here is a"], config=config, num_steps=5)
  inference.edit_images(
    model, TOK, [np.zeros((8, 8))], "the next digit:", config=config, num_steps=5
  )
  assert len(ran) == 3
  alphas_cumprod = np.cumprod(1.0 - steeper(400))
  for process in ran:
    assert process.num_timesteps == 5 and process.timestep_map[-1] == 399
    np.testing.assert_allclose(
      process.alphas_cumprod, alphas_cumprod[process.timestep_map], rtol=1e-12, atol=0
    )


def test_guidance_scale_one_is_the_conditional_model_and_seeds_reproduce(config, model):
  images = lambda scale, seed=0, channels=None: np.asarray(
    generate_images(
      model,
      TOK,
      PROMPTS[:2],
      config=config,
      num_steps=5,
      cfg_scale=scale,
      seed=seed,
      guided_channels=channels,
    )
  )
  plain = images(None)
  np.testing.assert_allclose(images(1.0), plain, **TOL)
  guided = images(4.0)
  assert np.abs(guided - plain).max() > 1e-2
  np.testing.assert_array_equal(images(4.0), guided)  # seeded: reproducible
  assert np.abs(images(4.0, seed=1) - guided).max() > 1e-1  # another seed, other noise
  # Guiding eps channels 0..2 of a 1-channel model guides its only channel.
  np.testing.assert_allclose(images(4.0, channels=1), guided, **TOL)


def test_image_rows_must_fit_the_sampler(model):
  d5 = GaussianDiffusion.create(1000, respacing="5")
  rows = _packed_rows(PROMPTS[:2], guidance=False)
  with pytest.raises(ValueError, match="layout.prompt_rows"):
    sample_images(model, rows, d5, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="doubled batch"):
    sample_images(
      model, image_rows(PROMPTS, TOK, 16, guidance=False), d5, jax.random.PRNGKey(0), cfg_scale=2.0
    )


TEXT_PROMPTS = [
  [TOK.bos_id] + TOK.encode("three plus four is"),
  [TOK.bos_id],
  [TOK.bos_id] + TOK.encode("two"),
]


def _greedy(model):
  return generate(model, TEXT_PROMPTS, max_new_tokens=5, pad_id=TOK.pad_id, stop_ids=[TOK.eos_id])


def test_kv_cache_equals_recomputing_the_row(model):
  run = lambda cache: generate(
    model,
    TEXT_PROMPTS,
    max_new_tokens=7,
    pad_id=TOK.pad_id,
    stop_ids=[TOK.eos_id],
    key=jax.random.PRNGKey(4),
    temperature=0.9,
    top_k=20,
    top_p=0.9,
    use_cache=cache,
  )
  cached = run(True)
  assert [len(c) for c in cached] == [7, 7, 7]  # this random model never says eos
  assert cached == run(False)


def test_greedy_generation_matches_step_by_step_argmax(model):
  # The oracle: each sequence alone in a right-padded row, a full forward, argmax.
  spec = RowSpec(
    seq_len=32,
    max_images=0,
    image_shape=(8, 8, 1),
    tokens_per_image=16,
    image_id=TOK.image_id,
    pad_id=TOK.pad_id,
  )
  forward = jax.jit(lambda row: model(row)[0])
  seqs = [list(p) for p in TEXT_PROMPTS]
  for _ in range(5):
    rows = pack_examples([Example(seq) for seq in seqs], spec, one_per_row=True)
    logits = np.asarray(forward(Row.of(rows)))
    for r, seq in enumerate(seqs):
      seq.append(int(logits[r, len(seq) - 1].argmax()))
  assert _greedy(model) == [seq[len(p) :] for seq, p in zip(seqs, TEXT_PROMPTS)]


def test_a_stop_token_ends_only_its_row(model):
  greedy = generate(model, TEXT_PROMPTS, max_new_tokens=6, pad_id=TOK.pad_id, stop_ids=[])
  stop = greedy[0][2]
  assert any(stop not in g for g in greedy[1:])  # some row has no reason to stop
  got = generate(model, TEXT_PROMPTS, max_new_tokens=6, pad_id=TOK.pad_id, stop_ids=[stop])
  for row, full in zip(got, greedy):
    assert row == (full[: full.index(stop) + 1] if stop in full else full)


def test_sample_token_top_k_and_top_p():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.asarray(np.tile(probs, (20000, 1)), jnp.float32))
  draw = lambda **kw: (
    np.bincount(
      np.asarray(sample_token(logits, jax.random.PRNGKey(0), temperature=1.0, **kw)), minlength=4
    )
    / 20000
  )
  # top-k 2 and top-p 0.7 both keep {0, 1}: 0.625 / 0.375. Full: the probs.
  # 20000 draws: standard error <= 0.0035, bounds at ~4.3 SE.
  for kept in (draw(top_k=2), draw(top_p=0.7)):
    np.testing.assert_allclose(kept, [0.625, 0.375, 0, 0], atol=0.015)
  np.testing.assert_allclose(draw(), probs, atol=0.015)
  greedy = np.asarray(sample_token(logits[:3], None))
  assert (greedy == 0).all()
  assert (
    np.asarray(sample_token(logits[:50], jax.random.PRNGKey(1), temperature=1.0, top_k=1)) == 0
  ).all()
  with pytest.raises(ValueError, match="top_p=0"):
    sample_token(logits, jax.random.PRNGKey(0), temperature=1.0, top_p=0.0)


def test_sharded_inference_matches_one_device(config, model):
  rows = image_rows(PROMPTS, TOK, 16, guidance=True)
  one_images, one_text = _guided_ddpm(model, rows), _greedy(model)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  config = config.copy_and_resolve_references()
  with jax.set_mesh(mesh), sharding.logical_rules(config.sharding_rules):
    graphdef, params = nnx.split(model)
    placed = jax.device_put(nnx.to_pure_dict(params), param_shardings(config, mesh))
    assert len(placed["embed_tokens"].sharding.device_set) == 8
    sharded = nnx.merge(graphdef, placed)
    np.testing.assert_allclose(_guided_ddpm(sharded, rows), one_images, **TOL)
    assert _greedy(sharded) == one_text
