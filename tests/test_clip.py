"""The CLIP vision tower and its preprocessing against HF transformers (tests/fixtures/tiny_clip).

The fixture (made by tests/fixtures/make_clip_fixture.py) is a tiny random HF
CLIPVisionModel (3 layers) saved by transformers 5 (keys without the
`vision_model.` prefix), its preprocessor_config.json, and in io.npz
hidden_states[-2][:, 1:] of random pixels computed in float64, plus the
processor's pixels of two non-square uint8 images.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from monoformer_jax.errors import CheckpointError, FileFormatError, MissingPathError
from monoformer_jax.model.clip import (
  abstract_tower,
  clip_config_from_hf,
  clip_params_from_tensors,
  feature_dim,
  load_clip_params,
  tokens_of,
  tower_from_params,
)
from monoformer_jax.model.layers import logical_axes_of
from monoformer_jax.parallel.sharding import RULES, logical_to_spec
from monoformer_jax.safetensors_io import SafetensorsSource, write_safetensors
from monoformer_jax.vision.clip_pixels import load_preprocessing, preprocess, preprocess_file

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "tiny_clip"

# Max error allowed, relative to the largest reference feature. float32
# rounding through the tower measures 3.5e-7 of the scale; the smallest
# mistake tried, a LayerNorm eps of 1e-6 instead of 1e-5, moves the features
# by 8e-5 (gelu for quick_gelu by 4e-3, the last layer's output by 0.3), and
# test_tolerance_catches_mistakes keeps those outside it.
RTOL_OF_SCALE = 1e-5


def max_error(actual, expected) -> tuple[float, float]:
  """(max |actual - expected|, the tolerance for `expected`)."""
  assert np.shape(actual) == expected.shape
  err = float(np.abs(np.asarray(actual, np.float64) - expected).max())
  return err, RTOL_OF_SCALE * float(np.abs(expected).max())


@pytest.fixture(scope="module")
def io():
  with np.load(FIXTURE / "io.npz") as f:
    return dict(f)


@pytest.fixture(scope="module")
def loaded():
  return load_clip_params(FIXTURE)


def features(params, vcfg, pixels):
  return np.asarray(nnx.jit(lambda tower, x: tower(x))(tower_from_params(params, vcfg), pixels))


def variant(vcfg, **fields):
  v = vcfg.copy_and_resolve_references()
  v.update(fields)
  return v


def test_features_match_hf(loaded, io):
  params, vcfg = loaded
  assert (tokens_of(vcfg), feature_dim(vcfg)) == (16, 32)
  err, tol = max_error(features(params, vcfg, io["pixels"]), io["features"])
  assert err <= tol, f"max |error| {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("mistake", ["layer_norm_eps", "gelu", "last_layer"])
def test_tolerance_catches_mistakes(loaded, io, mistake):
  """Each plausible slip moves the features well outside the tolerance."""
  params, vcfg = loaded
  if mistake == "layer_norm_eps":
    out = features(params, variant(vcfg, layer_norm_eps=1e-6), io["pixels"])
  elif mistake == "gelu":
    out = features(params, variant(vcfg, hidden_act="gelu"), io["pixels"])
  else:  # every layer run: num_layers 4 builds (and reads) the file's 3 layers
    deeper = variant(vcfg, num_layers=4)
    with SafetensorsSource(FIXTURE) as source:
      out = features(clip_params_from_tensors(source, deeper), deeper, io["pixels"])
    err, tol = max_error(out, io["last"])
    assert err <= tol, "the 3-layer run should be HF's last_hidden_state"
  err, tol = max_error(out, io["features"])
  assert err > 5 * tol, f"{mistake}: error {err:.3g} is within 5x the tolerance {tol:.3g}"


def test_logical_axes_replicated_by_project_rules():
  _, vcfg = load_clip_params(FIXTURE)
  state = nnx.state(abstract_tower(vcfg), nnx.Param)
  axes = jax.tree.leaves(
    jax.tree.map(logical_axes_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable)),
    is_leaf=lambda x: isinstance(x, tuple),
  )
  assert ("layers", "clip_embed", "clip_heads") in axes
  assert all(
    logical_to_spec(a, RULES) == jax.sharding.PartitionSpec(*[None] * len(a)) for a in axes
  )


def test_preprocess_matches_processor(io, tmp_path):
  size, crop, mean, std = load_preprocessing(FIXTURE)
  assert (size, crop) == (32, (32, 32))
  _, vcfg = load_clip_params(FIXTURE)
  raws = [io["raw0"], io["raw1"]]
  for images in (raws, [Image.fromarray(r) for r in raws]):
    out = preprocess(images, vcfg, mean, std, size=size, crop=crop)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, io["processed"], atol=1e-5, rtol=0)
  Image.fromarray(io["raw1"]).save(tmp_path / "raw1.png")
  np.testing.assert_allclose(
    preprocess_file(tmp_path / "raw1.png", vcfg, mean, std), io["processed"][1:], atol=1e-5, rtol=0
  )
  gray = io["raw0"][..., 0]
  np.testing.assert_array_equal(
    preprocess([gray], vcfg), preprocess([np.stack([gray] * 3, -1)], vcfg)
  )


def test_default_preprocessing_is_openai_clip(tmp_path):
  size, crop, mean, std = load_preprocessing(tmp_path)
  assert (size, crop) == (224, (224, 224))
  assert mean == (0.48145466, 0.4578275, 0.40821073)
  assert std == (0.26862954, 0.26130258, 0.27577711)


def test_config_of_clip_vit_large_patch14():
  """openai/clip-vit-large-patch14's config.json (a CLIPConfig): its
  vision_config_dict overrides vision_config, absent fields are HF's defaults."""
  config = {
    "model_type": "clip",
    "projection_dim": 768,
    "text_config": {"hidden_size": 768},
    "vision_config": {
      "hidden_size": 768,
      "intermediate_size": 3072,
      "num_hidden_layers": 12,
      "patch_size": 32,
    },
    "vision_config_dict": {
      "hidden_size": 1024,
      "intermediate_size": 4096,
      "num_attention_heads": 16,
      "num_hidden_layers": 24,
      "patch_size": 14,
      "projection_dim": 768,
    },
  }
  vcfg = clip_config_from_hf(config)
  assert vcfg.to_dict() == dict(
    hidden_size=1024,
    mlp_dim=4096,
    num_layers=24,
    num_heads=16,
    image_size=224,
    patch_size=14,
    num_channels=3,
    layer_norm_eps=1e-5,
    hidden_act="quick_gelu",
  )
  assert (tokens_of(vcfg), feature_dim(vcfg)) == (256, 1024)


def clip_model_folder(tmp_path, drop=()):
  """The fixture as a full CLIPModel would save it: a nested config.json, every
  vision key under `vision_model.`, text keys and a position_ids buffer beside."""
  folder = tmp_path / "clip_model"
  folder.mkdir()
  vision = json.loads((FIXTURE / "config.json").read_text())
  (folder / "config.json").write_text(
    json.dumps({"model_type": "clip", "vision_config": vision, "text_config": {"hidden_size": 16}})
  )
  with SafetensorsSource(FIXTURE) as source:
    tensors = {"vision_model." + k: source.read(k) for k in source.keys()}
  tensors.update(
    {
      "text_model.embeddings.token_embedding.weight": np.ones((5, 16), np.float32),
      "text_projection.weight": np.ones((8, 16), np.float32),
      "visual_projection.weight": np.ones((8, 32), np.float32),
      "logit_scale": np.ones((1,), np.float32),
      "vision_model.embeddings.position_ids": np.arange(17.0)[None],
    }
  )
  for key in drop:
    del tensors[key]
  write_safetensors(
    folder, [(k, v.shape) for k, v in tensors.items()], tensors.__getitem__, max_shard_bytes=1 << 30
  )
  return folder


def test_clip_model_layout_loads_the_same(loaded, tmp_path):
  params, vcfg = load_clip_params(clip_model_folder(tmp_path), vcfg=loaded[1])
  assert vcfg == loaded[1]
  jax.tree.map(np.testing.assert_array_equal, params, loaded[0])


def test_missing_key_is_named(tmp_path):
  key = "vision_model.encoder.layers.1.mlp.fc1.bias"
  with pytest.raises(CheckpointError, match=r"missing: " + key.replace(".", r"\.")):
    load_clip_params(clip_model_folder(tmp_path, drop=[key]))


def test_wrong_shape_names_key_shapes_and_field(tmp_path):
  folder = tmp_path / "bad"
  shutil.copytree(FIXTURE, folder)
  config = json.loads((folder / "config.json").read_text())
  config["intermediate_size"] = 48
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(
    CheckpointError,
    match=r"'encoder\.layers\.0\.mlp\.fc1\.bias' has shape "
    r"\(64,\) but .*config\.json makes it \(48,\).*intermediate_size=48.*"
    r"use the config\.json saved with these weights",
  ):
    load_clip_params(folder)


def test_config_disagreeing_with_folder(loaded):
  with pytest.raises(
    CheckpointError,
    match=r"config\.model\.vision\.hidden_size=1024 but .*"
    r"hidden_size=32.*use the folder's config",
  ):
    load_clip_params(FIXTURE, vcfg=variant(loaded[1], hidden_size=1024))


def test_missing_folder_and_files(tmp_path):
  with pytest.raises(MissingPathError, match=r"does not exist; pass the folder of an HF"):
    load_clip_params(tmp_path / "nowhere")
  with pytest.raises(MissingPathError, match=r"has no config\.json"):
    load_clip_params(tmp_path)
  shutil.copy(FIXTURE / "config.json", tmp_path)
  with pytest.raises(MissingPathError, match=r"holds no weights: expected model\.safetensors"):
    load_clip_params(tmp_path)
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")  # read without torch: a broken one
  with pytest.raises(FileFormatError, match=r"pytorch_model\.bin is not a PyTorch weights file"):
    load_clip_params(tmp_path)


def test_non_image_file(tmp_path, loaded):
  path = tmp_path / "notes.png"
  path.write_text("not an image")
  with pytest.raises(FileFormatError, match=r"notes\.png: not an image file"):
    preprocess_file(path, loaded[1])
