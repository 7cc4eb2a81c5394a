"""Images as input: the row contract for READ images, the model, the loss, the samplers.

A read image is clean and goes through the vision encoder and im_embedder; it
gets no diffusion loss, is causal like text by default (the reference) or one
bidirectional block (`model.read_bidirectional`), and in the
add_before_image_tokens mode is preceded by a t = 0 timestep token.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import digits_config, random_model

from monoformer_jax.data import prompts
from monoformer_jax.data.packing import pack_examples
from monoformer_jax.diffusion.gaussian import GaussianDiffusion
from monoformer_jax.errors import ConfigError, FileFormatError
from monoformer_jax.layout import Example, Row, RowSpec, row_spec
from monoformer_jax.model.monoformer import MonoFormer
from monoformer_jax.text.generate import generate
from monoformer_jax.text.tokenizer import tokenizer_of
from monoformer_jax.train.loss import loss_terms

S, E, IM, IMG, PAD, BOS = 5, 6, 7, 9, 0, 1  # toy ids: <|im_start|>, <|im_end|>, ..., <image>
P = 3


def img(v, shape=(2, 2, 1)):
  return np.full(shape, float(v), np.float32)


def spec(**kw):
  base = dict(
    seq_len=40,
    max_images=2,
    image_shape=(2, 2, 1),
    tokens_per_image=P,
    image_id=IMG,
    pad_id=PAD,
    max_read_images=2,
    read_shape=(2, 2, 1),
    read_tokens=4,
  )
  return RowSpec(**{**base, **kw})


# ------------------------------------------------------------------ packing


def _two_read_one_generated():
  # <s> <im> R <im/> 11 <im> R <im/> 12 <im> G <im/> </s>
  ids = [BOS, S, IMG, E, 11, S, IMG, E, 12, S, IMG, E, 2]
  return Example(ids, [img(1), img(2), img(3)], read=[True, True, False])


@pytest.mark.parametrize("cond_token", [False, True])
def test_two_read_and_one_generated_image_pack(cond_token):
  c = int(cond_token)
  b = pack_examples([_two_read_one_generated()], spec(cond_token=cond_token))
  q = 4 + c  # a read image's columns
  r0, r1 = 2 + c, 2 + q + 3 + c  # first columns of the read images' tokens
  np.testing.assert_array_equal(b["read_columns"][0, 0], np.arange(r0, r0 + 4))
  np.testing.assert_array_equal(b["read_columns"][0, 1], np.arange(r1, r1 + 4))
  assert b["read_valid"][0].tolist() == [True, True]
  g0 = r1 + 4 + 3 + c
  np.testing.assert_array_equal(b["image_columns"][0, 0], np.arange(g0, g0 + P))
  assert b["image_valid"][0].tolist() == [True, False]
  # Read tokens are causal text-like tokens; only the generated image is a block.
  assert set(np.unique(b["image_ids"][0])) == {0, 1}
  assert (b["image_ids"][0, g0 : g0 + P] == 1).all()
  if cond_token:
    assert b["cond_columns"][0, 0] == g0 - 1
    assert b["read_cond_columns"][0].tolist() == [r0 - 1, r1 - 1]
    assert b["image_ids"][0, g0 - 1] == 0
  else:
    assert b["cond_columns"][0, 0] == 40 and (b["read_cond_columns"][0] == 40).all()
  np.testing.assert_array_equal(b["read_images"][0, :, 0, 0, 0], [1, 2])
  np.testing.assert_array_equal(b["latents"][0, :, 0, 0, 0], [3, 0])
  # It generates an image: no cross-entropy (the reference's rule).
  assert b["text_weights"].sum() == 0


def test_read_only_examples_train_their_answer_and_bidirectional_reads_are_blocks():
  ex = Example([BOS, S, IMG, E, 11, 12, 2], [img(1)], text_mask=[0, 0, 0, 0, 0, 1, 1], read=[True])
  b = pack_examples([ex, ex], spec(read_bidirectional=True, max_read_images=2))
  # Two examples in one row: their reads are blocks -1 and -2.
  assert sorted(set(np.unique(b["image_ids"][0])) - {0}) == [-2, -1]
  cols = b["read_columns"][0]
  assert (b["image_ids"][0, cols[0]] == -1).all() and (b["image_ids"][0, cols[1]] == -2).all()
  # CE on the answer tokens 12 and </s> only (the targets of columns before them).
  w = b["text_weights"][0]
  targets = b["targets"][0][w > 0]
  assert targets.tolist() == [12, 2, 12, 2]


def test_bad_read_images_raise_naming_the_fix():
  ex = Example([BOS, S, IMG, E], [img(1)], read=[True])
  with pytest.raises(ConfigError, match="no vision encoder.*model.vision_encoder=vae"):
    pack_examples([ex], spec(read_tokens=0, max_read_images=0, read_shape=()))
  with pytest.raises(ConfigError, match="max_read_images_per_row=1.*at least 2"):
    pack_examples(
      [Example([S, IMG, IMG, E], [img(1), img(2)], read=[True, True])], spec(max_read_images=1)
    )
  with pytest.raises(ConfigError, match=r"read images of shape \(2, 2, 1\)"):
    pack_examples([Example([S, IMG, E], [img(1, (3, 3, 1))], read=[True])], spec())
  with pytest.raises(ValueError, match="2 flags for 1 images"):
    pack_examples([Example([S, IMG, E], [img(1)], read=[True, False])], spec())


# ------------------------------------------------------------------ the model


def _config(conditioning="adaln_before_decoder", bidirectional=False):
  c = digits_config()
  c.model.update(vision_encoder="vae", conditioning=conditioning, read_bidirectional=bidirectional)
  c.data.update(max_read_images_per_row=2, max_images_per_row=1, seq_len=80)
  return c


def _batch(config, tok):
  digit = lambda v: np.full((8, 8, 1), v, np.float32)
  t = tok
  ids = (
    [t.bos_id]
    + t.encode("a")
    + [t.im_start_id, t.image_id, t.im_end_id]
    + t.encode("b")
    + [t.im_start_id, t.image_id, t.im_end_id]
    + t.encode("draw")
    + [t.im_start_id, t.image_id, t.im_end_id, t.eos_id]
  )
  example = Example(ids, [digit(0.5), digit(-0.5), digit(0.1)], read=[True, True, False])
  reader = prompts.reading_example("which?", "it is two.", digit(0.3), tok)
  return pack_examples([example, reader], row_spec(config, tok), one_per_row=True)


@nnx.jit
def _logits(model, batch, t, read_images):
  return model(Row.of(batch), batch["latents"], t, read_images)[0]


@pytest.mark.parametrize("conditioning", ["adaln_before_decoder", "add_before_image_tokens"])
def test_read_images_get_no_diffusion_loss_and_never_reach_earlier_tokens(conditioning):
  config = _config(conditioning)
  tok = tokenizer_of(config)
  model = random_model(config)
  b = jax.tree.map(jnp.asarray, _batch(config, tok))
  t = jnp.full(b["latents"].shape[:2], 500, jnp.int32)
  noise = jax.random.normal(jax.random.PRNGKey(0), b["latents"].shape)
  d = GaussianDiffusion.create()
  terms = nnx.jit(lambda m: loss_terms(m, b, t, noise, d))(model)
  assert int(terms["n_images"]) == 1  # the one generated image
  assert np.asarray(b["read_valid"]).sum() == 3
  # Changing a read image changes what follows it, never what precedes it.
  logits = lambda read: _logits(model, b, t, read)
  base = np.asarray(logits(b["read_images"]))
  changed = b["read_images"].at[0, 1].add(1.0)  # row 0's second read image
  new = np.asarray(logits(changed))
  first = int(b["read_columns"][0, 1, 0]) - (1 if conditioning != "adaln_before_decoder" else 0)
  np.testing.assert_array_equal(new[0, :first], base[0, :first])
  assert np.abs(new[0, first:] - base[0, first:]).max() > 1e-4
  np.testing.assert_array_equal(new[1], base[1])  # the other row
  with pytest.raises(ValueError, match="read-image slots need the images they read"):
    model(Row.of(b), b["latents"], t)
  # The gradient reaches im_embedder from the answer's cross-entropy.
  grads = nnx.jit(nnx.grad(lambda m: loss_terms(m, b, t, noise, d)["lm"]))(model)
  assert float(jnp.abs(grads.im_embedder.fc1.kernel[...]).max()) > 0


@pytest.mark.parametrize("bidirectional", [False, True])
def test_read_image_mask_is_causal_or_one_block(bidirectional):
  config = _config(bidirectional=bidirectional)
  tok = tokenizer_of(config)
  model = random_model(config)
  b = jax.tree.map(jnp.asarray, _batch(config, tok))
  t = jnp.zeros(b["latents"].shape[:2], jnp.int32)
  first = int(b["read_columns"][1, 0, 0])
  # The last patch of the reading row's image changed: does its first token see it?
  changed = b["read_images"].at[1, 0, 6:, 6:].add(2.0)
  h = lambda read: np.asarray(_logits(model, b, t, read))
  diff = np.abs(h(changed)[1, first] - h(b["read_images"])[1, first]).max()
  assert (diff > 1e-4) == bidirectional


# ------------------------------------------------------------------ samplers


@pytest.mark.parametrize("conditioning", ["adaln_before_decoder", "add_before_image_tokens"])
def test_text_about_read_images_cached_equals_recomputed(conditioning):
  config = _config(conditioning, bidirectional=conditioning != "adaln_before_decoder")
  tok = tokenizer_of(config)
  model = random_model(config, seed=2)
  digit = lambda v: np.full((8, 8, 1), v, np.float32)
  spec_ = row_spec(config, tok)
  two = Example(
    prompts.read_prefix_ids(tok)
    + [tok.im_start_id, tok.image_id, tok.im_end_id]
    + tok.encode("\nsame?"),
    [digit(0.2), digit(-0.7)],
    read=[True, True],
  )
  examples = [prompts.read_prompt_example("which digit is this?", digit(0.9), tok), two]
  kw = dict(
    max_new_tokens=6,
    pad_id=tok.pad_id,
    stop_ids=[tok.eos_id],
    spec=spec_,
    temperature=1.0,
    key=jax.random.PRNGKey(3),
  )
  cached = generate(model, examples, **kw)
  assert cached == generate(model, examples, use_cache=False, **kw)
  assert all(len(c) == 6 for c in cached)
  # The images matter: other images, other text.
  other = [prompts.read_prompt_example("which digit is this?", digit(-0.9), tok), two]
  assert generate(model, other, **kw)[0] != cached[0]


@pytest.mark.parametrize("conditioning", ["adaln_before_decoder", "add_before_image_tokens"])
def test_an_image_after_two_read_images_samples_the_same_cached_or_not(conditioning):
  from monoformer_jax.diffusion.sample_images import sample_images
  from monoformer_jax.layout import prompt_rows

  config = _config(conditioning)
  tok = tokenizer_of(config)
  model = random_model(config, seed=4)
  digit = lambda v: np.full((8, 8, 1), v, np.float32)
  read_two = (
    prompts.read_prefix_ids(tok)
    + [tok.im_start_id, tok.image_id, tok.im_end_id]
    + tok.encode("\nthe next one:")
    + [tok.im_start_id]
  )
  examples = [
    Example(read_two, [digit(0.4), digit(-0.4)], read=[True, True]),
    Example(read_two, [digit(-0.8), digit(0.8)], read=[True, True]),
  ]
  rows = prompt_rows(
    examples,
    pad_id=tok.pad_id,
    new_tokens=model.tokens_per_image,
    new_token_id=tok.image_id,
    image=True,
    cond_token=model.cond_token,
    spec=row_spec(config, tok),
  )
  assert rows.read_images.shape == (2, 2, 8, 8, 1)
  d = GaussianDiffusion.create(respacing="3")
  key = jax.random.PRNGKey(5)
  cached = sample_images(model, rows, d, key)
  recomputed = sample_images(model, rows, d, key, use_cache=False)
  np.testing.assert_allclose(cached, recomputed, atol=1e-4, rtol=1e-4)
  # The read images condition the image: other images, another sample.
  assert np.abs(np.asarray(cached[0]) - np.asarray(cached[1])).max() > 1e-3


def test_a_row_with_two_read_and_one_generated_image_trains():
  import optax

  from monoformer_jax.model.build import abstract_model, init_params
  from monoformer_jax.train.loss import total_loss
  from monoformer_jax.train.state import make_optimizer

  config = _config("add_before_image_tokens")
  tok = tokenizer_of(config)
  batch = _batch(config, tok)
  params = jax.jit(lambda: init_params(config.model, 0))()
  model_def = abstract_model(config.model)[0]
  tx, _ = make_optimizer(config.optim, config.model)
  opt = tx.init(params)
  d = GaussianDiffusion.create()
  b = jax.tree.map(jnp.asarray, batch)

  @jax.jit
  def step(params, opt, key):
    f = lambda p: total_loss(nnx.merge(model_def, p), b, key, d, config.loss)
    (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, loss, metrics

  losses = []
  for i in range(30):
    params, opt, _loss, metrics = step(params, opt, jax.random.PRNGKey(i % 2))
    losses.append(float(metrics["lm"]))
  assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_the_digits_reading_is_learned_well_above_chance(tmp_path, one_device):
  """A short run, mostly reading examples (the tiny model), then the held-out
  digits read back: chance is 10%, and 400 steps reach about 50%. On one
  device: no collective in its 400 steps (conftest's one_device)."""
  from monoformer_jax.checkpoints import load_model
  from monoformer_jax.digits.evaluators import reading_accuracy
  from monoformer_jax.train.loop import train_and_evaluate

  config = digits_config(num_steps=400, log_every=400, checkpoint_every=400)
  config.model.update(vision_encoder="vae")
  config.data.update(max_read_images_per_row=3, read_fraction=0.8, text_fraction=0.0)
  config.loss.w_lm = 1.0
  train_and_evaluate(config, str(tmp_path), sample_at_end=False)
  model, config = load_model(str(tmp_path))
  result = reading_accuracy(model, tokenizer_of(config), config)
  assert result["reading_count"] == 180
  assert result["reading_accuracy"] > 0.35, result


# ------------------------------------------------------------------ boundaries


def test_describe_images_bad_inputs_name_the_fix(tmp_path):
  from monoformer_jax import inference

  config = _config()
  tok = tokenizer_of(config)
  model = random_model(config)
  bad = tmp_path / "not_an_image.png"
  bad.write_text("hello")
  with pytest.raises(FileFormatError, match="not_an_image.png.*not a readable image"):
    inference.describe_images(model, tok, [str(bad)], config=config)
  plain = digits_config()  # vision_encoder '' (the tiny variant)
  with pytest.raises(ConfigError, match="no vision encoder"):
    inference.describe_images(
      MonoFormer(plain.model, rngs=nnx.Rngs(0)), tok, [np.zeros((8, 8), np.uint8)], config=plain
    )
  answer = inference.describe_images(
    model, tok, [np.zeros((8, 8), np.uint8)], config=config, max_new_tokens=3
  )
  assert len(answer) == 1 and isinstance(answer[0], str)


# ------------------------------------------------------------------ CLIP


def test_a_clip_model_reads_through_the_frozen_tower():
  """The tiny CLIP fixture's tower inside a MonoFormer: its features (the
  fixture's, so the tower is the real one) feed im_embedder, the optimizer
  keeps no moments for the tower and never changes it."""
  import optax
  from conftest import REPO

  from monoformer_jax.model.build import abstract_model, init_params
  from monoformer_jax.model.clip import load_clip_params, read_clip_config, tokens_of
  from monoformer_jax.train.state import make_optimizer

  folder = REPO / "tests" / "fixtures" / "tiny_clip"
  config = _config()
  config.model.update(vision_encoder="clip", vision=read_clip_config(str(folder)))
  config.data.seq_len = 64
  tok = tokenizer_of(config)
  params = jax.jit(lambda: init_params(config.model, 0))()
  tower, _ = load_clip_params(str(folder))
  params["vision_tower"] = jax.tree.map(jnp.asarray, tower)
  model_def = abstract_model(config.model)[0]
  model = nnx.merge(model_def, params)
  io = np.load(folder / "io.npz")
  features = nnx.jit(lambda tower, x: tower(x))(model.vision_tower, jnp.asarray(io["pixels"]))
  np.testing.assert_allclose(features, io["features"], atol=1e-4, rtol=1e-4)

  example = prompts.reading_example("what?", "it is two.", io["pixels"][0], tok)
  b = jax.tree.map(jnp.asarray, pack_examples([example], row_spec(config, tok)))
  assert b["read_columns"].shape[-1] == tokens_of(config.model.vision) == 16
  tx, _ = make_optimizer(config.optim, config.model)
  opt = tx.init(params)
  assert not any(
    "vision_tower" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(opt)
  )
  d = GaussianDiffusion.create()
  t = jnp.zeros(b["latents"].shape[:2], jnp.int32)

  def lm(p):
    return loss_terms(nnx.merge(model_def, p), b, t, jnp.zeros_like(b["latents"]), d)["lm"]

  grads = jax.jit(jax.grad(lm))(params)
  assert float(jnp.abs(grads["im_embedder"]["fc1"]["kernel"]).max()) > 0
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["vision_tower"]))
  new = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))(grads, opt, params)
  jax.tree.map(np.testing.assert_array_equal, new["vision_tower"], params["vision_tower"])
  assert not np.array_equal(
    new["im_embedder"]["fc1"]["kernel"], params["im_embedder"]["fc1"]["kernel"]
  )


# ------------------------------------------------------------------ the CLI


@pytest.mark.slow
def test_sample_cli_reads_an_image_and_refuses_what_it_cannot(tmp_path):
  import subprocess
  import sys

  from conftest import REPO
  from PIL import Image

  from monoformer_jax.checkpoints import save_model
  from monoformer_jax.model.build import init_params

  config = _config()
  save_model(str(tmp_path / "ckpt"), config, jax.jit(lambda: init_params(config.model, 1))())
  digit = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
  Image.fromarray(digit).resize((32, 32)).save(tmp_path / "seven.png")
  (tmp_path / "notes.png").write_text("not an image")
  run = lambda *args: subprocess.run(
    [sys.executable, "-m", "monoformer_jax.sample", f"--checkpoint={tmp_path / 'ckpt'}", *args],
    capture_output=True,
    text=True,
    cwd=REPO,
    env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"},
  )
  ok = run(
    "read",
    f"--image={tmp_path / 'seven.png'}",
    "--text_prompt=which digit is this?",
    "--weights=raw",
    "--temperature=0",
    "--max_new_tokens=4",
    f"--output_dir={tmp_path / 'out'}",
  )
  assert ok.returncode == 0, ok.stderr[-2000:]
  text = (tmp_path / "out" / "text.txt").read_text()
  assert "seven.png 'which digit is this?' -> " in text
  bad = run("read", f"--image={tmp_path / 'notes.png'}", "--text_prompt=what?")
  assert bad.returncode != 0 and "notes.png" in bad.stderr and "not a readable image" in bad.stderr
  plain = tmp_path / "plain"
  save_model(str(plain), digits_config(), jax.jit(lambda: init_params(digits_config().model, 1))())
  refused = subprocess.run(
    [
      sys.executable,
      "-m",
      "monoformer_jax.sample",
      "read",
      f"--checkpoint={plain}",
      f"--image={tmp_path / 'seven.png'}",
      "--text_prompt=what?",
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"},
  )
  assert refused.returncode != 0 and "without a vision encoder" in refused.stderr
