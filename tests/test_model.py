"""The model against the official implementation's numbers, and its structure.

The fixture's weights are loaded through the converter (monoformer_jax.convert),
so these tests hold the one key map of the project too.
"""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from official_tiny import load_official_tiny

from monoformer_jax.convert.verify import fixture_row, report, verify_official
from monoformer_jax.diffusion.gaussian import GaussianDiffusion
from monoformer_jax.train.loss import loss_terms

TOL = dict(atol=1e-4, rtol=1e-4)  # float32 vs the reference's float32 (its README)


@pytest.fixture(scope="module")
def official(fixture_dir):
  model, cfg = load_official_tiny(fixture_dir)
  io = dict(np.load(fixture_dir / "io.npz"))
  return model, cfg, io


def _inputs(io):
  """(Row, x_t [B, M=1, h, w, C], t [B, 1]) of the fixture: 16 tokens per image."""
  nhwc = io["x_t"].transpose(0, 2, 3, 1)[:, None]
  return (fixture_row(io, 16), jnp.asarray(nhwc), jnp.asarray(io["t"][:, None].astype(np.int32)))


def test_matches_reference_hidden_states_logits_and_diffusion_output(fixture_dir):
  # verify-official compares every stored output where segment_ids != 0 (the
  # reference's pad rows differ by design) at atol = rtol = 1e-4.
  results = verify_official(str(fixture_dir), TOL["atol"])
  assert {r.name for r in results} >= {
    "t_embeds",
    "c_embeds (adaLN)",
    "layer_inputs[0]",
    "layer_inputs[1]",
    "final_hidden",
    "logits",
    "x_out (diffusion)",
  }
  assert all(r.ok for r in results), report(results, TOL["atol"])
  assert all(0 < r.max_abs < 1e-4 for r in results)  # float32 noise, not a bit-copy


def test_shapes(official):
  model, cfg, io = official
  row, x_t, t = _inputs(io)
  logits, out = model(row, x_t, t)
  chex.assert_shape(logits, (2, 27, cfg.vocab_size))
  chex.assert_type(logits, jnp.float32)
  chex.assert_shape(out, (2, 1, cfg.image_size, cfg.image_size, 2 * cfg.in_channels))


def test_image_inputs_only_reach_the_image_and_what_follows_it(official):
  model, _, io = official
  row, x_t, t = _inputs(io)
  logits_a, out_a = model(row, x_t, t)
  logits_b, out_b = model(row, x_t + 1.0, (t + 311) % 1000)
  logits_a, logits_b = np.asarray(logits_a), np.asarray(logits_b)
  # Row 0: the prefix (bos, prompt, <|im_start|> = positions 0..7) never sees the image.
  np.testing.assert_array_equal(logits_a[0, :8], logits_b[0, :8])
  assert np.abs(logits_a[0, 8:] - logits_b[0, 8:]).max() > 1e-3
  # Row 1 is text only: neither latents nor timesteps touch it.
  np.testing.assert_array_equal(logits_a[1], logits_b[1])
  assert np.abs(np.asarray(out_a)[0] - np.asarray(out_b)[0]).max() > 1e-3


def test_text_logits_depend_only_on_earlier_tokens(official):
  model, _, io = official
  row, x_t, t = _inputs(io)
  base = np.asarray(model(row, x_t, t)[0])
  for j in (3, 10, 16):
    changed = row.tokens.at[1, j].set((row.tokens[1, j] + 7) % 256)
    logits = np.asarray(model(row._replace(tokens=changed), x_t, t)[0])
    np.testing.assert_array_equal(logits[1, :j], base[1, :j])
    assert np.abs(logits[1, j:18] - base[1, j:18]).max() > 1e-4


def test_losses_match_reference(official):
  model, _, io = official
  row, _x_t, t = _inputs(io)
  nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))[:, None]
  batch = dict(
    row._asdict(),
    targets=jnp.asarray(io["targets"]),
    text_weights=jnp.asarray(io["text_loss_weight"]),
    latents=nhwc(io["x_start"]),
  )
  terms = loss_terms(model, batch, t, nhwc(io["noise"]), GaussianDiffusion.create())
  rows = io["x_indices"]
  np.testing.assert_allclose(np.asarray(terms["mse"])[rows, 0], io["diff_mse"], **TOL)
  np.testing.assert_allclose(np.asarray(terms["vb"])[rows, 0], io["diff_vb"], **TOL)
  np.testing.assert_allclose(terms["diff"], io["diff_loss"].mean(), **TOL)
  np.testing.assert_allclose(terms["lm"], io["lm_loss"], **TOL)
  np.testing.assert_array_equal(np.asarray(terms["image_valid"])[:, 0], io["has_image"] == 1)
