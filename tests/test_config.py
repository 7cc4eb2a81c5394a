"""The config schema (monoformer_jax/config/schema.py): one home for every field."""

import dataclasses
import json

import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from monoformer_jax import cli
from monoformer_jax.config import CONFIGS_DIR, base, complete, config_file, schema
from monoformer_jax.errors import ConfigError, MissingPathError, PathError

CONFIG_FILES = (
  "digits",
  "digits:tiny",
  "imagenet256",
  "imagenet256:tiny",
  "imagenet256:7b",
  "t2i",
  "t2i:tiny",
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


# ------------------------------------------------------ the --config flags

TINY = f"--config={CONFIGS_DIR / 'digits.py'}:tiny"


def _flags(argv):
  """An entry point's flags: --config (ml_collections'), a required --workdir."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  flags.mark_flag_as_required("workdir", flag_values=values)
  return values


def _parse(*args):
  """cli.parse_flags of `args`; returns the parsed flag values."""
  argv = ["prog", *args]
  values = _flags(argv)
  cli.parse_flags(argv, values)
  return values


def _config_file(tmp_path, body: str) -> str:
  path = tmp_path / "my_config.py"
  path.write_text(body)
  return str(path)


def test_config_overrides_that_exist_are_applied_as_ml_collections_does():
  values = _parse(
    TINY, "--workdir=w", "--config.train.num_steps=3", "--config.data.mix={'chat': 1.0}"
  )
  want = config_file("digits:tiny").to_dict()
  want["train"]["num_steps"], want["data"]["mix"] = 3, {"chat": 1.0}
  assert complete(values["config"].value).to_dict() == want


@pytest.mark.parametrize(
  "args, kind, message",
  [
    # the issue's: a misspelt field names the nearest one, on one line
    (
      ["--config.train.num_step=3"],
      ConfigError,
      r"^train.num_step is not a config field \(--config.train.num_step=3\): "
      r"did you mean train.num_steps\?",
    ),
    (
      ["--config.num_steps=3"],
      ConfigError,
      r"^num_steps is not a config field .*did you mean train.num_steps or "
      r"sample.num_steps or evals.num_steps\?",
    ),
    (
      ["--config.train.num_steps=abc"],
      ConfigError,
      r"^flag --config.train.num_steps=abc: invalid literal for int\(\).*; "
      r"train.num_steps takes an integer$",
    ),
    (
      ["--config.model.remat=maybe"],
      ConfigError,
      r"^flag --config.model.remat=maybe: .*; model.remat takes true or false$",
    ),
    (["--config.model.vision=3"], ConfigError, r"model.vision is None in this config"),
    (
      ["--config.train.num_steps.x=3"],
      ConfigError,
      r"train.num_steps takes an integer, it is not a section of fields",
    ),
    (
      ["--config.data.mix.chat=1"],
      ConfigError,
      r"data.mix has no entry 'chat' here \(it has \[\]\); give the whole mapping",
    ),
    (
      ["--workdirr=x"],
      ConfigError,
      r"^Unknown command line flag 'workdirr'. Did you mean: workdir",
    ),
  ],
)
def test_a_bad_override_or_flag_is_one_line_naming_it(args, kind, message):
  with pytest.raises(kind, match=message) as error:
    _parse(TINY, "--workdir=w", *args)
  assert "\n" not in str(error.value)


def test_an_override_without_a_config_file_and_a_missing_flag_are_named():
  with pytest.raises(
    ConfigError, match=r"--config.train.num_steps=3 overrides a field of --config"
  ):
    _parse("--workdir=w", "--config.train.num_steps=3")
  with pytest.raises(ConfigError, match=r"^--workdir is required$"):
    _parse(TINY)


def test_a_config_file_or_variant_that_is_not_there_names_those_that_are(tmp_path):
  nope = CONFIGS_DIR / "nope.py"
  with pytest.raises(MissingPathError, match=f"there is no file {nope} .*{CONFIGS_DIR}/digits.py"):
    _parse(f"--config={nope}", "--workdir=w")
  digits = CONFIGS_DIR / "digits.py"
  with pytest.raises(
    MissingPathError, match=f"no file {digits.with_suffix('')}; did you mean {digits}"
  ):
    _parse(f"--config={digits.with_suffix('')}", "--workdir=w")
  with pytest.raises(
    ConfigError,
    match=f"{digits} has no variant 'nope'; pass one of --config={digits}, --config={digits}:tiny$",
  ):
    _parse(f"--config={digits}:nope", "--workdir=w")
  with pytest.raises(ConfigError, match=r"t2i_chat.py has no variant 'x'"):
    config_file("t2i_chat:x")
  with pytest.raises(PathError, match=f"{tmp_path} is a folder"):
    _parse(f"--config={tmp_path}", "--workdir=w")
  with pytest.raises(ConfigError, match=r"^--config= names no file"):
    _parse("--config=", "--workdir=w")


@pytest.mark.parametrize(
  "body, message",
  [
    ("x = 1\ndef get_config(:\n  pass\n", r"my_config.py, line 2: invalid syntax; fix the file"),
    ("import no_such_module\n", r"my_config.py fails to run at line 1: ModuleNotFoundError"),
    ("x = 1\n", r"my_config.py defines no get_config\(\)"),
    (
      "def get_config():\n  c = 1\n  return c.model\n",
      r"my_config.py's get_config\(\) failed at line 3: AttributeError: 'int' object",
    ),
    ("def get_config():\n  pass\n", r"returned NoneType None, not a config; is its `return`"),
    ("def get_config():\n  return [1]\n", r"returned list \[1\], not a config"),
  ],
)
def test_a_config_file_that_fails_names_the_file_and_line(tmp_path, body, message):
  path = _config_file(tmp_path, body)
  with pytest.raises(ConfigError, match=message) as error:
    _parse(f"--config={path}", "--workdir=w")
  assert str(error.value).startswith(f"--config={path}: ") and "\n" not in str(error.value)


def test_a_partial_config_file_is_read_but_a_field_it_leaves_out_is_not_set(tmp_path):
  path = _config_file(tmp_path, "def get_config():\n  return {'train': {'num_steps': 7}}\n")
  config = _parse(f"--config={path}", "--workdir=w", "--config.train.num_steps=5")["config"].value
  assert complete(config).train.num_steps == 5 and complete(config).data == base().data
  with pytest.raises(
    ConfigError, match=r"data.name=text: data is a section of the config, but this config file's"
  ):
    _parse(f"--config={path}", "--workdir=w", "--config.data.name=text")


def test_a_file_without_variants_refuses_one(tmp_path):
  path = _config_file(
    tmp_path, "from monoformer_jax.config import base\ndef get_config():\n  return base()\n"
  )
  with pytest.raises(
    ConfigError, match=r"has no variants \(its get_config takes none\); drop ':tiny'"
  ):
    _parse(f"--config={path}:tiny", "--workdir=w")
  assert complete(_parse(f"--config={path}", "--workdir=w")["config"].value) == base()


def test_describe_does_not_repeat_a_cause_the_message_says():
  try:
    try:
      raise ValueError("invalid literal for int(): 'abc'")
    except ValueError as e:
      raise ConfigError("flag --x=abc: invalid literal for int(): 'abc'") from e
  except ConfigError as e:
    assert cli.describe(e) == "error: flag --x=abc: invalid literal for int(): 'abc'"


def test_an_entry_point_prints_one_line_and_exits_2_and_verbose_raises(capsys):
  argv = ["prog", f"--config={CONFIGS_DIR / 'digits.py'}:nope", "--workdir=w"]
  with pytest.raises(SystemExit) as exited:
    cli._parse_flags_or_fail(argv, _flags(argv))
  assert exited.value.code == 2
  assert capsys.readouterr().err.splitlines() == [
    f"error: {argv[1]}: {CONFIGS_DIR / 'digits.py'} has no variant 'nope'; pass one of "
    f"--config={CONFIGS_DIR / 'digits.py'}, --config={CONFIGS_DIR / 'digits.py'}:tiny",
    "(--verbose shows the traceback)",
  ]
  for verbose in ("--verbose", "-verbose=true"):
    with pytest.raises(ConfigError, match="has no variant 'nope'"):
      cli._parse_flags_or_fail([*argv, verbose], _flags([*argv, verbose]))


def test_describe_follows_the_chain_python_would_show():
  """`from None` hides the context (as Python's traceback does); `from e` and
  an error raised while handling another show theirs."""

  def chained(how):
    try:
      try:
        raise KeyError("inner")
      except KeyError as e:
        if how == "none":
          raise ConfigError("outer") from None
        if how == "cause":
          raise ConfigError("outer") from e
        raise ConfigError("outer")  # noqa: B904 (the implicit context is what is tested)
    except ConfigError as e:
      return cli.describe(e)

  assert chained("none") == "error: outer"
  assert chained("cause") == "error: outer\n  because: KeyError: 'inner'"
  assert chained("context") == "error: outer\n  because: KeyError: 'inner'"
