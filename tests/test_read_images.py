"""Images as input: the row contract for READ images, the model, the loss, the samplers.

A read image is clean and goes through the vision encoder and im_embedder; it
gets no diffusion loss, is causal like text by default (the reference) or one
bidirectional block (`model.read_bidirectional`), and in the
add_before_image_tokens mode is preceded by a t = 0 timestep token.
"""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import digits_config, random_model
from PIL import Image

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
  digits read back: chance is 10%; 200 steps reach 29%, 300 steps 46% and 400
  steps 56%. On one device: no collective in its steps (conftest's one_device)."""
  from monoformer_jax.checkpoints import load_model
  from monoformer_jax.digits.evaluators import reading_accuracy
  from monoformer_jax.train.loop import train_and_evaluate

  config = digits_config(num_steps=300, log_every=300, checkpoint_every=300)
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
  with pytest.raises(FileFormatError, match="not_an_image.png: not an image file"):
    inference.describe_images(model, tok, [str(bad)], config=config)
  plain = digits_config()  # vision_encoder '' (the tiny variant)
  with pytest.raises(ConfigError, match="no vision encoder"):
    inference.describe_images(
      MonoFormer(plain.model, rngs=nnx.Rngs(0)), tok, [np.zeros((8, 8), np.uint8)], config=plain
    )
  with pytest.raises(ValueError, match=r"NaN or inf \(64 of 64 values\)"):  # #10: not black
    inference.describe_images(model, tok, [np.full((8, 8), np.nan, np.float32)], config=config)
  answer = inference.describe_images(
    model, tok, [np.zeros((8, 8), np.uint8)], config=config, max_new_tokens=3
  )
  assert len(answer) == 1 and isinstance(answer[0], str)


# ------------------------------------------------------------------ the one reader


def _gradient16():
  """A full-range 16-bit gradient, uint16 [4, 256], and its 8-bit reference x/257."""
  g = np.round(np.linspace(0, 65535, 256))[None].repeat(4, 0).astype(np.uint16)
  return g, np.rint(g / 257.0).astype(np.uint8)


def _digit_rgba():
  """A black digit (soft-edged: alpha 0..255) on a transparent background, and
  its composite on white, written as numpy: 255 - (255 - colour) * alpha / 255."""
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[..., :3] = 255  # what lies under the transparent pixels: white here, black below
  rgba[3:13, 6:10] = (0, 0, 0, 255)
  rgba[3:13, 5, 3] = rgba[3:13, 10, 3] = 128  # the soft edge
  rgba[3:13, 5, :3] = rgba[3:13, 10, :3] = 0
  rgba[0, 0] = (0, 0, 0, 0)  # a black pixel, fully transparent
  a = rgba[..., 3:].astype(np.float64) / 255
  return rgba, np.rint(255 - (255 - rgba[..., :3].astype(np.float64)) * a).astype(np.uint8)


def _pixel_model_reference(gray_u8, config):
  """read_inputs for a 1-channel pixel model, written out: bilinear to image_size, [-1, 1]."""
  size = config.model.image_size
  x = np.asarray(Image.fromarray(gray_u8).resize((size, size), Image.BILINEAR), np.float32)
  return (x / 255.0 * 2 - 1)[None, ..., None]


def _imports_of(module_file: str) -> dict[str, str]:
  """{name: module} of the `from module import name` lines of a package file."""
  package = pathlib.Path(__file__).resolve().parents[1] / "monoformer_jax"
  tree = ast.parse((package / module_file).read_text())
  return {
    alias.name: node.module
    for node in ast.walk(tree)
    if isinstance(node, ast.ImportFrom)
    for alias in node.names
  }


def test_a_16_bit_png_reads_the_same_through_every_entry(tmp_path):
  """#6: sampling's --image clipped a 16-bit PNG (a full-range gradient came
  out 99.6% white) while data.prepare scaled it. Every entry now reads it
  through vision/images.py: the numpy reference x/257, within one level."""
  from monoformer_jax.data import encode
  from monoformer_jax.data.sources.llava import decode_image
  from monoformer_jax.vision.clip_pixels import preprocess
  from monoformer_jax.vision.images import load_image
  from monoformer_jax.vision.inputs import read_inputs

  g16, want = _gradient16()
  Image.fromarray(g16).save(tmp_path / "g16.png")
  path = str(tmp_path / "g16.png")
  assert Image.open(path).mode == "I;16"
  # sample --image reads with it too (imported by name: importing the sample entry
  # point here would define its flags beside another entry point's in this worker).
  assert encode.load_image is load_image and _imports_of("sample.py")["load_image"] == (
    "monoformer_jax.vision.images"
  )
  for got in (
    load_image(path),  # sample.py's --image, describe_images, edit_images, interleaved
    load_image(path, orient=False),  # data.prepare (encode_items) and LLaVA's records
    decode_image((tmp_path / "g16.png").read_bytes(), "k"),
    load_image(g16),  # the array itself
  ):
    assert got.mode == "L"
    assert np.abs(np.asarray(got, np.int32) - want).max() <= 1
  assert (np.asarray(load_image(path)) == 255).mean() < 0.01  # was 99.6% white
  config = _config()
  np.testing.assert_allclose(
    read_inputs([path], config, pixels=True),
    _pixel_model_reference(want, config),
    atol=2 / 255 + 1e-6,
  )
  vcfg = type("V", (), {"image_size": 8})
  np.testing.assert_allclose(
    preprocess([path], vcfg), preprocess([np.stack([want] * 3, -1)], vcfg), atol=1e-6
  )


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P", "L-key", "array"])
def test_transparent_images_are_composited_on_white(tmp_path, kind):
  """#7: convert("RGB") dropped the alpha, so a black digit on a transparent
  background read all black; now every transparent kind is composited on white."""
  from monoformer_jax.vision.images import load_image
  from monoformer_jax.vision.inputs import read_inputs

  rgba, want = _digit_rgba()
  path = tmp_path / "digit.png"
  if kind == "RGBA":
    Image.fromarray(rgba).save(path)
  elif kind == "LA":
    Image.fromarray(rgba[..., [0, 3]], "LA").save(path)
  elif kind == "P":  # a palette whose entry 2 is transparent (PNG's tRNS)
    index = np.where(rgba[..., 3] == 0, 2, np.where(rgba[..., 3] == 255, 0, 1)).astype(np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette([0, 0, 0, 0, 0, 0, 0, 0, 0])
    image.save(path, transparency=bytes([255, 128, 0]))
  elif kind == "L-key":  # a grayscale PNG whose level 7 is transparent; no soft edge
    gray = np.where(rgba[..., 3] == 0, 7, 0).astype(np.uint8)
    Image.fromarray(gray).save(path, transparency=7)
    want = np.where(rgba[..., 3:] == 0, 255, 0).repeat(3, -1).astype(np.uint8)
  source = rgba if kind == "array" else str(path)
  got = np.asarray(load_image(source).convert("RGB"))
  np.testing.assert_array_equal(got, want)
  assert got[5, 7].tolist() == [0, 0, 0] and got[0, 0].tolist() == [255, 255, 255]
  config = _config()  # a 1-channel pixel model: the digit dark on white, as trained
  gray_want = np.asarray(Image.fromarray(want).convert("L"))
  np.testing.assert_allclose(
    read_inputs([source], config, pixels=True), _pixel_model_reference(gray_want, config)
  )


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_turns_what_users_give_not_what_prepare_reads(tmp_path, orientation):
  """A photo stored sideways with an EXIF tag comes out upright for users
  (sampling, reading, editing); dataset preparation reads it as stored, as the
  reference does; a read image holds no tag, so reading it again turns nothing."""
  from monoformer_jax.vision.images import load_image

  upright = np.zeros((32, 16, 3), np.uint8)
  upright[:8] = 255  # a white band at the top of a portrait image
  upright[8:, :8] = (200, 40, 40)
  undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90}
  undo[8] = Image.Transpose.ROTATE_270
  stored = Image.fromarray(upright).transpose(undo[orientation])  # what the camera wrote
  exif = Image.Exif()
  exif[0x0112] = orientation
  stored.save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=100)
  got = load_image(tmp_path / "photo.jpg")
  assert got.size == (16, 32)
  assert np.abs(np.asarray(got, np.int32) - upright).mean() < 3
  as_stored = load_image(tmp_path / "photo.jpg", orient=False)
  assert as_stored.size == stored.size
  assert np.abs(np.asarray(as_stored, np.int32) - np.asarray(stored)).mean() < 3
  np.testing.assert_array_equal(load_image(as_stored), np.asarray(as_stored))


@pytest.mark.parametrize("mode", ["CMYK", "P", "1", "YCbCr", "LAB", "HSV"])
def test_other_modes_convert_as_pil_does(tmp_path, mode):
  """Files (CMYK JPEG, palette and 1-bit PNG) and PIL images in other modes."""
  from monoformer_jax.vision.images import load_image

  rng = np.random.default_rng(0)
  source = Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)).convert(mode)
  if mode in ("CMYK", "P", "1"):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    source.save(path, quality=100)
    source = Image.open(path)
    assert source.mode == mode
  want = np.asarray(source.convert("L" if mode == "1" else "RGB"))
  np.testing.assert_array_equal(np.asarray(load_image(source)), want)


# pytest resets warning filters around each test, dropping the reader's (made on import).
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_past_pillows_pixel_limit_is_refused_in_one_line(tmp_path, monkeypatch):
  """The poor case: a 14,000-pixel PNG gave PIL's decompression-bomb traceback."""
  from monoformer_jax.vision.images import UnreadableImage, load_image

  Image.new("L", (30, 5)).save(tmp_path / "big.png")
  Image.new("L", (30, 10)).save(tmp_path / "bigger.png")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
  # 150 pixels: past the limit (Pillow only warns); 300: past twice (Pillow raises).
  for name, size in (("big.png", "30x5 = 150 pixels"), ("bigger.png", "300 pixels")):
    with pytest.raises(UnreadableImage) as e:
      load_image(tmp_path / name)
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / name) in message
    assert size in message and "limit of 100 pixels" in message and "MAX_IMAGE_PIXELS" in message
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
  assert load_image(tmp_path / "bigger.png").size == (30, 10)


@pytest.mark.parametrize(
  "array, phrase",
  [
    (np.full((4, 4), np.nan, np.float32), r"NaN or inf \(16 of 16 values\)"),
    (np.array([[0.5, np.inf]]), r"NaN or inf \(1 of 2"),
    (np.full((2, 2), 2.0), r"\[0, 1\]; got 2..2"),
    (np.array([[0, 255]]), "dtype int64 is ambiguous.*astype"),
    (np.zeros((2, 2, 5), np.uint8), r"shape \(2, 2, 5\)"),
    (np.zeros((0, 3), np.uint8), r"shape \(0, 3\)"),
    (np.zeros((2, 2, 2, 3), np.uint8), r"shape \(2, 2, 2, 3\)"),
    (["seven.png"], "dtype <U9"),
  ],
)
def test_arrays_that_are_not_images_are_refused(array, phrase):
  """#10: an all-NaN array read as a black image (nanmin skips NaN, nan_to_num zeroes it)."""
  from monoformer_jax.vision.images import load_image

  with pytest.raises(ValueError, match=phrase):
    load_image(array)


def test_arrays_of_each_kind_read_as_their_levels():
  from monoformer_jax.vision.images import load_image

  levels = np.array([[0, 100, 255]], np.uint8)
  for array in (
    levels,
    levels.astype(np.uint16) * 257,
    levels / 255.0,
    (levels / 255.0).astype(np.float32)[..., None],
  ):
    got = load_image(array)
    assert got.mode == "L" and np.asarray(got).tolist() == levels.tolist(), array.dtype
  assert np.asarray(load_image(np.array([[True, False]]))).tolist() == [[255, 0]]
  rgb = np.stack([levels] * 3, -1)
  assert load_image(rgb).mode == "RGB" and np.array_equal(load_image(rgb), rgb)
  gray_alpha = np.stack([levels, np.array([[255, 0, 128]], np.uint8)], -1)
  assert np.asarray(load_image(gray_alpha)).tolist() == [[0, 255, 255]]


def test_bad_image_files_name_the_file_and_the_fix(tmp_path):
  """Files that are not images, or not whole, or not files: one line each."""
  from monoformer_jax.vision.images import UnreadableImage, load_image

  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
  data = (tmp_path / "x.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "drawing.png").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
  (tmp_path / "folder.png").mkdir()
  Image.fromarray(np.linspace(0, 1000, 8, dtype=np.float32)[None]).save(tmp_path / "f.tif")
  for name, phrase in (
    ("cut.png", "cut.png: its PNG data cannot be decoded.*truncated.*re-download"),
    ("empty.png", "empty.png: an empty file"),
    ("drawing.png", "drawing.png: not an image file Pillow reads"),
    ("folder.png", "folder.png: a folder, not a file"),
    ("absent.png", "absent.png: no such file"),
    ("f.tif", r"f.tif: its F pixels run 0..1000, outside 0..1; scale it to \[0, 1\]"),
  ):
    with pytest.raises(UnreadableImage, match=phrase):
      load_image(tmp_path / name)
  with pytest.raises(UnreadableImage, match="the image: no bytes"):
    load_image(b"")
  assert load_image(data).size == (32, 32)  # bytes read like the file


def test_small_odd_and_animated_images(tmp_path):
  """A 1x1 image reads; an animated GIF gives its first frame (as PIL opens it);
  a float TIFF in [0, 1] is scaled (it read black through --image)."""
  from monoformer_jax.vision.images import load_image

  Image.fromarray(np.array([[77]], np.uint8)).save(tmp_path / "one.png")
  assert np.asarray(load_image(tmp_path / "one.png")).tolist() == [[77]]
  frames = [Image.fromarray(np.full((4, 4), v, np.uint8)) for v in (30, 128, 255)]
  frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
  assert Image.open(tmp_path / "a.gif").n_frames == 3
  assert np.unique(np.asarray(load_image(tmp_path / "a.gif").convert("L"))).tolist() == [30]
  ramp = np.linspace(0, 1, 11, dtype=np.float32)[None]
  Image.fromarray(ramp).save(tmp_path / "f.tif")
  want = np.rint(ramp.astype(np.float64) * 255).astype(np.uint8)
  np.testing.assert_array_equal(load_image(tmp_path / "f.tif"), want)


def test_a_resize_past_the_pixel_limit_is_refused_not_made(monkeypatch):
  """A 10000x1 image (30 kB as PNG) made 2.9 GB and 13 s in data.prepare's crop
  (its short side to 256: 2,560,000x256 pixels); CLIP's resize the same."""
  from monoformer_jax.data.encode import adm_center_crop
  from monoformer_jax.vision.clip_pixels import preprocess
  from monoformer_jax.vision.images import UnreadableImage

  wide = Image.new("RGB", (10000, 1))
  with pytest.raises(UnreadableImage, match=r"10000x1 pixels to 2560000x256 makes 655,360,000"):
    adm_center_crop(wide, 256)
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)
  vcfg = type("V", (), {"image_size": 8})
  with pytest.raises(UnreadableImage, match=r"to 80000x8 makes 640,000 pixels.*nearer to square"):
    preprocess([wide], vcfg)
  assert adm_center_crop(Image.new("RGB", (300, 20)), 16).size == (16, 16)


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
def test_sample_cli_reads_an_image(tmp_path):
  import subprocess
  import sys

  from conftest import REPO

  from monoformer_jax.checkpoints import save_model
  from monoformer_jax.model.build import init_params

  config = _config()
  save_model(str(tmp_path / "ckpt"), config, jax.jit(lambda: init_params(config.model, 1))())
  digit = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
  Image.fromarray(digit).resize((32, 32)).save(tmp_path / "seven.png")
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
  # An --image that is not one, or a model without a vision encoder: test_sample_cli.py's
  # refusals before the model loads (one process for them all).
