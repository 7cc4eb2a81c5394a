"""The config schema (monoformer_jax/config/schema.py): one home for every field."""

import dataclasses
import json

import ml_collections
import numpy as np
import pytest

from monoformer_jax.config import base, complete, config_file, schema
from monoformer_jax.errors import ConfigError

CONFIG_FILES = (
  "digits",
  "digits:tiny",
  "imagenet256",
  "imagenet256:tiny",
  "imagenet256:7b",
  "t2i_chat",
  "t2i_llava",
)


def test_base_holds_every_field_of_every_section_at_its_default():
  c = base()
  assert set(c.keys()) == set(schema.SECTIONS) | set(schema.TOP_LEVEL)
  for name, section in schema.SECTIONS.items():
    declared = {f.name for f in dataclasses.fields(section)}
    assert set(c[name].keys()) == declared, name
    for f in dataclasses.fields(section):
      default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
      value = c[name][f.name]
      if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
      assert value == default, f"{name}.{f.name}"
  assert c.seed == 0 and c.sharding_rules == schema.SHARDING_RULES


def test_base_refuses_a_field_the_schema_does_not_have():
  with pytest.raises(AttributeError, match="hiden_size"):
    base().model.hiden_size = 3


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_is_complete_and_passes_its_checks(name):
  c = config_file(name)
  assert complete(c).to_dict() == c.to_dict()  # completing a complete config changes nothing


def test_the_papers_config_is_the_schemas_defaults():
  assert config_file("imagenet256").to_dict() == base().to_dict()


def test_a_missing_field_or_section_takes_its_default_as_an_old_checkpoint_needs():
  saved = config_file("digits").to_dict()
  del saved["model"]["read_bidirectional"], saved["model"]["scan_unroll"], saved["vae"]
  del saved["data"]["max_read_images_per_row"]
  c = complete(saved)
  assert c.model.read_bidirectional is False and c.model.scan_unroll == 1
  assert c.vae.path == "" and c.data.max_read_images_per_row == 0
  assert c.model.hidden_size == 128  # what was saved is kept


@pytest.mark.parametrize(
  "where, key, hint",
  [
    ("model", "hiden_size", "did you mean model.hidden_size"),
    ("data", "batchsize", "did you mean data.batch_size"),
    (None, "optimizer", "did you mean optim"),
  ],
)
def test_an_unknown_field_is_refused_naming_the_nearest_one(where, key, hint):
  raw = config_file("digits:tiny").to_dict()
  (raw[where] if where else raw)[key] = 1
  with pytest.raises(ConfigError, match=f"{key} is not a config field .*: {hint}\\?"):
    complete(raw)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("model.dtype", "float64", r"model.dtype='float64': must be one of \('float32', "),
    ("model.vision_encoder", "siglip", r"model.vision_encoder='siglip': must be one of"),
    ("model.remat", 1, r"model.remat=1: must be True or False"),
    ("model.num_layers", 2.0, r"model.num_layers=2.0: must be an integer"),
    ("data.tokenizer", None, r"data.tokenizer=None: must be a string"),
    (
      "sample.text_prompts",
      "two plus",
      r"sample.text_prompts='two plus': must be a list of "
      r"strings",
    ),
    ("mesh.tensor", 0, r"mesh.tensor=0: must be >= 1, or -1"),
    ("loss.w_diff", 0.0, r"loss.w_diff=0.0: and loss.w_lm are both 0"),
  ],
)
def test_field_checks_name_the_field_the_value_and_what_is_allowed(field, value, message):
  raw = config_file("digits:tiny").to_dict()
  section, name = field.split(".")
  raw[section][name] = value
  if field == "loss.w_diff":
    raw["loss"]["w_lm"] = 0.0
  with pytest.raises(ConfigError, match=message):
    complete(raw)


def test_a_clip_reader_needs_the_towers_sizes():
  raw = config_file("digits:tiny").to_dict()
  raw["model"]["vision_encoder"] = "clip"
  with pytest.raises(
    ConfigError,
    match=r"model.vision=None: is needed by "
    r"model.vision_encoder='clip'",
  ):
    complete(raw)


def test_ints_become_floats_where_a_float_is_declared_and_json_round_trips():
  raw = config_file("digits:tiny").to_dict()
  raw["optim"]["lr"] = 1  # as `--config.optim.lr=1` or a JSON file gives it
  c = complete(raw)
  assert isinstance(c.optim.lr, float) and c.optim.lr == 1.0
  again = complete(json.loads(c.to_json()))  # what a checkpoint's config item holds
  assert again.to_dict() == c.to_dict()


def test_a_section_alone_is_completed_for_functions_that_take_only_it():
  mesh = schema.section("mesh", dict(data=2, fsdp=4))
  assert (mesh.data, mesh.fsdp, mesh.tensor, mesh.dcn_data) == (2, 4, 1, 1)
  with pytest.raises(ConfigError, match=r"mesh=\{.*\}: may have at most one axis of -1"):
    schema.section("mesh", dict(data=-1, fsdp=-1))


def test_complete_leaves_its_argument_alone():
  c = ml_collections.ConfigDict(config_file("digits:tiny").to_dict())
  del c["vae"]
  complete(c)
  assert "vae" not in c


def test_a_checkpoint_saved_before_fields_existed_loads_with_their_defaults(tmp_path):
  import jax

  from monoformer_jax.checkpoints import load_config, load_model, save_model
  from monoformer_jax.model.build import init_params

  config = config_file("digits:tiny")
  params = jax.jit(lambda: init_params(config.model, seed=0))()
  old = config.to_dict()  # as a version before these fields wrote it
  del old["model"]["read_bidirectional"], old["model"]["scan_unroll"], old["vae"]
  del old["data"]["edit_fraction"]
  save_model(tmp_path / "old", ml_collections.ConfigDict(old), params)
  saved, _ = load_config(str(tmp_path / "old"))
  assert saved.model.read_bidirectional is False and saved.model.scan_unroll == 1
  assert saved.vae.path == "" and saved.data.edit_fraction == 0.0
  model, loaded = load_model(str(tmp_path / "old"), weights="raw")
  assert loaded.to_dict() == saved.to_dict()
  np.testing.assert_array_equal(
    np.asarray(model.lm_head.get_value()), np.asarray(params["lm_head"])
  )


def test_a_checkpoint_from_a_newer_version_is_refused_not_moved_aside(tmp_path):
  import jax

  from monoformer_jax.checkpoints import load_model, save_model
  from monoformer_jax.model.build import init_params

  config = config_file("digits:tiny")
  params = jax.jit(lambda: init_params(config.model, seed=0))()
  newer = config.to_dict()
  newer["model"]["rope_scaling"] = 2.0  # a field this version does not know
  save_model(tmp_path / "newer", ml_collections.ConfigDict(newer), params)
  with pytest.raises(
    ConfigError,
    match=r"model.rope_scaling is not a config field \(the "
    r"config saved with .*newer/0\)",
  ):
    load_model(str(tmp_path / "newer"), weights="raw")
  assert (tmp_path / "newer" / "0").is_dir()
