"""Conversion of models that read images: the vae and CLIP vision encoders
through the official layout both ways, `convert llama --clip`, and the errors."""

import copy
import json
import pathlib
import shutil
from unittest import mock

import chex
import jax
import numpy as np
import pytest
from flax import traverse_util
from helpers import config_file, hub_repo
from safetensors.numpy import load_file, save_file

from monoformer_jax.checkpoints import load_params, save_model
from monoformer_jax.convert import llama, official, verify
from monoformer_jax.model.build import abstract_model, init_params
from monoformer_jax.model.clip import load_clip_params, read_clip_config
from monoformer_jax.safetensors_io import SafetensorsSource

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_CLIP = REPO / "tests" / "fixtures" / "tiny_clip"
TINY_LLAMA = REPO / "tests" / "fixtures" / "tiny_llama"
TOWER = official.CLIP_TOWER_PREFIX


def _flat(params):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _assert_bit_exact(a, b):
  a, b = _flat(a), _flat(b)
  assert set(a) == set(b)
  for k in a:
    assert a[k].dtype == b[k].dtype == np.float32 and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


def _official_tensors(folder):
  return {
    k: v
    for f in sorted(pathlib.Path(folder).glob("*.safetensors"))
    for k, v in load_file(str(f)).items()
  }


@pytest.fixture(scope="module")
def vae_model():
  """(config, params): configs/digits.py:tiny reading images through the vae
  encoder in add_before_image_tokens mode; random weights, the zero-initialised
  ones (t_projector.fc2, x_embedder, the final layer, biases) made nonzero too."""
  config = config_file("digits:tiny")
  config.model.update(vision_encoder="vae", conditioning="add_before_image_tokens")
  params = jax.jit(lambda: init_params(config.model, seed=3))()
  rng = np.random.default_rng(0)
  flat = {
    k: v if v.any() else (0.02 * rng.standard_normal(v.shape)).astype(np.float32)
    for k, v in _flat(params).items()
  }
  return config, traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def clip_model(vae_model):
  """The same model reading through the tiny CLIP fixture: the fixture's
  tower (it is frozen) and an im_embedder from CLIP's width."""
  config, params = vae_model
  config = copy.deepcopy(config)
  config.model.update(vision_encoder="clip", vision=read_clip_config(TINY_CLIP))
  flat = _flat(params)
  flat[("im_embedder", "fc1", "kernel")] = (
    np.random.default_rng(1).standard_normal((32, 128)).astype(np.float32)
  )
  params = traverse_util.unflatten_dict(flat)
  params["vision_tower"], _ = load_clip_params(TINY_CLIP)
  _, abstract, _ = abstract_model(config.model)
  chex.assert_trees_all_equal_shapes(params, abstract)
  return config, params


def _cli(command, **flag_values):
  from absl import flags
  from absl.testing import flagsaver

  from monoformer_jax.convert.__main__ import main

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**flag_values):
    main(["convert", command])


# ----------------------------------------------------------------- round trips


def test_vae_model_round_trips_bit_exactly(vae_model, tmp_path):
  config, params = vae_model
  save_model(str(tmp_path / "ckpt"), config, params)
  official.convert_to_official(str(tmp_path / "ckpt"), str(tmp_path / "off"))
  hf = json.loads((tmp_path / "off" / "config.json").read_text())
  assert hf["vision_encoder"] == "vae" and hf["decoder_t_embed"] == "add_before_image_tokens"
  assert hf["vision_encoder_args"] == {"patch_size": 2, "resolution": 64}
  tensors = _official_tensors(tmp_path / "off")
  shapes = {
    "im_embedder.0.weight": (128, 4),
    "im_embedder.2.weight": (128, 128),
    "t_projector.0.weight": (128, 128),
    "t_projector.2.weight": (128, 128),
  }
  for key, shape in shapes.items():
    assert tensors[key].shape == shape and tensors[key.replace("weight", "bias")].shape == (128,)
  np.testing.assert_array_equal(
    tensors["im_embedder.0.weight"], params["im_embedder"]["fc1"]["kernel"].T
  )
  np.testing.assert_array_equal(tensors["t_projector.2.bias"], params["t_projector"]["fc2"]["bias"])
  assert not [k for k in tensors if k.startswith(("adaLN_module.", "vision_encoder."))]

  back = official.convert_official(str(tmp_path / "off"), str(tmp_path / "back"), config)
  assert (back.model.vision_encoder, back.model.conditioning) == ("vae", "add_before_image_tokens")
  _assert_bit_exact(load_params(str(tmp_path / "back"), weights="raw")[0], params)

  # The reference's checkpoint also holds its SD-VAE under the tower prefix: skipped, logged.
  tensors[official.VISION_TOWER_PREFIX + "encoder.conv_in.weight"] = np.ones(
    (8, 3, 3, 3), np.float32
  )
  (tmp_path / "with_vae").mkdir()
  save_file(tensors, str(tmp_path / "with_vae" / "model.safetensors"))
  shutil.copy(tmp_path / "off" / "config.json", tmp_path / "with_vae")
  with mock.patch.object(official.logging, "info") as info:
    again, _ = official.load_official(str(tmp_path / "with_vae"), config)
  assert any(
    "skipping the 1 tensors under vision_encoder.vision_tower." in c.args[0] % c.args[1:]
    for c in info.call_args_list
  )
  _assert_bit_exact(again, params)


def test_clip_model_round_trips_with_the_whole_hf_tower(clip_model, tmp_path):
  config, params = clip_model
  save_model(str(tmp_path / "ckpt"), config, params)
  _cli(
    "to-official", input=str(tmp_path / "ckpt"), output=str(tmp_path / "off"), clip=str(TINY_CLIP)
  )
  hf = json.loads((tmp_path / "off" / "config.json").read_text())
  assert (hf["vision_encoder"], hf["vision_encoder_path"], hf["vision_encoder_args"]) == (
    "clip",
    str(TINY_CLIP),
    {},
  )
  tensors = _official_tensors(tmp_path / "off")
  clip = load_file(str(TINY_CLIP / "model.safetensors"))
  # Every key of the HF CLIPVisionModel, the last layer and post_layernorm included,
  # equal to the fixture's (the tower we hold is the fixture's too).
  assert {k[len(TOWER) :] for k in tensors if k.startswith(TOWER)} == set(clip)
  assert "encoder.layers.2.mlp.fc1.weight" in clip and "post_layernorm.weight" in clip
  for key, value in clip.items():
    assert tensors[TOWER + key].tobytes() == value.tobytes(), key
  assert tensors["im_embedder.0.weight"].shape == (128, 32)
  with SafetensorsSource(str(tmp_path / "off")) as source:  # the reference's state_dict order
    order = source.keys()
  first = order.index(TOWER + "embeddings.class_embedding")
  assert order.index("final_layer.adaLN_modulation.1.bias") < first
  assert order.index(TOWER + "post_layernorm.bias") < order.index("im_embedder.0.weight")

  _cli("official", input=str(tmp_path / "off"), output=str(tmp_path / "back"), clip=str(TINY_CLIP))
  back, back_config, _ = load_params(str(tmp_path / "back"), weights="raw")
  assert back_config.model.vision.to_dict() == read_clip_config(TINY_CLIP).to_dict()
  _assert_bit_exact(back, params)


def test_clip_by_hub_id_is_named_by_it(clip_model, tmp_path, monkeypatch):
  """--clip=ORG/NAME (the hub cache, offline: tests/conftest.py): the tower's
  files come from its snapshot, and config.json names the hub id, which the
  reference's from_pretrained loads anywhere, not the cache's path."""
  from huggingface_hub import constants

  hub_repo(tmp_path / "home", "ORG/CLIP", sorted(TINY_CLIP.glob("*.*")))
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "home" / "hub"))
  config, params = clip_model
  save_model(str(tmp_path / "ckpt"), config, params)
  _cli("to-official", input=str(tmp_path / "ckpt"), output=str(tmp_path / "off"), clip="ORG/CLIP")
  assert json.loads((tmp_path / "off" / "config.json").read_text())["vision_encoder_path"] == (
    "ORG/CLIP"
  )
  _cli("official", input=str(tmp_path / "off"), output=str(tmp_path / "back"), clip="ORG/CLIP")
  back, back_config, _ = load_params(str(tmp_path / "back"), weights="raw")
  assert back_config.model.vision.to_dict() == read_clip_config(TINY_CLIP).to_dict()
  _assert_bit_exact(back, params)


# ----------------------------------------------------------------------- llama


def test_llama_with_clip_copies_the_tower_and_inits_the_reader(tmp_path):
  base = verify.fixture_config()
  base.model.update(vision_encoder="clip", conditioning="add_before_image_tokens")
  llama.convert_llama(str(TINY_LLAMA), str(tmp_path / "ckpt"), base, seed=0, clip=str(TINY_CLIP))
  params, config, _ = load_params(str(tmp_path / "ckpt"), weights="raw")
  tower, vcfg = load_clip_params(TINY_CLIP)
  chex.assert_trees_all_equal(params["vision_tower"], tower)
  assert config.model.vision.to_dict() == vcfg.to_dict()  # the base config had none
  p = _flat(params)
  assert p[("im_embedder", "fc1", "kernel")].shape == (32, 64)
  for k in (
    ("im_embedder", "fc1", "kernel"),
    ("im_embedder", "fc2", "kernel"),
    ("t_projector", "fc1", "kernel"),
  ):
    assert 0.017 < p[k].std() < 0.023, k  # N(0, 0.02^2)
  for k in (
    ("im_embedder", "fc1", "bias"),
    ("im_embedder", "fc2", "bias"),
    ("t_projector", "fc1", "bias"),
    ("t_projector", "fc2", "kernel"),
    ("t_projector", "fc2", "bias"),
  ):
    assert not p[k].any(), k

  with pytest.raises(ValueError, match=r"model.vision_encoder='clip'.*pass --clip=DIR"):
    llama.load_llama(str(TINY_LLAMA), base)
  other = copy.deepcopy(base)
  other.model.vision = read_clip_config(TINY_CLIP)
  other.model.vision.mlp_dim = 128
  with pytest.raises(
    ValueError,
    match=r"config.model.vision.mlp_dim=128 but CLIP folder .*"
    r"intermediate_size=64",
  ):
    llama.load_llama(str(TINY_LLAMA), other, clip=str(TINY_CLIP))
  with pytest.raises(
    ValueError,
    match=r"--clip=.* was given, but the base config .*"
    r"vision_encoder='vae'.*drop --clip",
  ):
    llama.load_llama(
      str(TINY_LLAMA),
      official.with_model_fields(base, dict(vision_encoder="vae")),
      clip=str(TINY_CLIP),
    )


# ---------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def clip_official(clip_model, tmp_path_factory):
  config, params = clip_model
  folder = tmp_path_factory.mktemp("clip_official")
  official.write_official(params, config, str(folder), max_shard_bytes=10**9, clip=str(TINY_CLIP))
  return folder


def _clip_variant(tmp_path, edit_config=None, edit_tensors=None):
  """A copy of the tiny CLIP fixture with its config.json or tensors edited."""
  folder = tmp_path / "clip"
  shutil.copytree(TINY_CLIP, folder)
  if edit_config:
    hf = json.loads((folder / "config.json").read_text())
    edit_config(hf)
    (folder / "config.json").write_text(json.dumps(hf))
  if edit_tensors:
    tensors = load_file(str(folder / "model.safetensors"))
    edit_tensors(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
  return str(folder)


def test_official_clip_checkpoint_errors_name_the_fix(clip_official, tmp_path):
  base = config_file("digits:tiny")
  with pytest.raises(
    ValueError,
    match=r"reads images through CLIP.*pass --clip=DIR.*"
    r"vision_encoder_path='.*tiny_clip'",
  ):
    official.load_official(str(clip_official), base)
  wider = _clip_variant(tmp_path, lambda hf: hf.update(hidden_size=48))
  with pytest.raises(
    ValueError,
    match=r"'vision_model.embeddings.class_embedding' has shape "
    r"\(32,\) but the CLIP config .*clip/config.json \(--clip\) "
    r"makes it \(48,\).*hidden_size=48",
  ):
    official.load_official(str(clip_official), base, clip=wider)
  with pytest.raises(ValueError, match=r"drop --clip"):
    official.load_official(
      str(REPO / "tests" / "fixtures" / "official_tiny"), base, clip=str(TINY_CLIP)
    )
  bogus = tmp_path / "bogus"
  shutil.copytree(clip_official, bogus)
  hf = json.loads((bogus / "config.json").read_text())
  (bogus / "config.json").write_text(json.dumps({**hf, "vision_encoder": "siglip"}))
  with pytest.raises(
    ValueError,
    match=r"vision_encoder='siglip' is not supported.*"
    r"\('clip', 'vae'\)",
  ):
    official.load_official(str(bogus), base, clip=str(TINY_CLIP))
  vae = {**hf, "vision_encoder": "vae", "vision_encoder_args": {"patch_size": 4}}
  with pytest.raises(ValueError, match=r"vision_encoder_args.patch_size=4 but patch_size=2"):
    official.monoformer_fields(vae, "config.json")


def test_to_official_clip_errors_name_the_fix(clip_model, tmp_path):
  config, params = clip_model
  write = lambda clip, name: official.write_official(
    params, config, str(tmp_path / name), max_shard_bytes=10**9, clip=clip
  )
  with pytest.raises(
    ValueError,
    match=r"last encoder layer and post_layernorm.*pass "
    r"--clip=DIR",
  ):
    write(None, "none")
  deeper = _clip_variant(tmp_path / "a", lambda hf: hf.update(num_hidden_layers=4))
  with pytest.raises(
    ValueError,
    match=r"model.vision.num_layers=3 but --clip=.* gives "
    r"num_layers=4",
  ):
    write(deeper, "deeper")

  def break_tail(t):
    del t["post_layernorm.weight"]
    t["encoder.layers.2.mlp.fc1.weight"] = np.zeros((65, 32), np.float32)

  broken = _clip_variant(tmp_path / "b", edit_tensors=break_tail)
  with pytest.raises(ValueError) as e:
    write(broken, "broken")
  assert "encoder.layers.2.mlp.fc1.weight: shape (65, 32), the model's tower needs (64, 32)" in str(
    e.value
  )
  assert "post_layernorm.weight: missing" in str(e.value)
  assert "pass --clip=DIR, the HF CLIP folder the model's tower came from" in str(e.value)

  # A tower that is not the folder's: written, with a warning.
  other = copy.deepcopy(params)
  other["vision_tower"]["class_embedding"] = other["vision_tower"]["class_embedding"] + 1
  with mock.patch.object(official.logging, "warning") as warning:
    official.write_official(
      other, config, str(tmp_path / "other"), max_shard_bytes=10**9, clip=str(TINY_CLIP)
    )
  assert "differs from --clip" in warning.call_args.args[0]
