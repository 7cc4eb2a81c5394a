"""The `add_before_image_tokens` conditioning against the official code's numbers.

tests/fixtures/official_tiny/add_before_image_tokens/ holds the reference's
tiny model in that mode (t_projector instead of adaLN_module), its inputs and
outputs, and one guided sampling step (its README). Here: every stored
output through the converter at 1e-4, the losses, the guided step through
both samplers (prompt cache and whole row), our packer's layout of the
reference's input_ids, and conversion both ways.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax.convert import official, verify
from monoformer_jax.data.packing import pack_examples
from monoformer_jax.diffusion.gaussian import GaussianDiffusion, apply_cfg
from monoformer_jax.diffusion.sample_images import SamplerSettings, _prefill
from monoformer_jax.layout import Example, RowSpec, prompt_rows
from monoformer_jax.train.loss import loss_terms

TOL = dict(atol=1e-4, rtol=1e-4)
IMAGE, IM_START, PAD = 257, 258, 256
P = 16  # image tokens of the fixture's 8x8x4 latents, patch 2


@pytest.fixture(scope="module")
def folder(fixture_dir):
  return fixture_dir / "add_before_image_tokens"


@pytest.fixture(scope="module")
def model(folder):
  model, config = official.load_official_model(str(folder), verify.fixture_config())
  assert config.model.conditioning == "add_before_image_tokens"
  return model


@pytest.fixture(scope="module")
def io(folder):
  return dict(np.load(folder / "io.npz"))


def nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def test_every_reference_output_within_1e4(folder):
  results = verify.verify_official(str(folder), 1e-4)
  names = {r.name for r in results}
  assert {"c_embeds (t_projector)", "layer_inputs[0]", "logits", "x_out (diffusion)"} <= names
  assert all(r.ok for r in results), verify.report(results, 1e-4)


def test_the_other_mode_is_measurably_different(fixture_dir, folder):
  # The adaLN fixture's weights in this mode's layout would not load, and this
  # fixture's outputs are not the adaLN model's: the comparison can fail.
  io_a = np.load(fixture_dir / "io.npz")
  io_b = np.load(folder / "io.npz")
  assert io_a["logits"].shape[1] + 1 == io_b["logits"].shape[1]  # one more token per image
  assert np.abs(io_a["x_out"] - io_b["x_out"]).max() > 1e-2


def test_losses_match_reference(model, io):
  row = verify.fixture_row(io, P, cond_token=True)
  batch = dict(
    row._asdict(),
    targets=jnp.asarray(io["targets"]),
    text_weights=jnp.asarray(io["text_loss_weight"]),
    latents=nhwc(io["x_start"])[:, None],
  )
  t = jnp.asarray(io["t"][:, None].astype(np.int32))
  terms = loss_terms(model, batch, t, nhwc(io["noise"])[:, None], GaussianDiffusion.create())
  rows = io["x_indices"]
  np.testing.assert_allclose(np.asarray(terms["mse"])[rows, 0], io["diff_mse"], **TOL)
  np.testing.assert_allclose(np.asarray(terms["vb"])[rows, 0], io["diff_vb"], **TOL)
  np.testing.assert_allclose(terms["lm"], io["lm_loss"], **TOL)


def test_packer_lays_out_the_reference_rows(io):
  """Our packer, given the reference's input_ids (one <image> placeholder),
  puts the timestep token where the reference put it: after <|im_start|>,
  outside the image's block, never a text target."""
  spec = RowSpec(
    seq_len=28,
    max_images=1,
    image_shape=(8, 8, 4),
    tokens_per_image=P,
    image_id=IMAGE,
    pad_id=PAD,
    cond_token=True,
  )
  examples = []
  for row_ids, mask in zip(io["input_ids"], io["input_attention_mask"]):
    ids = row_ids[mask]
    n = int((ids == IMAGE).sum())
    examples.append(Example(ids, [np.zeros((8, 8, 4), np.float32)] * n))
  batch = pack_examples(examples, spec, one_per_row=True)
  for name in ("segment_ids", "image_ids", "positions"):
    np.testing.assert_array_equal(batch[name], io[name], err_msg=name)
  text = io["tokens"] >= 0
  np.testing.assert_array_equal(batch["tokens"][text], io["tokens"][text])
  np.testing.assert_array_equal(batch["text_weights"], io["text_loss_weight"])
  t_col = int(np.flatnonzero(io["tokens"][0] == -1)[0])
  assert batch["cond_columns"][0, 0] == t_col and batch["image_columns"][0, 0, 0] == t_col + 1
  assert batch["cond_columns"][1, 0] == 28 and not batch["image_valid"][1, 0]


@pytest.fixture(scope="module")
def cfg_step(folder):
  return dict(np.load(folder / "cfg_step.npz"))


def _prompt_rows(cfg_step):
  prompts = []
  for ids in cfg_step["input_ids"]:
    cut = int(np.flatnonzero(ids == IM_START)[0]) + 1  # <s> prompt <|im_start|>
    prompts.append(ids[:cut].tolist())
  return prompt_rows(
    prompts, pad_id=PAD, new_tokens=P, new_token_id=IMAGE, image=True, cond_token=True
  )


@pytest.mark.parametrize("use_cache", [True, False])
def test_guided_step_matches_reference(model, cfg_step, use_cache):
  """Both rows' raw outputs, the guided output and the sampled x_{t-1}: the
  prompt is cached (the timestep token runs with the image at every step) or
  the whole row is recomputed."""
  rows = _prompt_rows(cfg_step)
  assert rows.layout.new_tokens == P + 1  # the timestep token, then the image
  row = jax.tree.map(jnp.asarray, rows.row)
  z = nhwc(cfg_step["z"])
  t_model = jnp.asarray(cfg_step["t_model"], jnp.int32)
  if use_cache:
    settings = SamplerSettings(None, rows.layout, 1, None, "ddpm", 0.0)
    cache = _prefill(model, settings, row)
    out, _ = model.extend_image(
      z,
      t_model,
      rows.layout.new(row.positions),
      row.segment_ids,
      row.image_ids,
      cache,
      rows.layout.new_column(0),
    )
  else:
    out = model(row, z[:, None], t_model[:, None])[1][:, 0]
  np.testing.assert_allclose(out, nhwc(cfg_step["x_out_raw"]), **TOL)
  guided = apply_cfg(out[:1], out[1:], float(cfg_step["cfg_scale"]), guided_channels=3)
  np.testing.assert_allclose(guided, nhwc(cfg_step["x_out_cfg"])[:1], **TOL)
  d20 = GaussianDiffusion.create(respacing="20")
  t_idx = jnp.asarray(cfg_step["t_idx"][:1], jnp.int32)
  sample = d20.p_sample(guided, z[:1], t_idx, nhwc(cfg_step["noise"])[:1])["sample"]
  np.testing.assert_allclose(sample, nhwc(cfg_step["sample"])[:1], **TOL)


def test_round_trip_is_bit_exact_and_keeps_the_mode(folder, tmp_path):
  from test_convert import _assert_same_official

  official.convert_official(str(folder), str(tmp_path / "ckpt"), verify.fixture_config())
  official.convert_to_official(str(tmp_path / "ckpt"), str(tmp_path / "back"))
  _assert_same_official(tmp_path / "back", folder)
  hf = json.loads((tmp_path / "back" / "config.json").read_text())
  assert hf["decoder_t_embed"] == "add_before_image_tokens"


def test_weights_of_one_mode_under_a_config_of_the_other_name_the_fix(folder, tmp_path):
  hf = json.loads((folder / "config.json").read_text())
  hf["decoder_t_embed"] = "adaln_before_decoder"
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "config.json").write_text(json.dumps(hf))
  (bad / "weights.safetensors").symlink_to(folder / "weights.safetensors")
  with pytest.raises(
    ValueError,
    match=r"t_projector\.\* belongs to decoder_t_embed="
    r"'add_before_image_tokens'.*set it to 'add_before_image_tokens'",
  ):
    official.load_official(str(bad), verify.fixture_config())
  hf["decoder_t_embed"] = "add_at_each_layer"
  (bad / "config.json").write_text(json.dumps(hf))
  with pytest.raises(ValueError, match="decoder_t_embed='add_at_each_layer' is not supported"):
    official.load_official(str(bad), verify.fixture_config())
