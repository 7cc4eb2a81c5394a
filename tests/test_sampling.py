"""The samplers: prompt cache and KV cache against recomputation, guidance,
seeds, token sampling, sharded inference against one device, and the
config's diffusion process in every sampler.

The model is the digits architecture (2 layers) with every parameter drawn at
random, so no output is trivially zero (the fresh model's diffusion head is).
Cached and uncached runs do the same float32 math in another order and
grouping: their images agree to ~1e-6 after 5 steps; 1e-4 still catches a
wrong position, a stale cache or a mask leak (each moves them by > 1e-2).
"""

import time
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
from monoformer_jax.errors import ConfigError
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


# ------------------------------------------------- the Python API's boundary
#
# Every refusal below comes before the model is touched: the model is None, so
# any use of it (a compile included) would raise AttributeError instead.

LONG = "two " * 1400  # 5,600 bytes: 5,601 tokens with bos (the byte tokenizer)
P = 16  # the digits model's image tokens, (8 / 2)^2; its read images' too (the VAE encoder)


def _refusals(cases):
  """Each call's ConfigError message, and that it came at once."""
  for call, message in cases:
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
      call()
    assert time.perf_counter() - start < 1.0, message
    assert str(e.value) == message


def test_every_sampler_refuses_rows_past_the_trained_length():
  tiny, reader = digits_config(), config_file("digits")  # data.seq_len 64, 128
  past = "of the rows the model was trained on (data.seq_len)"
  image, edit = [np.zeros((8, 8), np.float32)], inference.edit_images
  # A read prompt: <s> <|im_start|> the image's P tokens <|im_end|>, then "\n" + the text.
  read = lambda text: 3 + P + len(("\n" + text).encode())
  n = read(LONG)
  _refusals(
    [
      (  # <s> prompt <|im_start|>, then the image's P tokens
        lambda: inference.generate_images(None, TOK, [LONG], config=tiny),
        f"prompt 0 takes 5,602 positions and its image takes 16: 5,618 in all, past the 64 "
        f"{past}; shorten it by 5,554 tokens",
      ),
      (
        lambda: inference.complete_text(None, TOK, ["two", LONG], config=tiny, max_new_tokens=4),
        f"prompt 1 takes 5,601 positions and max_new_tokens asks for 4: 5,605 in all, past the "
        f"64 {past}; shorten it by 5,541 tokens",
      ),
      (
        lambda: inference.complete_text(None, TOK, ["two"], config=tiny, max_new_tokens=100_000),
        f"prompt 0 takes 4 positions and max_new_tokens asks for 100,000: 100,004 in all, past "
        f"the 64 {past}; lower max_new_tokens to 60",
      ),
      (  # the default budget: none is left after this prompt
        lambda: inference.complete_text(None, TOK, ["x" * 63], config=tiny),
        f"prompt 0 takes 64 positions and its answer needs at least 1: 65 in all, past the 64 "
        f"{past}; shorten it by 1 token",
      ),
      (
        lambda: inference.describe_images(
          None, TOK, image, LONG, config=reader, max_new_tokens=128
        ),
        f"prompt 0 takes {n:,} positions and max_new_tokens asks for 128: {n + 128:,} in all, "
        f"past the 128 {past}; shorten it and lower max_new_tokens: the two may take 128 "
        "together",
      ),
      (  # an image takes <|im_start|>, P tokens, <|im_end|>: the same rule as the others
        lambda: inference.generate_interleaved(None, TOK, [LONG], config=tiny),
        f"prompt 0 takes 5,601 positions and an image takes 18: 5,619 in all, past the 64 "
        f"{past}; shorten it by 5,555 tokens",
      ),
      (  # the image read and the instruction, <|im_start|>, then the P tokens drawn
        lambda: edit(None, TOK, image, LONG, config=reader),
        f"prompt 0 takes {n + 1:,} positions and its image takes 16: {n + 17:,} in all, past "
        f"the 128 {past}; shorten it by {n + 17 - 128:,} tokens",
      ),
      (
        lambda: edit(None, TOK, image, "go", config=tiny),
        "this model has no vision encoder (model.vision_encoder is ''), so it cannot read an "
        "image; use a model trained with model.vision_encoder=vae or clip",
      ),
    ]
  )


def test_the_text_budget_defaults_to_the_rest_of_the_trained_row(monkeypatch):
  """max_new_tokens=None: data.seq_len minus the longest prompt (text); for
  interleaved answers each batch's columns, sum(seq_len - prompt) over its
  rows, which also bounds a budget given (every column advances some row's
  positions, so no row could write more: the same answers, a shorter cache)."""
  config = digits_config()  # data.seq_len 64
  asked = []
  monkeypatch.setattr(
    inference, "generate", lambda model, prompts, **kw: asked.append(kw["max_new_tokens"]) or []
  )
  monkeypatch.setattr(
    inference, "interleave", lambda model, rows, **kw: asked.append(kw["max_new_tokens"]) or []
  )
  inference.complete_text(None, TOK, ["two", "three plus"], config=config)
  assert asked == [64 - 11]  # <s> "three plus": 11 positions
  asked.clear()
  inference.generate_interleaved(None, TOK, ["here is a"] * 3, config=config, batch_size=2)
  assert asked == [2 * (64 - 10), 64 - 10]  # <s> "here is a": 10
  asked.clear()
  for budget in (100_000, 60):
    inference.generate_interleaved(
      None, TOK, ["here is a"] * 3, config=config, batch_size=2, max_new_tokens=budget
    )
  assert asked == [108, 54, 60, 54]


def test_images_are_drawn_in_batches_with_keys_of_their_own(monkeypatch):
  config = digits_config()
  drawn = []

  def sample_images(model, rows, diffusion, key, **kw):
    b = len(rows.row.tokens) // 2  # guided: the prompts, then as many null prompts
    drawn.append((b, np.asarray(key)))
    return jnp.full((b, 8, 8, 1), float(len(drawn)))

  monkeypatch.setattr(inference, "sample_images", sample_images)
  model = types.SimpleNamespace(tokens_per_image=16, cond_token=False)  # never run
  x0 = inference.generate_images(model, TOK, ["a", "b", "c"], config=config, seed=7, batch_size=2)
  assert [b for b, _ in drawn] == [2, 1]
  np.testing.assert_array_equal(np.asarray(x0)[:, 0, 0, 0], [1, 1, 2])  # in order
  key = jax.random.PRNGKey(7)
  np.testing.assert_array_equal(drawn[0][1], key)  # one batch: the seed's key, as before
  np.testing.assert_array_equal(drawn[1][1], jax.random.fold_in(key, 1))


def test_python_api_arguments_are_checked_by_name():
  config = digits_config()
  G = lambda **kw: inference.generate_images(None, TOK, ["two"], config=config, **kw)
  seed = (
    "must be an integer; e.g. seed=0: the same seed gives the same samples; for fresh ones "
    "pass a new seed on every call (e.g. random.randrange(2**63))"
  )
  _refusals(
    [
      (lambda: G(seed=None), f"seed=None: {seed}"),
      (lambda: G(seed="7"), f"seed='7': {seed}"),
      (
        lambda: inference.complete_text(None, TOK, ["two"], config=config, seed=2**70),
        f"seed={2**70}: must be in [{-(2**63)}, {2**63 - 1}]; e.g. seed=0: the same seed "
        "gives the same samples; for fresh ones pass a new seed on every call (e.g. "
        "random.randrange(2**63))",
      ),
      (lambda: G(use_cache="no"), "use_cache='no': must be True or False"),
      (
        lambda: G(batch_size=0),
        "batch_size=0: must be >= 1; e.g. batch_size=64, or None for one batch",
      ),
      (  # DDIM's noise with DDPM did nothing, silently
        lambda: G(eta=0.5),
        "eta=0.5: is DDIM's noise, which the 'ddpm' sampler does not use; pass "
        "sampler='ddim' or leave eta out",
      ),
      (  # the reference's 3 guided channels of a 1-channel model
        lambda: G(guided_channels=3),
        "guided_channels=3: guides 3 epsilon channels, but the model has model.in_channels=1; "
        "leave it out to guide every channel",
      ),
      (
        lambda: inference.complete_text(None, TOK, ["two", "\udcff"], config=config),
        "prompts[1]='\\udcff' is not UTF-8 text (character 0, '\\udcff', is a byte that no "
        "UTF-8 decoding gave); save the prompt as UTF-8",
      ),
      (
        lambda: inference.complete_text(None, TOK, ["two"], config=config, max_new_tokens=0),
        "max_new_tokens=0: must be >= 1; e.g. max_new_tokens=16",
      ),
      (  # one image [h, w, C]: its rows were taken for images
        lambda: inference.describe_images(None, TOK, np.zeros((8, 8, 1)), config=config),
        "images must be a non-empty list (paths, PIL images or arrays) or a 4-D array "
        "[B, h, w, C], got ndarray of shape (8, 8, 1); for one image pass [image]",
      ),
      (
        lambda: inference.class_name_prompt(7),
        "class name 7: give a class's name, e.g. 'seven' (or, with the config of a dataset "
        "with classes, its index)",
      ),
      (
        lambda: inference.class_name_prompt(True, config),
        "class name True: give a class's name, e.g. 'seven' (or, with the config of a dataset "
        "with classes, its index)",
      ),
      (
        lambda: inference.class_name_prompt(10, config),
        "class name '10' is not a digit: use one of ('zero', 'one', 'two', 'three', 'four', "
        "'five', 'six', 'seven', 'eight', 'nine') or an index 0..9",
      ),
    ]
  )
  assert inference.class_name_prompt(7, config) == "Please generate an image of seven."
  assert inference.class_name_prompt(np.int64(3), config) == "Please generate an image of three."


def test_a_vae_must_fit_the_model():
  """A VAE for a pixel model, or one of other latent channels, is refused
  before it decodes anything (the pixel case was a ValueError after sampling)."""
  pixels, latents = digits_config(), digits_config()
  latents.data.name, latents.model.in_channels = "latents", 8
  vae = types.SimpleNamespace(config=types.SimpleNamespace(latent_channels=4))
  x0 = np.zeros((1, 8, 8, 1), np.float32)
  _refusals(
    [
      (
        lambda: inference.to_pixels(x0, pixels, vae),
        "vae given, but this model works in pixels (data.name='digits'): there are no "
        "latents for an SD-VAE to decode or encode; leave vae out",
      ),
      (
        lambda: inference.load_vae_of(pixels, "/some/vae", flag="--vae"),
        "--vae='/some/vae' given, but this model works in pixels (data.name='digits'): there "
        "are no latents for an SD-VAE to decode or encode; leave --vae out",
      ),
      (
        lambda: inference.to_pixels(x0, latents, vae),
        "vae makes 4-channel latents, but this model draws 8-channel ones "
        "(model.in_channels); pass the VAE the model was trained with",
      ),
    ]
  )


def test_a_one_step_schedule_samples():
  """--num_steps=1 was an IndexError (the clipped log variance read step 1).
  One step from t = 0 with eps = 0 returns x_t / sqrt(alphas_cumprod[0])."""
  one = GaussianDiffusion.create(1000, respacing="1")
  assert np.isfinite(one.posterior_log_variance_clipped).all()
  x_t = jnp.full((2, 4, 4, 1), 0.5)
  out = jnp.concatenate([jnp.zeros_like(x_t), jnp.ones_like(x_t)], axis=-1)
  got = one.p_sample(out, x_t, jnp.zeros(2, jnp.int32), jnp.ones_like(x_t))["sample"]
  alpha_bar = 1.0 - BETAS["linear"](1000)[0]
  np.testing.assert_allclose(np.asarray(got), 0.5 / np.sqrt(alpha_bar), rtol=1e-6)


def test_image_grid_is_each_pixel_enlarged_on_white():
  rng = np.random.default_rng(0)
  images = rng.uniform(-0.1, 1.1, (5, 3, 3, 1)).astype(np.float32)
  grid = np.asarray(inference.image_grid(images, rows=2, scale=2))
  assert grid.shape == (2 * 7 + 1, 3 * 7 + 1)
  assert grid.nbytes == inference.grid_bytes(5, 2, 3, 1, 2)
  for i in range(5):
    r, c = divmod(i, 3)
    want = np.kron((np.clip(images[i, ..., 0], 0, 1) * 255).round(), np.ones((2, 2)))
    np.testing.assert_array_equal(grid[1 + 7 * r : 7 * r + 7, 1 + 7 * c : 7 * c + 7], want)
  assert (grid[1 + 7 : 8 + 6, 1 + 14 :] == 255).all()  # the sixth cell is background
  assert (grid[0] == 255).all() and (grid[:, 0] == 255).all()


def test_the_end_of_run_text_is_checked_when_the_run_starts(tmp_path):
  """sample.max_new_tokens past the trained rows failed only at the end of
  training; now the run refuses before its first step, writing nothing."""
  from monoformer_jax.train.loop import train_and_evaluate

  config = digits_config(num_steps=2)
  config.sample.max_new_tokens = 60  # "the number after five": 22 positions with <s>
  start = time.perf_counter()
  with pytest.raises(ConfigError) as e:
    train_and_evaluate(config, str(tmp_path / "run"))
  assert time.perf_counter() - start < 2.0
  assert str(e.value) == (
    "sample.text_prompts[1] takes 22 positions and --config.sample.max_new_tokens asks for 60: "
    "82 in all, past the 64 of the rows the model was trained on (data.seq_len); shorten it "
    "by 18 tokens or lower --config.sample.max_new_tokens to 42"
  )
  assert not any(tmp_path.rglob("*.*"))  # no checkpoint, no metrics


def test_free_bytes_is_the_disk_a_folder_would_be_made_on(tmp_path):
  import shutil

  from monoformer_jax.paths import free_bytes

  got = free_bytes(str(tmp_path / "not" / "made"))  # its nearest folder's disk
  assert abs(got - shutil.disk_usage(tmp_path).free) < 2**26  # others may write meanwhile
  assert not (tmp_path / "not").exists()
  assert free_bytes("gs://bucket/samples") is None
