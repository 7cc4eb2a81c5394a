"""Image-conditioned generation (editing), chain guidance, the digits'
interleaved and editing examples, the interleaved HTML page, and both through
the sampling CLI."""

import html.parser
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from flax import nnx
from helpers import digits_config, random_model

from monoformer_jax import inference
from monoformer_jax.data import prompts
from monoformer_jax.data.packing import pack_examples
from monoformer_jax.diffusion.gaussian import GaussianDiffusion, apply_cfg, apply_guidance
from monoformer_jax.diffusion.sample_images import sample_images
from monoformer_jax.digits import source as digits
from monoformer_jax.errors import ConfigError
from monoformer_jax.layout import row_spec
from monoformer_jax.model.monoformer import MonoFormer
from monoformer_jax.text.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
digit = lambda v: np.full((8, 8, 1), v, np.float32)


def test_chain_guidance_is_cfg_and_instruct_pix2pix():
  rng = np.random.default_rng(0)
  full, image_only, null = (
    jnp.asarray(rng.normal(size=(2, 4, 4, 2)), jnp.float32) for _ in range(3)
  )
  np.testing.assert_allclose(apply_guidance([full, null], [1.7]), apply_cfg(full, null, 1.7))
  got = np.asarray(apply_guidance([full, image_only, null], [2.0, 1.5]))
  f, i, n = (np.asarray(x)[..., :1] for x in (full, image_only, null))
  np.testing.assert_allclose(got[..., :1], n + 1.5 * (i - n) + 2.0 * (f - i), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got[..., 1:], np.asarray(full)[..., 1:])  # variance: full's
  np.testing.assert_allclose(apply_guidance([full, image_only, null], [1.0, 1.0]), full, atol=1e-6)
  with pytest.raises(ValueError, match="G - 1 scales"):
    apply_guidance([full, null], [1.0, 2.0])


def _config(conditioning="adaln_before_decoder"):
  c = digits_config()
  c.model.update(vision_encoder="vae", conditioning=conditioning)
  c.data.update(max_read_images_per_row=1, max_images_per_row=1, seq_len=80)
  return c


def test_edit_rows_drop_what_the_guidance_says():
  spec = row_spec(_config(), TOK)
  rows = prompts.edit_rows(
    [digit(0.5), digit(-0.5)], ["the next digit:"] * 2, TOK, spec, guidance="two_scale"
  )
  row = rows.row
  assert row.tokens.shape[0] == 6  # [full; image only; null], 2 each
  assert row.read_valid[:, 0].tolist() == [True, True, True, True, False, False]
  np.testing.assert_array_equal(rows.read_images[:2, 0], np.stack([digit(0.5), digit(-0.5)]))
  text = [TOK.decode([t for t in r[s > 0] if t < 256]) for r, s in zip(row.tokens, row.segment_ids)]
  assert text[:2] == ["\nthe next digit:"] * 2 and text[2:4] == ["\n"] * 2
  assert text[4:] == [""] * 2  # the null prompt <s> <|im_start|>
  image_only = prompts.edit_rows([digit(0.5)], ["go"], TOK, spec, guidance="image").row
  assert not image_only.read_valid[1].any()
  assert TOK.decode([t for t in image_only.tokens[1] if t < 256]) == "go"
  with pytest.raises(ValueError, match="guidance='twice'"):
    prompts.edit_rows([digit(0.5)], ["go"], TOK, spec, guidance="twice")


@pytest.mark.slow
@pytest.mark.parametrize("conditioning", ["adaln_before_decoder", "add_before_image_tokens"])
def test_edit_guidance_at_scale_one_is_the_conditionalrandom_model(conditioning):
  config = _config(conditioning)
  model = random_model(config, seed=2)
  spec = row_spec(config, TOK)
  sources, instructions = [digit(0.6), digit(-0.6)], ["the next digit:", "a seven"]
  d = GaussianDiffusion.create(respacing="4")
  key = jax.random.PRNGKey(1)
  plain = prompts.edit_rows(sources, instructions, TOK, spec, guidance=None)
  unguided = sample_images(model, plain, d, key)
  # The prompt cache over the read image equals recomputing the rows.
  np.testing.assert_allclose(
    unguided, sample_images(model, plain, d, key, use_cache=False), atol=1e-4, rtol=1e-4
  )
  for guidance, scale in [("both", 1.0), ("text", 1.0), ("image", 1.0), ("two_scale", (1.0, 1.0))]:
    rows = prompts.edit_rows(sources, instructions, TOK, spec, guidance=guidance)
    np.testing.assert_allclose(
      sample_images(model, rows, d, key, cfg_scale=scale),
      unguided,
      atol=1e-4,
      rtol=1e-4,
      err_msg=guidance,
    )
  rows = prompts.edit_rows(sources, instructions, TOK, spec, guidance="two_scale")
  strong = sample_images(model, rows, d, key, cfg_scale=(3.0, 2.0))
  assert np.abs(np.asarray(strong) - np.asarray(unguided)).max() > 1e-3
  # The source image conditions the edit.
  other = sample_images(
    model,
    prompts.edit_rows([digit(-0.6), digit(0.6)], instructions, TOK, spec, guidance=None),
    d,
    key,
  )
  assert np.abs(np.asarray(other) - np.asarray(unguided)).max() > 1e-3


def test_edit_images_bad_inputs_name_the_fix():
  config = _config()
  model = random_model(config)
  with pytest.raises(ConfigError, match=r"cfg_scale=\(text scale, image scale\)"):
    inference.edit_images(
      model, TOK, [digit(0.0)], "go", config=config, guidance="two_scale", cfg_scale=2.0
    )
  with pytest.raises(ConfigError, match="2 instructions for 1 images"):
    inference.edit_images(model, TOK, [digit(0.0)], ["a", "b"], config=config)
  plain = digits_config()
  with pytest.raises(ConfigError, match="no vision encoder"):
    inference.edit_images(
      MonoFormer(plain.model, rngs=nnx.Rngs(0)), TOK, [digit(0.0)], "go", config=plain
    )


def test_digits_interleaved_and_edit_examples():
  texts = digits.interleaved_texts([7, 2])
  assert texts == ["here is a seven: ", ". and a two: ", "."]
  assert digits.named_digits(["here is a seven: ", ". and a two: ", "nothing"]) == [7, 2, -1]
  assert digits.next_digit(3) == 4 and digits.next_digit(9) == 0
  example = prompts.interleaved_example(texts, [digit(0.1), digit(0.2)], TOK)
  config = digits_config()
  config.data.update(max_images_per_row=2, seq_len=96)
  batch = pack_examples([example], row_spec(config, TOK))
  w, targets = batch["text_weights"][0], batch["targets"][0]
  trained = targets[w > 0]
  # Cross-entropy on the text and on each <|im_start|> (where to draw), never on
  # <|im_end|> (the sampler writes it) or from an image token.
  assert (trained == TOK.im_start_id).sum() == 2 and TOK.im_end_id not in trained
  assert not (w * (batch["image_ids"][0] > 0)).any()
  assert TOK.decode([t for t in trained if t < 256]) == "here is a seven: . and a two: ."
  assert batch["image_valid"][0].tolist() == [True, True]
  # Edits: the source read, the next digit drawn; dropping either for guidance.
  edit = prompts.edit_example("the next digit:", digit(0.3), digit(0.4), TOK)
  assert edit.read == [True, False]
  assert prompts.edit_example(None, None, digit(0.4), TOK).ids[:2] == [TOK.bos_id, TOK.im_start_id]
  assert prompts.edit_example("go", None, digit(0.4), TOK).read == [False]


def test_digits_stream_mixes_the_new_kinds_in_their_shares(tmp_path):
  config = _config()
  config.data.update(
    dir=str(tmp_path),
    interleaved_fraction=0.2,
    edit_fraction=0.2,
    read_fraction=0.1,
    text_fraction=0.2,
  )
  stream = digits.digits_example_stream(config, TOK, seed=0)
  examples = [stream(i) for i in range(500)]
  interleaved = [e for e in examples if e.interleaved]
  edits = [e for e in examples if e.read and not all(e.read)]
  # 20% each (within a mixing block); about a tenth of the edits dropped the source
  assert 85 <= len(interleaved) <= 115 and 70 <= len(edits) <= 110
  _, held = digits.reading_split(digits.digit_records(config))
  held_images = np.stack([np.asarray(held[i]["image"]) for i in range(len(held))])
  for e in edits[:30]:  # held-out digits are never edit sources
    assert not (np.abs(held_images - e.images[0]).max(axis=(1, 2, 3)) == 0).any()
  config.data.update(edit_fraction=0.6)
  with pytest.raises(ConfigError, match="exceed 1"):
    digits.digits_example_stream(config, TOK, seed=0)


class _Page(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.order = []

  def handle_starttag(self, tag, attrs):
    if tag == "img":
      self.order.append(("image", dict(attrs)["src"]))

  def handle_data(self, data):
    if data.strip() and self.order is not None and not data.startswith(("body", "<")):
      self.order.append(("text", data))


def test_the_interleaved_page_lists_the_pieces_in_order(tmp_path):
  image = lambda v: np.full((8, 8, 1), v, np.float32)
  answers = [
    inference.Answer(
      [("text", " seven: "), ("image", image(0.2)), ("text", ". & <b>"), ("image", image(0.8))],
      "stop",
    ),
    inference.Answer([("image", image(0.5))], "budget"),
  ]
  page = inference.write_interleaved_page(answers, ["here is a", "two"], str(tmp_path))
  parser = _Page()
  parser.feed(open(page).read())
  body = [
    p
    for p in parser.order
    if p[0] == "image" or p[1].strip() not in ("", "interleaved samples") and "{" not in p[1]
  ]
  assert body == [
    ("text", "here is a"),
    ("text", " seven: "),
    ("image", "interleaved/0_0.png"),
    ("text", ". & <b>"),
    ("image", "interleaved/0_1.png"),
    ("text", "two"),
    ("image", "interleaved/1_0.png"),
    ("text", "(out of tokens)"),
  ]
  for _, src in (p for p in body if p[0] == "image"):
    assert os.path.getsize(tmp_path / src) > 0
  saved = json.load(open(tmp_path / "interleaved.json"))
  assert [list(p) for p in saved[0]["pieces"]] == [["text"], ["image"], ["text"], ["image"]]
  assert saved[0]["pieces"][1] == {"image": "interleaved/0_0.png"} and saved[1]["stop"] == "budget"
  # The ids of an answer become its pieces: each image is <|im_start|> <image> <|im_end|>.
  t = TOK
  ids = t.encode("a ") + [t.im_start_id, t.image_id, t.im_end_id] + t.encode(".") + [t.eos_id]
  pieces = inference._pieces(ids, iter([image(0.1)]), t)
  assert [k for k, _ in pieces] == ["text", "image", "text"] and pieces[2][1] == "."


# Runs `sample.main` on each command line of a JSON list of argv lists, in one
# process (a process costs seconds), its programs in the suite's compilation
# cache as the CLI's are; the entry point's own handling is
# tests/test_sample_cli.py's.
_SAMPLE_COMMANDS = r"""
import json, sys
from absl import flags
from monoformer_jax import cli, sample

cli.use_compilation_cache()
for argv in json.loads(sys.argv[1]):
  flags.FLAGS.unparse_flags()
  sample.main(flags.FLAGS(["sample", *argv]))
"""


@pytest.mark.slow
def test_sample_cli_edits_and_interleaves(tmp_path):
  """`edit` and `interleaved` of the sampling CLI, one after the other in one
  process, write their outputs."""
  from PIL import Image

  from monoformer_jax.checkpoints import save_model
  from monoformer_jax.model.build import init_params

  config = _config("add_before_image_tokens")
  config.data.seq_len = 128
  save_model(str(tmp_path / "ckpt"), config, jax.jit(lambda: init_params(config.model, 1))())
  Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8)).save(tmp_path / "3.png")
  shared = [f"--checkpoint={tmp_path / 'ckpt'}", "--weights=raw", "--num_steps=2"]
  edit = [
    *shared,
    "edit",
    f"--image={tmp_path / '3.png'}",
    "--prompt=the next digit:",
    "--num_samples=3",
    "--edit_guidance=two_scale",
    "--cfg_scale=2",
    f"--output_dir={tmp_path / 'e'}",
  ]
  inter = [
    *shared,
    "interleaved",
    "--text_prompt=here is a",
    "--num_samples=2",
    "--max_new_tokens=40",
    f"--output_dir={tmp_path / 'i'}",
  ]
  run = subprocess.run(
    [sys.executable, "-c", _SAMPLE_COMMANDS, json.dumps([edit, inter])],
    capture_output=True,
    text=True,
    cwd=REPO,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=300,
  )
  assert run.returncode == 0, run.stderr[-2000:]
  saved = np.load(tmp_path / "e" / "edits.npz")
  assert saved["images"].shape == (3, 8, 8, 1)
  assert os.path.getsize(tmp_path / "e" / "edits.png") > 0
  rows = json.load(open(tmp_path / "i" / "interleaved.json"))
  assert [r["prompt"] for r in rows] == ["here is a"] * 2
  assert os.path.getsize(tmp_path / "i" / "interleaved.html") > 0
  # Too few --max_new_tokens for an image: test_sample_cli.py's refusals (one process).
