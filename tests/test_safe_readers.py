"""Broken, truncated or fake weight files: one clear FileFormatError each."""

import io
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from monoformer_jax.convert import official
from monoformer_jax.errors import FileFormatError, MissingPathError
from monoformer_jax.safetensors_io import SafetensorsFile, SafetensorsSource, find_files
from monoformer_jax.vae.load import read_tensors, resolve_vae_files

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tensors():
  return {
    "a": np.arange(12, dtype=np.float32).reshape(3, 4),
    "b": np.array([[1, -2], [3, 4]], np.int64),
    "c": np.linspace(-2, 2, 10).astype(ml_dtypes.bfloat16).reshape(2, 5),
    "empty": np.zeros((0, 3), np.float16),
  }


def _good(tmp_path, name="model.safetensors"):
  path = str(tmp_path / name)
  save_file(_tensors(), path, metadata={"format": "np"})
  return path


def _craft(tmp_path, header, data=b"", name="model.safetensors", raw_header=None):
  """A file by hand: 8-byte little-endian size, the header, the data."""
  blob = raw_header if raw_header is not None else json.dumps(header).encode()
  path = str(tmp_path / name)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + data)
  return path


def _raises(path, pattern):
  """FileFormatError whose message starts with `path` and matches `pattern`."""
  return pytest.raises(FileFormatError, match=re.escape(path) + r".*" + pattern)


def test_good_file_reads_back_exactly(tmp_path):
  path = _good(tmp_path)
  f = SafetensorsFile(path)
  assert f.metadata == {"format": "np"}
  assert sorted(f.keys()) == ["a", "b", "c", "empty"]
  for key, want in _tensors().items():
    got = f.view(key)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
  vae = read_tensors(path)
  np.testing.assert_array_equal(vae["c"], _tensors()["c"])
  with SafetensorsSource(path) as source:
    np.testing.assert_array_equal(source.read("c"), _tensors()["c"].astype(np.float32))
    np.testing.assert_array_equal(source.read("a", (slice(1, 2),)), _tensors()["a"][1:2])


def test_npz_renamed_safetensors(tmp_path):
  buf = io.BytesIO()
  np.savez(buf, w=np.ones((4, 4), np.float32))
  path = str(tmp_path / "model.safetensors")
  with open(path, "wb") as f:
    f.write(buf.getvalue())
  with _raises(
    path,
    r"is not a safetensors file: .*header size of \d+ bytes.*zip archive"
    r".*convert it to safetensors.*pass the real \.safetensors file",
  ):
    SafetensorsFile(path)
  with _raises(path, "not a safetensors file"):
    SafetensorsSource(str(tmp_path))  # the folder, through find_files


def test_truncated_in_data(tmp_path):
  path = _good(tmp_path)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 7)
  with _raises(path, rf"is truncated: .*'c'.*expected at least {size} bytes.*found {size - 7}"):
    SafetensorsFile(path)


def test_truncated_in_header(tmp_path):
  path = _good(tmp_path)
  (n,) = struct.unpack("<Q", open(path, "rb").read(8))
  with open(path, "r+b") as f:
    f.truncate(8 + n // 2)
  with _raises(
    path,
    rf"truncated inside its header: expected at least {8 + n} bytes.*"
    rf"found {8 + n // 2}",
  ):
    SafetensorsFile(path)
  with open(path, "r+b") as f:
    f.truncate(5)
  with _raises(path, "truncated: expected at least 8 bytes.*found 5"):
    SafetensorsFile(path)


def test_header_not_json(tmp_path):
  path = _craft(tmp_path, None, raw_header=b'{"a": {"dtype": "F32", ')
  with _raises(path, r"header is not valid JSON \(.* at line 1 column \d+\)"):
    SafetensorsFile(path)
  path = _craft(tmp_path, None, raw_header=b"{\xff\xfe}")
  with _raises(path, "header is not UTF-8"):
    SafetensorsFile(path)


def test_header_json_list(tmp_path):
  path = _craft(tmp_path, [1, 2, 3])
  with _raises(path, "header is a JSON list, expected an object"):
    SafetensorsFile(path)


def test_bad_metadata(tmp_path):
  path = _craft(tmp_path, {"__metadata__": {"step": 3}})
  with _raises(path, "__metadata__.*not an object of strings to strings"):
    SafetensorsFile(path)


def test_unknown_dtype(tmp_path):
  path = _craft(
    tmp_path, {"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0"
  )
  with _raises(path, r"tensor 'w' has dtype 'F8_E4M3'.*known: .*BF16.*F32"):
    SafetensorsFile(path)


def test_missing_field_and_bad_shape(tmp_path):
  path = _craft(tmp_path, {"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4)
  with _raises(path, "tensor 'w': its header entry has no data_offsets"):
    SafetensorsFile(path)
  path = _craft(tmp_path, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4)
  with _raises(path, r"tensor 'w' has shape \[-1\], expected a list of non-negative ints"):
    SafetensorsFile(path)


def test_shape_offsets_mismatch(tmp_path):
  path = _craft(
    tmp_path, {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, b"\0" * 24
  )
  with _raises(
    path,
    r"tensor 'w': data_offsets \[0, 20\] hold 20 bytes, but shape "
    r"\[2, 3\] of F32 needs 24",
  ):
    SafetensorsFile(path)


def test_offsets_past_the_end(tmp_path):
  header = {
    "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    "w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
  }
  path = _craft(tmp_path, header, b"\0" * 16)
  n = len(json.dumps(header).encode())
  with _raises(
    path,
    rf"1 tensor\(s\) end past its last byte \('w'\).*"
    rf"expected at least {8 + n + 24} bytes.*found {8 + n + 16}",
  ):
    SafetensorsFile(path)
  path = _craft(tmp_path, {"w": {"dtype": "U8", "shape": [0], "data_offsets": [3, 1]}}, b"")
  with _raises(path, r"tensor 'w' has data_offsets \[3, 1\].*0 <= begin <= end"):
    SafetensorsFile(path)


def test_overlapping_tensors(tmp_path):
  header = {
    "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
    "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    "z": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},
  }
  path = _craft(tmp_path, header, b"\0" * 16)
  with _raises(path, r"tensors 'w' \(bytes \[0, 16\]\) and 'v' \(bytes \[8, 16\]\) overlap"):
    SafetensorsFile(path)


def test_duplicate_key(tmp_path):
  entry = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
  path = _craft(tmp_path, None, b"\0", raw_header=f'{{"w": {entry}, "w": {entry}}}'.encode())
  with _raises(path, "key 'w' appears twice"):
    SafetensorsFile(path)


def test_broken_index(tmp_path):
  _good(tmp_path, "model-00001-of-00001.safetensors")
  index = str(tmp_path / "model.safetensors.index.json")
  with open(index, "w") as f:
    f.write('{"weight_map": {"a": "model-00001-of-00001.safetensors",}}')
  with _raises(index, r"is not valid JSON \(.* at line 1 column \d+\)"):
    find_files(str(tmp_path))
  with open(index, "w") as f:
    json.dump(["weight_map"], f)
  with _raises(index, "has no 'weight_map'"):
    find_files(str(tmp_path))


def test_broken_hf_config(tmp_path):
  path = str(tmp_path / "config.json")
  with open(path, "w") as f:
    f.write('{\n  "hidden_size": 64,\n  "num_layers": \n}')
  with _raises(path, r"is not valid JSON \(Expecting value at line 4 column 1\)"):
    official.read_hf_config(str(tmp_path))
  with open(path, "w") as f:
    f.write("[64, 2]")
  with _raises(path, "holds a JSON list, expected an object"):
    official.read_hf_config(str(tmp_path / "weights.safetensors"))
  os.remove(path)
  with pytest.raises(MissingPathError, match="no config.json in"):
    official.read_hf_config(str(tmp_path))


def test_broken_vae_config(tmp_path):
  _good(tmp_path, "diffusion_pytorch_model.safetensors")
  path = str(tmp_path / "config.json")
  with open(path, "w") as f:
    f.write('{"latent_channels": 4')
  with _raises(path, r"is not valid JSON \(.* at line 1 column \d+\)"):
    resolve_vae_files(tmp_path)
  os.remove(path)
  with pytest.raises(MissingPathError, match="VAE config .*config.json not found"):
    resolve_vae_files(tmp_path)


@pytest.mark.slow
def test_convert_cli_truncated_weights(tmp_path, fixture_dir):
  src = tmp_path / "official"
  src.mkdir()
  shutil.copy(fixture_dir / "config.json", src / "config.json")
  weights = src / "weights.safetensors"
  data = (fixture_dir / "weights.safetensors").read_bytes()
  weights.write_bytes(data[: len(data) // 2])
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "monoformer_jax.convert",
      "official",
      f"--input={src}",
      f"--output={out}",
    ],
    capture_output=True,
    text=True,
    cwd=REPO,
    env=env,
    timeout=300,
  )
  assert run.returncode != 0
  assert re.search(
    re.escape(str(weights)) + r" is truncated: .*expected at least "
    rf"{len(data)} bytes.*found {len(data) // 2}",
    run.stderr,
  ), run.stderr[-3000:]
  assert not out.exists() or not any(out.iterdir())
