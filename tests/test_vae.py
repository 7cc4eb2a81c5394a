"""The Flax AutoencoderKL against PyTorch diffusers' outputs (tests/fixtures/tiny_vae).

The fixture (made by tests/fixtures/make_vae_fixture.py) is a tiny random
diffusers VAE in the diffusers layout plus its float64 outputs in io.npz.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from monoformer_jax.vae import (
  SCALING_FACTOR,
  DiagonalGaussian,
  VAEConfig,
  decode_latents,
  encode_images,
  load_vae,
  vae_from_tensors,
)
from monoformer_jax.vae.load import read_tensors

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "tiny_vae"
WEIGHTS = FIXTURE / "diffusion_pytorch_model.safetensors"

# Max error allowed, relative to the largest reference value. float32 rounding
# through the ~25 layers measures ~1e-6 of the scale (4e-6 abs for the
# reconstruction, encoder then decoder); real mistakes are far above it: even a
# GroupNorm eps of 1e-5 instead of 1e-6 moves the posterior mean by 4e-5.
RTOL_OF_SCALE = 1e-5


def assert_matches(actual, expected, name):
  err = float(np.abs(np.asarray(actual, np.float64) - expected).max())
  tol = RTOL_OF_SCALE * float(np.abs(expected).max())
  assert np.asarray(actual).shape == expected.shape, name
  assert err <= tol, f"{name}: max |error| {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def io():
  with np.load(FIXTURE / "io.npz") as f:
    return dict(f)


@pytest.fixture(scope="module")
def config():
  with open(FIXTURE / "config.json") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def vae():
  return load_vae(FIXTURE)


@pytest.fixture(scope="module")
def outputs(vae, io):
  """Everything the comparisons need, from one jax.jit over the split module."""
  graphdef, state = nnx.split(vae)

  @jax.jit
  def run(state, pixels, latents, key):
    model = nnx.merge(graphdef, state)
    posterior = model.encode(pixels)
    scaled = encode_images(model, pixels)  # XLA shares the encoder work with the above
    # One decoder pass for both: the fixture's latents (scaled first) and the round trip.
    decoded = decode_latents(model, jnp.concatenate([latents * SCALING_FACTOR, scaled]))
    n = len(pixels)
    return dict(
      mean=posterior.mean,
      logvar=posterior.logvar,
      scaled=scaled,
      decoded=decoded[:n],
      reconstruction=decoded[n:],
      sampled=encode_images(model, pixels, key),
      noise=jax.random.normal(key, posterior.mean.shape),
    )

  # An 'rbg' key: the default threefry's random bits take seconds to compile on CPU.
  key = jax.random.key(3, impl="rbg")
  return jax.device_get(run(state, io["pixels"], io["latents"], key))


def params_of(model):
  return {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model))}


def test_encoder_matches_diffusers(outputs, io):
  assert_matches(outputs["mean"], io["mean"], "posterior mean")
  assert_matches(outputs["logvar"], io["logvar"], "posterior logvar")


def test_decoder_matches_diffusers(outputs, io):
  assert_matches(outputs["decoded"], io["decoded"], "decode_latents(latents * scale)")


def test_scaled_round_trip_matches_diffusers(outputs, io, vae):
  assert vae.config.scaling_factor == SCALING_FACTOR
  assert_matches(outputs["scaled"], io["mean"] * SCALING_FACTOR, "encode_images")
  assert_matches(outputs["reconstruction"], io["reconstruction"], "decode_latents")


def test_encode_images_with_key_samples_the_posterior(outputs, io):
  expected = (io["mean"] + np.exp(0.5 * io["logvar"]) * outputs["noise"]) * SCALING_FACTOR
  assert np.abs(outputs["sampled"] - outputs["scaled"]).max() > 0.01
  assert_matches(outputs["sampled"], expected, "encode_images(key)")


def test_posterior_clips_logvar_to_diffusers_range():
  # The fixture's logvars are near 0; this is the part of the posterior it cannot reach.
  moments = jnp.array([1.0, 2.0, 3.0, -50.0, 4.0, 25.0]).reshape(1, 1, 1, 6)
  posterior = DiagonalGaussian.from_moments(moments)
  np.testing.assert_array_equal(posterior.mean.ravel(), [1.0, 2.0, 3.0])
  np.testing.assert_array_equal(posterior.logvar.ravel(), [-30.0, 4.0, 20.0])
  np.testing.assert_allclose(posterior.std.ravel(), np.exp([-15.0, 2.0, 10.0]), rtol=1e-6)


def test_legacy_attention_names_as_1x1_convs_from_one_file(tmp_path, vae):
  from safetensors.numpy import save_file

  legacy = {}
  for name, tensor in read_tensors(WEIGHTS).items():
    key, value = name, tensor
    for new, old in (
      ("to_q", "query"),
      ("to_k", "key"),
      ("to_v", "value"),
      ("to_out.0", "proj_attn"),
    ):
      if f".attentions.0.{new}." in key:
        key = key.replace(f".{new}.", f".{old}.")
        value = value[..., None, None] if value.ndim == 2 else value
    legacy[key] = value
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  save_file(legacy, str(tmp_path / "vae.safetensors"))

  loaded = load_vae(tmp_path / "vae.safetensors", config=FIXTURE / "config.json")
  want = params_of(vae)
  got = params_of(loaded)
  assert got.keys() == want.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


def test_missing_key_is_named(config):
  tensors = read_tensors(WEIGHTS)
  del tensors["decoder.mid_block.attentions.0.to_v.weight"]
  with pytest.raises(ValueError, match=r"missing.*decoder\.mid_block\.attentions\.0\.to_v\.weight"):
    vae_from_tensors(tensors, VAEConfig.from_diffusers(config))


def test_wrong_shape_names_key_shapes_and_config_value(config):
  tensors = read_tensors(WEIGHTS)
  tensors["encoder.conv_in.weight"] = np.zeros((16, 4, 3, 3), np.float16)
  with pytest.raises(ValueError) as error:
    vae_from_tensors(tensors, VAEConfig.from_diffusers(config))
  message = str(error.value)
  for part in ("'encoder.conv_in.weight'", "(16, 4, 3, 3)", "(16, 3, 3, 3)", "in_channels=3"):
    assert part in message, message


def test_config_not_matching_checkpoint_says_what_to_change(config):
  with pytest.raises(ValueError, match=r"latent_channels=8") as error:
    load_vae(FIXTURE, config=dict(config, latent_channels=8))
  assert "(32, 4, 3, 3)" in str(error.value)  # decoder.conv_in as found
  with pytest.raises(ValueError, match=r"missing.*resnets\.2.*layers_per_block=2"):
    load_vae(FIXTURE, config=dict(config, layers_per_block=2))
  with pytest.raises(ValueError, match=r"not in the model.*block_out_channels=\[16\]"):
    load_vae(
      FIXTURE,
      config=dict(
        config,
        block_out_channels=[16],
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
      ),
    )


def test_unsupported_config_and_missing_files(config, tmp_path):
  bad = dict(config, down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"])
  with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
    VAEConfig.from_diffusers(bad)
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    load_vae(tmp_path)


def test_nchw_input_is_refused(vae, io):
  with pytest.raises(ValueError, match=r"NHWC.*transpose"):
    vae.encode(jnp.asarray(io["pixels"]).transpose(0, 3, 1, 2))


def test_bfloat16_params_and_compute(vae, io):
  vae_bf16 = load_vae(FIXTURE, dtype=jnp.bfloat16)
  assert vae_bf16.dtype == jnp.bfloat16
  out = nnx.jit(decode_latents)(vae_bf16, jnp.asarray(io["mean"][:1] * SCALING_FACTOR))
  assert out.dtype == jnp.float32
  # bf16 keeps ~3 significant digits; a few percent of the scale over the decoder.
  err = np.abs(np.asarray(out) - io["reconstruction"][:1]).max()
  assert err < 0.05 * np.abs(io["reconstruction"]).max(), err
