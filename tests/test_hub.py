"""Weights by hub id (monoformer_jax/hub.py) with no network: a folder laid out
as the Hugging Face hub cache (`hub/models--ORG--NAME/{refs/main,
snapshots/REV/...}`) made from the test fixtures, read through
huggingface_hub itself with HF_HUB_OFFLINE=1 (tests/conftest.py sets it for
every test) and HF_HOME pointing at it; and the tokenizer and VAE a conversion
records, so that sampling needs neither flag."""

import os
import pathlib
import shutil
import subprocess
import sys

import chex
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from helpers import hub_repo

from monoformer_jax import hub
from monoformer_jax.checkpoints import load_config, load_params
from monoformer_jax.convert import official
from monoformer_jax.errors import ConfigError, MissingPathError, PathError
from monoformer_jax.text.tokenizer import load_tokenizer, tokenizer_of

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_VAE = REPO / "tests" / "fixtures" / "tiny_vae"
TINY_LLAMA = REPO / "tests" / "fixtures" / "tiny_llama"


def _character_tokenizer(path: pathlib.Path) -> pathlib.Path:
  """A tokenizer.json of 256 ids (Llama's <unk> <s> </s>, then one per
  character): the official fixture's vocabulary (260) with the 4 added."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {chr(i): i - 29 for i in range(32, 285)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
  tok.decoder = decoders.Fuse()
  path.mkdir()
  tok.save(str(path / "tokenizer.json"))
  return path / "tokenizer.json"


@pytest.fixture
def hub_home(tmp_path, fixture_dir, monkeypatch):
  """HF_HOME holding ORG/MONO (the official fixture), ORG/VAE (the tiny VAE),
  ORG/TOK (a tokenizer that fits it) and ORG/LLAMA (the tiny Llama), this
  process's huggingface_hub pointed at it."""
  from huggingface_hub import constants

  home = tmp_path / "hf_home"
  official_files = [fixture_dir / "config.json", fixture_dir / "weights.safetensors"]
  hub_repo(home, "ORG/MONO", official_files)
  hub_repo(home, "ORG/MONO", official_files, under="ema")  # as the release: root and ema/
  hub_repo(home, "ORG/TOK", [_character_tokenizer(tmp_path / "tok")])
  hub_repo(home, "ORG/VAE", sorted(TINY_VAE.glob("*.*")))
  hub_repo(home, "ORG/LLAMA", sorted(TINY_LLAMA.glob("*.*")))
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
  assert constants.HF_HUB_OFFLINE  # tests/conftest.py: no test reaches the network
  return home


def _convert_cli(*argv, **flag_values):
  from monoformer_jax.convert.__main__ import main

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**flag_values):
    main(["convert", *argv])


def test_what_reads_as_a_hub_id(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "local" / "model").mkdir(parents=True)
  assert hub.is_hub_id("MonoFormer/MonoFormer_ImageNet_256")
  assert hub.is_hub_id("stabilityai/sd-vae-ft-mse@main")
  for spec in ("local/model", "./a/b", "/a/b", "gs://bucket/vae", "a/b/c", "bytes", "a", ""):
    assert not hub.is_hub_id(spec), spec
  # the path a converted config keeps: usable from any folder
  assert hub.recorded("local/model") == str(tmp_path / "local" / "model")
  assert hub.recorded("ORG/VAE") == "ORG/VAE" and hub.recorded("gs://b/v") == "gs://b/v"
  assert hub.local_path("local/model", "--vae", "vae") == "local/model"  # no look-up


@pytest.mark.timeout(240)
def test_hub_ids_convert_offline_and_sample_with_no_flags(hub_home, fixture_dir, tmp_path):
  # the CLI in its own process, HF_HOME and HF_HUB_OFFLINE as a user sets them
  env = dict(os.environ, HF_HOME=str(hub_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
  env.pop("HF_HUB_CACHE", None)
  ckpt = tmp_path / "ckpt"
  run = subprocess.run(
    [sys.executable, "-m", "monoformer_jax.convert", "official", "--input=ORG/MONO",
     f"--output={ckpt}", "--vae=ORG/VAE", "--tokenizer=ORG/TOK"],
    env=env, capture_output=True, text=True, timeout=200,
  )  # fmt: skip
  assert run.returncode == 0, run.stderr[-3000:]
  # the same model as the local folder's conversion, EMA weights included
  local = tmp_path / "local_copy"
  shutil.copytree(hub.local_path("ORG/MONO", "--input", "official"), local)
  official.convert_official(str(local), str(tmp_path / "local"))
  for weights in ("raw", "ema"):
    chex.assert_trees_all_equal(
      load_params(str(ckpt), weights=weights)[0],
      load_params(str(tmp_path / "local"), weights=weights)[0],
    )
  config, _ = load_config(str(ckpt))
  assert (config.vae.path, config.data.tokenizer) == ("ORG/VAE", "ORG/TOK")
  assert not load_config(str(tmp_path / "local"))[0].vae.path  # the base config's: none

  # sampling the converted model: tokenizer and VAE from the recorded hub ids, no flag
  out = tmp_path / "samples"
  run = subprocess.run(
    [sys.executable, "-m", "monoformer_jax.sample", "images", f"--checkpoint={ckpt}",
     "--class_name=goldfish", "--num_samples=1", "--num_steps=2", f"--output_dir={out}"],
    env=env, capture_output=True, text=True, timeout=200,
  )  # fmt: skip
  assert run.returncode == 0, run.stderr[-3000:]
  images = np.load(out / "images.npz")["images"]
  # 8x8 latents through the tiny VAE (two blocks: x2): 16x16 RGB pixels in [0, 1]
  assert images.shape == (1, 16, 16, 3) and 0 <= images.min() and images.max() <= 1


def test_an_id_not_in_the_cache_offline_fails_in_one_line(hub_home, tmp_path):
  with pytest.raises(MissingPathError) as e:
    _convert_cli("official", input="ORG/MISSING", output=str(tmp_path / "never"))
  assert str(e.value) == (
    f"--input='ORG/MISSING' is no local path and, as a hub id, is not in the hub cache "
    f"({hub_home / 'hub'}) and the hub cannot be reached (HF_HUB_OFFLINE='1'): download it "
    "once online, point HF_HOME at a cache that holds it, or pass a local folder"
  )
  assert not (tmp_path / "never").exists()


def test_llama_by_hub_id_records_its_own_tokenizer(hub_home, tmp_path):
  _convert_cli("llama", input="ORG/LLAMA", output=str(tmp_path / "start"))
  config, _ = load_config(str(tmp_path / "start"))
  assert config.data.tokenizer == "ORG/LLAMA"  # as --input named it, resolved on load
  text = "a tiny llama reads this"
  assert tokenizer_of(config).encode(text) == load_tokenizer(str(TINY_LLAMA)).encode(text)
  chex.assert_trees_all_equal(
    load_params(str(tmp_path / "start"), weights="raw")[0],
    load_params(str(_local_llama(tmp_path)), weights="raw")[0],
  )


def _local_llama(tmp_path):
  from monoformer_jax.convert.llama import convert_llama

  convert_llama(str(TINY_LLAMA), str(tmp_path / "local"))
  return tmp_path / "local"


def test_assets_are_checked_before_the_weights_are_read(hub_home, fixture_dir, tmp_path):
  out = tmp_path / "out"
  # TinyLlama-style ids (324) do not fit the fixture's vocabulary (260)
  with pytest.raises(ConfigError, match=r"has 324 ids but config.model.vocab_size=260"):
    _convert_cli("official", input="ORG/MONO", output=str(out), tokenizer="ORG/LLAMA")
  with pytest.raises(
    MissingPathError, match=r"no tokenizer.model or tokenizer.json in the hub repo"
  ):
    _convert_cli("official", input="ORG/MONO", output=str(out), tokenizer="ORG/VAE")
  with pytest.raises(MissingPathError, match=r"VAE='ORG/NOVAE' is no local path"):
    _convert_cli("official", input=str(fixture_dir), output=str(out), vae="ORG/NOVAE")
  assert not out.exists() or not any(out.iterdir())  # nothing written
  with pytest.raises(Exception, match=r"to-official takes no --vae"):
    _convert_cli("to-official", input=str(fixture_dir), output=str(out), vae=str(TINY_VAE))


def _error(cls, message):
  """An instance of huggingface_hub's error `cls` without an HTTP response
  (their __init__ wants one of the client the library happens to use)."""
  e = cls.__new__(cls)
  Exception.__init__(e, message)
  return e


@pytest.mark.parametrize(
  "name, error, message",
  [
    ("GatedRepoError", PathError, "is a gated repo: accept its terms on "
     "https://huggingface.co/ORG/REPO and log in on this machine (`hf auth login`, or set "
     "HF_TOKEN)"),
    ("RepositoryNotFoundError", MissingPathError, "names no hub repo 'ORG/REPO' (or a private "
     "one: set HF_TOKEN); check the spelling, or pass a local folder"),
    ("RevisionNotFoundError", MissingPathError, "names a revision 'v9' that ORG/REPO does not "
     "have; pass a branch, tag or commit of it"),
    ("HfHubHTTPError", PathError, "could not be downloaded (HfHubHTTPError: 500 on the "
     "server); retry, or pass a local folder"),
  ],
)  # fmt: skip
def test_each_hub_failure_is_one_line_naming_the_fix(monkeypatch, name, error, message):
  import huggingface_hub
  from huggingface_hub import errors

  def fails(repo, **kwargs):
    assert repo == "ORG/REPO" and kwargs["revision"] == "v9"
    assert kwargs["allow_patterns"] == ["config.json", "model.safetensors"]  # KINDS["clip"]
    raise _error(getattr(errors, name), "500 on the server")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fails)
  with pytest.raises(error) as e:
    hub.local_path("ORG/REPO@v9", "--clip", "clip")
  assert type(e.value) is error
  assert str(e.value) == "--clip='ORG/REPO@v9' is no local path and, as a hub id, " + message
  assert "\n" not in str(e.value)


def test_a_repo_without_the_files_read_here_is_refused(hub_home):
  hub_repo(hub_home, "ORG/EMPTY", [])  # e.g. a release of PyTorch .bin files only
  with pytest.raises(MissingPathError, match=r"the hub repo ORG/EMPTY holds none of the files"):
    hub.local_path("ORG/EMPTY", "--input", "official")
