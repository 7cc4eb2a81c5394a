"""The FID Inception (monoformer_jax/eval/inception.py) against pytorch-fid, and
the torch-free .pth reader (monoformer_jax/torch_files.py) against torch.load.

The fixture (tests/fixtures/make_inception_fixture.py) holds pytorch-fid's
state-dict manifest and its features (float64, stored as float32) of six
seeded images on the seeded random weights of tests/inception_weights.py,
which the tests rebuild. Only the tests that write .pth files or call torch's
resize need torch (the `test` extra pins the CPU wheel).
"""

import json
import os
import pathlib
import pickle
import zipfile

import jax
import numpy as np
import pytest
from inception_weights import fingerprint, random_state_dict

from monoformer_jax import torch_files
from monoformer_jax.errors import CheckpointError, FileFormatError, MissingPathError, PathError
from monoformer_jax.eval import inception as inc

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "inception"

# Max error allowed, relative to the largest reference value. float32 rounding
# through the network measures <= 2e-6 of the scale here (torch's own float32
# run is as far from the float64 reference); real mistakes are far above it:
# BatchNorm eps 1e-5 instead of 1e-3 errs by 1e-2 of the scale, the padding
# counted in the average pools by 4e-2, an average pool in Mixed_7c by 3e-1.
RTOL_OF_SCALE = 2e-5


def assert_matches(actual, expected, name):
  assert np.asarray(actual).shape == expected.shape, name
  assert np.asarray(actual).dtype == np.float32, name
  err = float(np.abs(np.asarray(actual, np.float64) - expected).max())
  tol = RTOL_OF_SCALE * float(np.abs(expected).max())
  assert err <= tol, f"{name}: max |error| {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def manifest():
  return json.loads((FIXTURE / "manifest.json").read_text())


@pytest.fixture(scope="module")
def io():
  with np.load(FIXTURE / "io.npz") as f:
    return dict(f)


@pytest.fixture(scope="module")
def state(manifest):
  """The fixture's weights, pytorch-fid's keys and layouts (with the counters)."""
  shapes = {k: shape for k, (shape, _) in manifest["state_dict"].items()}
  state = random_state_dict(shapes, manifest["seed"])
  assert np.allclose(fingerprint(state), manifest["fingerprint"], rtol=1e-12), (
    "numpy draws other random weights than the fixture's: rerun "
    "tests/fixtures/make_inception_fixture.py"
  )
  return state


@pytest.fixture(scope="module")
def model(state):
  # Without the num_batches_tracked counters: the loader must not need them.
  return inc.inception_from_state_dict(
    {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
  )


def test_keys_and_shapes_are_pytorch_fids(manifest):
  theirs = {
    k: tuple(shape)
    for k, (shape, _) in manifest["state_dict"].items()
    if not k.endswith(".num_batches_tracked")
  }
  assert inc.expected_state_dict_shapes() == theirs
  counters = {
    k.rsplit(".", 1)[0] for k in manifest["state_dict"] if k.endswith(".num_batches_tracked")
  }
  assert counters == {k.rsplit(".", 1)[0] for k in theirs if k.endswith(".bn.running_var")}


@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_features_match_pytorch_fid(model, io, kind):
  done = []
  out = inc.inception_features(model, io[f"images_{kind}"], batch_size=2, progress=done.append)
  for name in ("pool", "spatial", "logits"):
    assert_matches(out[name], io[f"{name}_{kind}"], f"{kind} {name}")
  assert done == list(range(2, len(io[f"images_{kind}"]) + 1, 2))


def test_last_batch_is_padded_and_dropped(model, io):
  done = []
  out = inc.inception_features(model, io["images_uint8"][:3], batch_size=2, progress=done.append)
  assert done == [2, 3]
  for name in ("pool", "spatial", "logits"):
    assert_matches(out[name], io[f"{name}_uint8"][:3], name)
  empty = inc.inception_features(model, io["images_uint8"][:0])
  assert {k: v.shape for k, v in empty.items()} == dict(
    pool=(0, 2048), spatial=(0, 2023), logits=(0, 1008)
  )


def test_features_sharded_over_the_mesh(model, io, monkeypatch):
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  network, inputs = inc._network, []
  monkeypatch.setattr(inc, "_network", lambda g, s, x: inputs.append(x) or network(g, s, x))
  with jax.set_mesh(mesh):  # found by inception_features itself
    out = inc.inception_features(model, io["images_uint8"][:3], batch_size=2)
  for name in ("pool", "spatial", "logits"):
    assert_matches(out[name], io[f"{name}_uint8"][:3], name)
  assert [x.shape[0] for x in inputs] == [2, 2]  # 3 images, the last batch padded
  assert all(x.sharding.shard_shape(x.shape)[0] == 1 for x in inputs)  # an image a device


# ------------------------------------------------------------------ .pth files


def _torch_state(torch, state):
  return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory, state):
  """The fixture's weights saved by torch.save in both formats: {format: path}."""
  torch = pytest.importorskip("torch")
  folder = tmp_path_factory.mktemp("inception")
  files = {}
  for fmt in ("zip", "legacy"):
    files[fmt] = folder / f"pt_inception-{fmt}.pth"
    torch.save(_torch_state(torch, state), files[fmt], _use_new_zipfile_serialization=fmt == "zip")
  return files


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_pth_reader_equals_torch_load(tmp_path, fmt):
  torch = pytest.importorskip("torch")
  base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
  tensors = {
    "contiguous": base,
    "transposed": base[1:, 2::3].t(),  # offset 12, strides (3, 10) into base's storage
    "row": base[4],  # offset 40, shares the storage
    "half": torch.randn(3, 4).half()[:, 1:],
    "bfloat16": torch.randn(5).bfloat16(),
    "count": torch.tensor(7),
    "mask": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 3),
    "parameter": torch.nn.Parameter(torch.randn(2, 2)),
  }
  path = tmp_path / "weights.pth"
  torch.save(tensors, path, _use_new_zipfile_serialization=fmt == "zip")
  assert zipfile.is_zipfile(path) == (fmt == "zip")
  expected = torch.load(path, weights_only=True)
  got = torch_files.read_state_dict(path)
  assert list(got) == list(expected)
  for key, tensor in expected.items():
    t = tensor.detach()
    assert got[key].shape == tuple(t.shape), key
    assert got[key].dtype.itemsize == t.element_size(), key
    want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    assert np.array_equal(got[key].astype(want.dtype), want), key
    assert got[key].flags.c_contiguous and got[key].flags.writeable, key


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_inception_file_reads_as_torch_does(inception_files, state, fmt):
  torch = pytest.importorskip("torch")
  got = torch_files.read_state_dict(inception_files[fmt])
  expected = torch.load(inception_files[fmt], weights_only=True)
  assert list(got) == list(expected) == list(state)
  for key, t in expected.items():
    assert got[key].dtype == t.numpy().dtype and np.array_equal(got[key], t.numpy()), key


def test_load_inception_matches_pytorch_fid(inception_files, io):
  loaded = inc.load_inception(inception_files["legacy"])
  out = inc.inception_features(loaded, io["images_uint8"], batch_size=2)
  for name in ("pool", "spatial", "logits"):
    assert_matches(out[name], io[f"{name}_uint8"], name)


@pytest.mark.parametrize(
  "size_in,size_out",
  [
    ((64, 64), (299, 299)),
    ((48, 80), (299, 299)),  # up, as the fixture's images
    ((512, 400), (299, 299)),
    ((300, 301), (299, 299)),  # down: plain 2-tap, no antialias
    ((7, 5), (3, 11)),
    ((299, 299), (299, 299)),
  ],
)
def test_resize_is_torch_bilinear(size_in, size_out):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).uniform(0, 1, (2,) + size_in + (3,)).astype(np.float32)
  expected = (
    torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=size_out, mode="bilinear", align_corners=False
    )
    .permute(0, 2, 3, 1)
    .numpy()
  )
  got = np.asarray(inc.resize_bilinear(x, size_out))
  assert got.shape == expected.shape
  assert np.abs(got - expected).max() <= 1e-6


# ------------------------------------------------------------------ bad inputs


def test_missing_weights_name_the_flag(tmp_path):
  path = tmp_path / "pt_inception.pth"
  with pytest.raises(MissingPathError, match="--inception") as e:
    inc.load_inception(path)
  assert str(path) in str(e.value) and inc.WEIGHTS_FILE in str(e.value)
  with pytest.raises(PathError, match="folder"):
    torch_files.read_state_dict(tmp_path)


def test_files_that_are_not_state_dicts(tmp_path):
  text = tmp_path / "notes.pth"
  text.write_text("not weights\n")
  with pytest.raises(FileFormatError, match="not a PyTorch weights file"):
    torch_files.read_state_dict(text)
  plain = tmp_path / "plain.pth"
  plain.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(FileFormatError, match="magic number"):
    torch_files.read_state_dict(plain)
  archive = tmp_path / "archive.pth"
  with zipfile.ZipFile(archive, "w") as z:
    z.writestr("archive/readme.txt", "hello")
  with pytest.raises(FileFormatError, match="data.pkl"):
    torch_files.read_state_dict(archive)


class _Payload:
  """Unpickling this would create a folder: proof that code ran."""

  def __init__(self, target):
    self.target = str(target)

  def __reduce__(self):
    return (os.makedirs, (self.target,))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, fmt):
  target = tmp_path / "ran"
  payload = pickle.dumps({"weight": _Payload(target)}, protocol=2)
  path = tmp_path / "evil.pth"
  if fmt == "zip":
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/data.pkl", payload)
  else:
    path.write_bytes(payload)
  with pytest.raises(FileFormatError, match="makedirs.*could run code"):
    torch_files.read_state_dict(path)
  assert not target.exists()


def test_wrong_state_dicts_name_the_key_and_the_file(state):
  weights = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
  missing = dict(weights)
  del missing["Mixed_6d.branch1x1.bn.running_var"]
  with pytest.raises(
    CheckpointError, match=r"missing: Mixed_6d\.branch1x1\.bn\.running_var.*pt_inception-2015-12-05"
  ):
    inc.inception_from_state_dict(missing)
  torchvision = dict(weights, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
  with pytest.raises(CheckpointError, match="AuxLogits.*torchvision"):
    inc.inception_from_state_dict(torchvision)
  reshaped = dict(weights, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(
    CheckpointError, match=r"'fc.weight' has shape \(1000, 2048\).*\(1008, 2048\)"
  ):
    inc.inception_from_state_dict(reshaped)


def test_bad_images_name_the_fix(model):
  cases = [
    (np.zeros((2, 32, 32, 1), np.uint8), "np.repeat"),
    (np.zeros((2, 3, 32, 32), np.uint8), "transpose"),
    (np.zeros((32, 32, 3), np.uint8), r"x\[None\]"),
    (np.zeros((2, 32, 32, 3), np.int32), "uint8"),
    (np.full((2, 32, 32, 3), 200.0, np.float32), "x / 255"),
    (np.full((2, 32, 32, 3), -0.9, np.float32), r"\(x \+ 1\) / 2"),
    ([np.zeros((32, 32, 3), np.uint8)], "np.stack"),
  ]
  for images, fix in cases:
    with pytest.raises(FileFormatError, match=fix):
      inc.inception_features(model, images)
