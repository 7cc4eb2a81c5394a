"""Weights shipped as PyTorch files (`pytorch_model.bin`, its shards and index,
`diffusion_pytorch_model.bin`, one .pt/.pth), read without torch
(monoformer_jax/torch_files.py through safetensors_io.open_weights): each
fixture re-saved with torch.save loads to the same bits as its safetensors,
for the official converter, the Llama converter, the VAE and CLIP; by hub id
too; and a file that is no state dict is one line naming it."""

import json
import pathlib
import pickle
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import hub_repo

from monoformer_jax import hub
from monoformer_jax.convert import llama, official, verify
from monoformer_jax.errors import FileFormatError
from monoformer_jax.model.clip import load_clip_params
from monoformer_jax.safetensors_io import TORCH, find_weights, open_weights
from monoformer_jax.vae.load import load_vae

torch = pytest.importorskip("torch")

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


def _torch_tensor(array: np.ndarray):
  if array.dtype.name == "bfloat16":  # numpy has no bfloat16: through its bits
    return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(np.array(array))


def _save_torch(safetensors_folder, out, shards: int = 1, name: str = "pytorch_model"):
  """`out`: the folder's json files, its tensors re-saved with torch.save as
  `name`.bin, or as `shards` files listed by `name`.bin.index.json."""
  out.mkdir(parents=True)
  for f in pathlib.Path(safetensors_folder).glob("*.json"):
    if not f.name.endswith(".index.json"):
      shutil.copyfile(f, out / f.name)
  with open_weights(str(safetensors_folder)) as source:
    tensors = {k: _torch_tensor(source.view(k)) for k in source.keys()}
  if shards == 1:
    torch.save(tensors, out / f"{name}.bin")
    return out
  keys, weight_map = list(tensors), {}
  for i in range(shards):
    file = f"{name}-{i + 1:05d}-of-{shards:05d}.bin"
    part = keys[i::shards]
    torch.save({k: tensors[k] for k in part}, out / file)
    weight_map.update(dict.fromkeys(part, file))
  (out / f"{name}.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return out


@pytest.fixture(scope="module")
def torch_folders(tmp_path_factory, fixture_dir):
  """The four fixtures as PyTorch folders; the official one in 2 shards."""
  root = tmp_path_factory.mktemp("torch_weights")
  return {
    "official": _save_torch(fixture_dir, root / "official", shards=2),
    "llama": _save_torch(FIXTURES / "tiny_llama", root / "llama"),
    "vae": _save_torch(FIXTURES / "tiny_vae", root / "vae", name="diffusion_pytorch_model"),
    "clip": _save_torch(FIXTURES / "tiny_clip", root / "clip"),
  }


@pytest.fixture(scope="module")
def base():
  return verify.fixture_config()


def _same(a, b):
  """Same leaves (params dicts, nnx states) bit for bit."""
  a, b = (dict(jax.tree_util.tree_leaves_with_path(x)) for x in (a, b))
  assert set(a) == set(b) and a
  for k in a:
    x, y = np.asarray(a[k]), np.asarray(b[k])
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k


def test_sources_agree_key_by_key(torch_folders, fixture_dir):
  found = find_weights(str(torch_folders["official"]))
  assert found.layout is TORCH and len(found.files) == 2 and found.index
  for name, theirs in (("official", fixture_dir), ("vae", FIXTURES / "tiny_vae")):
    with open_weights(str(theirs)) as want, open_weights(str(torch_folders[name])) as got:
      assert sorted(got.keys()) == sorted(want.keys())
      for k in want.keys():
        assert got.shape(k) == want.shape(k) and got.dtype(k) == want.dtype(k), k
        assert got.read(k).tobytes() == want.read(k).tobytes(), k
        if len(want.shape(k)) == 2:
          assert np.array_equal(got.read(k, (slice(1, 3),)), want.read(k, (slice(1, 3),)))


def test_official_and_llama_convert_to_the_same_bits(torch_folders, fixture_dir, base):
  got, _ = official.load_official(str(torch_folders["official"]), base)
  want, _ = official.load_official(str(fixture_dir), base)
  _same(got, want)
  got, _ = llama.load_llama(str(torch_folders["llama"]), base, seed=0)
  want, _ = llama.load_llama(str(FIXTURES / "tiny_llama"), base, seed=0)
  _same(got, want)


def test_vae_and_clip_load_the_same_bits(torch_folders):
  got, want = load_vae(torch_folders["vae"]), load_vae(FIXTURES / "tiny_vae")
  _same(nnx.state(got), nnx.state(want))
  single = torch_folders["vae"] / "diffusion_pytorch_model.bin"  # the file, config beside it
  _same(nnx.state(load_vae(single)), nnx.state(want))
  (got, got_cfg), (want, want_cfg) = (
    load_clip_params(torch_folders["clip"]),
    load_clip_params(FIXTURES / "tiny_clip"),
  )
  assert got_cfg == want_cfg
  _same(got, want)


def test_hub_repo_of_torch_files_only(torch_folders, fixture_dir, base, tmp_path, monkeypatch):
  """A repo of .bin files (offline cache) gets a second look for them; one
  holding safetensors too (the SD-VAE's) never downloads its .bin."""
  import huggingface_hub
  from huggingface_hub import constants

  home = tmp_path / "hf_home"
  hub_repo(home, "ORG/MONOBIN", sorted(torch_folders["official"].iterdir()))
  hub_repo(
    home, "ORG/VAE", sorted([*FIXTURES.glob("tiny_vae/*.*"), *torch_folders["vae"].glob("*.bin")])
  )
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
  calls, download = [], huggingface_hub.snapshot_download

  def counted(repo, **kwargs):
    calls.append((repo, kwargs["allow_patterns"]))
    return download(repo, **kwargs)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", counted)
  folder = hub.local_path("ORG/MONOBIN", "--input", "official")
  assert [c[1] for c in calls] == [list(hub.KINDS["official"]), list(hub.TORCH_KINDS["official"])]
  got, _ = official.load_official(folder, base)
  want, _ = official.load_official(str(fixture_dir), base)
  _same(got, want)
  calls.clear()
  assert load_vae("ORG/VAE") is not None and calls == [("ORG/VAE", list(hub.KINDS["vae"]))]


def test_torch_is_never_imported(torch_folders, tmp_path):
  """A process of its own reads the PyTorch folder with torch never imported."""
  code = (
    "import sys\n"
    "from monoformer_jax.convert import official\n"
    "from monoformer_jax.safetensors_io import open_weights\n"
    f"with open_weights({str(torch_folders['official'])!r}) as s:\n"
    "  [s.read(k) for k in s.keys()]\n"
    "assert 'torch' not in sys.modules, 'torch was imported'\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


class _Evil:
  def __reduce__(self):
    return (print, ("ran",))


def test_bad_pytorch_files_are_one_line_naming_the_file(tmp_path):
  folder = tmp_path / "m"
  folder.mkdir()
  text = folder / "pytorch_model.bin"
  text.write_text("not weights\n")
  for bad, message in (
    (text, "is not a PyTorch weights file"),
    (folder, "is not a PyTorch weights file"),
  ):
    with pytest.raises(FileFormatError, match=message) as e:
      open_weights(str(bad))
    assert str(text) in str(e.value) and "\n" not in str(e.value)
  foreign = tmp_path / "foreign.pt"
  foreign.write_bytes(pickle.dumps({"w": _Evil()}, protocol=2))
  with pytest.raises(FileFormatError, match=r"refers to .*print.*could run code") as e:
    open_weights(str(foreign))
  assert str(foreign) in str(e.value) and "\n" not in str(e.value)
  other = tmp_path / "weights.ckpt"
  other.write_bytes(b"x")
  with pytest.raises(FileFormatError, match="not a weights file.*safetensors.*bin") as e:
    open_weights(str(other))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="holds no weights.*pytorch_model.bin"):
    open_weights(str(empty))
