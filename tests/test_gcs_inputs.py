"""The files the project reads, read from a bucket (conftest's `gcs_server`, a
real GCS-protocol server on localhost): the tokenizer, the VAE, CLIP weights,
safetensors (one tensor fetched without the rest), npz samples, PyTorch .pth
weights (a file, and a folder of pytorch_model.bin) and text inputs (JSONL, .txt, a folder of them) each come back from gs:// equal to the local read, and a
missing gs:// file is one error naming it."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from etils import epath
from flax import nnx

from monoformer_jax import paths, safetensors_io, torch_files
from monoformer_jax.config import CONFIGS_DIR
from monoformer_jax.data import chat
from monoformer_jax.data.jsonl import json_objects
from monoformer_jax.errors import FileFormatError, MissingPathError
from monoformer_jax.eval import fid
from monoformer_jax.model.clip import load_clip_params
from monoformer_jax.text.tokenizer import load_tokenizer
from monoformer_jax.vae.load import load_vae

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
TEXTS = ["the cat sat on a mat.", "Hello, World!\n", "caf\u00e9 \u20ac5 \u4e16\u754c", ""]


def _upload(local: pathlib.Path, url: str, names=None) -> str:
  """Copies the file `local`, or the files `names` of the folder `local`, to `url`."""
  if local.is_file():
    epath.Path(url).write_bytes(local.read_bytes())
    return url
  for name in names or sorted(p.name for p in local.iterdir() if p.is_file()):
    epath.Path(url, name).write_bytes((local / name).read_bytes())
  return url


def _one_line(error) -> str:
  text = str(error.value)
  assert "\n" not in text
  return text


@pytest.mark.timeout(60)
def test_tokenizers_from_a_bucket_give_the_local_ids(gcs_path):
  folder = _upload(FIXTURES / "tiny_llama", gcs_path, ["tokenizer.model", "tokenizer.json"])
  for local, remote in (
    (FIXTURES / "tiny_llama", folder),  # a folder: its tokenizer.model
    (FIXTURES / "tiny_llama" / "tokenizer.json", f"{folder}/tokenizer.json"),
  ):
    want, got = load_tokenizer(str(local)), load_tokenizer(remote)
    assert type(got) is type(want) and got.vocab_size == want.vocab_size
    for text in TEXTS:
      ids = got.encode(text)
      assert ids == want.encode(text) and got.decode(ids) == want.decode(ids)
  assert type(load_tokenizer(folder)).__name__ == "SentencePieceTokenizer"
  for name, blob, what in (
    ("junk.model", b"\x00junk", "is not a SentencePiece model"),
    ("junk.json", b'{"model": 1', "is not a Hugging Face tokenizer.json"),
  ):
    epath.Path(folder, name).write_bytes(blob)
    with pytest.raises(FileFormatError) as e:
      load_tokenizer(f"{folder}/{name}")
    assert _one_line(e).startswith(f"{folder}/{name} {what} (")
  with pytest.raises(MissingPathError) as e:
    load_tokenizer(f"{folder}/nope.model")
  assert f"{folder}/nope.model" in _one_line(e)
  with pytest.raises(MissingPathError) as e:
    load_tokenizer(f"{gcs_path}/empty-folder-is-no-folder")
  assert f"{gcs_path}/empty-folder-is-no-folder" in _one_line(e)


def _assert_bit_exact(got: dict, want: dict):
  """The same names in the same order, and each array the same dtype and bits."""
  assert list(got) == list(want) and len(want) > 10
  for key, value in want.items():
    assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key


@pytest.mark.timeout(60)
def test_vae_and_clip_from_a_bucket_are_bit_exact(gcs_path):
  vae_url = _upload(
    FIXTURES / "tiny_vae", f"{gcs_path}/vae", ["config.json", "diffusion_pytorch_model.safetensors"]
  )
  vae_arrays = lambda path: {k: v[...] for k, v in nnx.to_flat_state(nnx.state(load_vae(path)))}
  _assert_bit_exact(vae_arrays(vae_url), vae_arrays(FIXTURES / "tiny_vae"))

  clip_url = _upload(
    FIXTURES / "tiny_clip", f"{gcs_path}/clip", ["config.json", "model.safetensors"]
  )
  (got_params, got_cfg), (want_params, want_cfg) = (
    load_clip_params(clip_url),
    load_clip_params(FIXTURES / "tiny_clip"),
  )
  assert got_cfg == want_cfg
  _assert_bit_exact(
    nnx.traversals.flatten_mapping(got_params), nnx.traversals.flatten_mapping(want_params)
  )

  with pytest.raises(MissingPathError) as e:
    load_vae(f"{gcs_path}/no-vae")
  assert f"{gcs_path}/no-vae" in _one_line(e)
  with pytest.raises(MissingPathError) as e:
    load_clip_params(f"{gcs_path}/no-clip")
  assert f"{gcs_path}/no-clip" in _one_line(e)


@pytest.mark.timeout(60)
def test_one_tensor_of_a_bucket_safetensors_fetches_that_tensor_only(gcs_path, monkeypatch):
  local = FIXTURES / "tiny_llama" / "model.safetensors"
  url = _upload(local, f"{gcs_path}/model.safetensors")
  fetched = []

  def counted(path, start, size):
    data = paths.read_range(path, start, size)
    if path == url:
      fetched.append(len(data))
    return data

  monkeypatch.setattr(safetensors_io, "read_range", counted)
  with (
    safetensors_io.SafetensorsSource(url) as remote,
    safetensors_io.SafetensorsSource(str(local)) as mine,
  ):
    header_bytes = sum(fetched)
    assert remote.keys() == mine.keys() and len(fetched) == 1  # the header: one request
    key = max(mine.keys(), key=lambda k: np.prod(mine.shape(k)))
    got = remote.read(key)
    assert np.array_equal(got, mine.read(key)) and got.dtype == np.float32
    tensor_bytes = fetched[-1]
    entry = remote._where[key].entries[key]
    assert tensor_bytes == entry["data_offsets"][1] - entry["data_offsets"][0]
    size = local.stat().st_size
    assert header_bytes + tensor_bytes < size
    print(f"one tensor: {header_bytes} header + {tensor_bytes} tensor bytes of a {size}-byte file")
    for key in mine.keys():
      assert np.array_equal(remote.read(key), mine.read(key)), key
  # The ranged read itself returns exactly the bytes asked for, at the end too.
  blob = local.read_bytes()
  assert paths.read_range(url, 3, 40) == blob[3:43]
  assert paths.read_range(url, len(blob) - 5, 40) == blob[-5:]
  assert paths.file_size(url) == len(blob)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_samples_from_a_bucket_equal_the_local_read(gcs_path, tmp_path, save):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 5)
  local = tmp_path / "samples.npz"
  save(local, arr_0=images, arr_1=labels)
  url = _upload(local, f"{gcs_path}/samples.npz")
  got_images, got_labels = fid.load_samples_npz(url)
  assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
  assert np.array_equal(fid.load_images_npz(url, expect_resolution=8), images)
  want_images, want_labels = fid.load_samples_npz(local)
  assert np.array_equal(want_images, images) and np.array_equal(want_labels, labels)
  with pytest.raises(MissingPathError) as e:
    fid.load_images_npz(f"{gcs_path}/none.npz")
  assert f"{gcs_path}/none.npz" in _one_line(e)
  epath.Path(gcs_path, "text.npz").write_text("not a zip")  # shorter than a zip's end record
  with pytest.raises(FileFormatError) as e:
    fid.load_images_npz(f"{gcs_path}/text.npz")
  assert _one_line(e) == (
    f"sample images {gcs_path}/text.npz is not an npz file (BadZipFile: File is not a zip "
    "file); give a file written by np.savez"
  )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_pth_weights_from_a_bucket_equal_the_local_read(gcs_path, tmp_path, fmt):
  torch = pytest.importorskip("torch")
  tensors = {
    "conv.weight": torch.randn(4, 3, 3, 3),
    "bn.running_mean": torch.randn(4).half(),
    "fc.bias": torch.arange(7, dtype=torch.float32)[2:],  # an offset view of a storage
  }
  local = tmp_path / "weights.pth"
  torch.save(tensors, local, _use_new_zipfile_serialization=fmt == "zip")
  got = torch_files.read_state_dict(_upload(local, f"{gcs_path}/weights.pth"))
  assert list(got) == list(tensors)
  for key, want in torch_files.read_state_dict(local).items():
    assert got[key].dtype == want.dtype and np.array_equal(got[key], want), key
    assert np.array_equal(got[key], tensors[key].numpy()), key
  # a bucket folder of PyTorch files only, through the one weights source
  _upload(local, f"{gcs_path}/folder/pytorch_model.bin")
  with safetensors_io.open_weights(f"{gcs_path}/folder") as source:
    assert source.keys() == list(tensors) and source.dtype("bn.running_mean") == "F16"
    assert np.array_equal(source.read("fc.bias", (slice(1, 3),)), [3, 4])
  with pytest.raises(MissingPathError) as e:
    torch_files.read_state_dict(f"{gcs_path}/none.pth")
  assert f"{gcs_path}/none.pth" in _one_line(e)
  epath.Path(gcs_path, "text.pth").write_text("not torch")
  with pytest.raises(FileFormatError) as e:
    torch_files.read_state_dict(f"{gcs_path}/text.pth")
  assert _one_line(e).startswith(
    f"PyTorch weights {gcs_path}/text.pth is not a PyTorch weights file (neither a zip archive"
  )


@pytest.mark.timeout(30)
def test_text_inputs_from_a_bucket(gcs_path, tmp_path):
  records = [{"text": "a"}, {"text": "caf\u00e9", "n": 2}]
  (tmp_path / "b.jsonl").write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]))
  (tmp_path / "a.txt").write_text("one\nline\n\nand two\n")
  (tmp_path / ".hidden.txt").write_text("not listed, as glob.glob lists none")
  (tmp_path / "c.csv").write_text("not text input")
  folder = _upload(tmp_path, f"{gcs_path}/texts")
  assert chat.input_files(folder) == [f"{folder}/a.txt", f"{folder}/b.jsonl"]
  assert chat.input_files(tmp_path) == [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
  url = f"{folder}/b.jsonl"
  assert (
    list(json_objects(url))
    == list(json_objects(str(tmp_path / "b.jsonl")))
    == [(1, records[0]), (3, records[1])]
  )
  assert list(chat.read_texts(f"{folder}/a.txt")) == ["one\nline", "and two"]
  assert list(chat.read_texts(url)) == ["a", "caf\u00e9"]
  with pytest.raises(MissingPathError) as e:
    chat.read_texts(f"{folder}/none.jsonl")
  assert f"{folder}/none.jsonl" in _one_line(e)
  with pytest.raises(MissingPathError) as e:
    chat.input_files(f"{gcs_path}/none")
  assert f"{gcs_path}/none" in _one_line(e)


@pytest.mark.timeout(120)
def test_compile_refuses_an_output_in_a_missing_bucket_before_compiling(gcs_server):
  run = subprocess.run(
    [
      sys.executable,
      "-m",
      "monoformer_jax.compile",
      f"--config={CONFIGS_DIR / 'imagenet256.py'}:tiny",
      "--topology=v5p-8",
      "--output=gs://no-such-bucket/plans/tiny.json",
    ],
    capture_output=True,
    text=True,
    timeout=110,
  )
  assert run.returncode == 2, run.stderr
  assert [line for line in run.stderr.splitlines() if line.startswith("error:")] == [
    "error: --output='gs://no-such-bucket/plans/tiny.json': the bucket 'gs://no-such-bucket' "
    "does not exist (or these credentials cannot see it); create it or pass another --output"
  ]
  assert "compiling" not in run.stderr


@pytest.mark.timeout(60)
def test_a_llama_in_a_bucket_converts_as_the_local_one(gcs_path):
  from flax import traverse_util

  from monoformer_jax.convert import llama, verify

  local = FIXTURES / "tiny_llama"
  url = _upload(local, f"{gcs_path}/llama", ["config.json", "model.safetensors"])
  base = verify.fixture_config()
  (got, got_config), (want, want_config) = (
    llama.load_llama(url, base, seed=0),
    llama.load_llama(str(local), base, seed=0),
  )
  assert got_config.model == want_config.model
  flat_got, flat_want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
  assert flat_got.keys() == flat_want.keys() and len(flat_want) > 5
  for key, value in flat_want.items():
    assert np.array_equal(np.asarray(flat_got[key]), np.asarray(value)), key
  with pytest.raises(MissingPathError) as e:
    llama.load_llama(f"{gcs_path}/no-llama", base)  # its config is looked for beside it
  assert _one_line(e).startswith(f"no config.json in {gcs_path}:")


@pytest.mark.timeout(30)
def test_evaluator_files_and_images_on_a_bucket(gcs_path, tmp_path):
  from PIL import Image

  from monoformer_jax.errors import PathError
  from monoformer_jax.eval.image_metrics import InceptionMetrics
  from monoformer_jax.vision.images import UnreadableImage, load_image

  np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
  (tmp_path / "w.pth").write_bytes(b"checked for existence only here")
  folder = _upload(tmp_path, f"{gcs_path}/eval")
  settings = dict(inception=f"{folder}/w.pth", reference=f"{folder}/ref.npz")
  InceptionMetrics.check(["fid"], settings, lambda name: f"--{name}")  # both there: no error
  with pytest.raises(PathError) as e:
    InceptionMetrics.check(
      ["fid"], dict(settings, reference=f"{folder}/none.npz"), lambda name: f"--{name}"
    )
  assert f"--reference='{folder}/none.npz' is not a file" in _one_line(e)

  pixels = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / "a.png")
  url = _upload(tmp_path / "a.png", f"{gcs_path}/a.png")
  got, want = np.asarray(load_image(url)), np.asarray(load_image(tmp_path / "a.png"))
  assert np.array_equal(got, pixels) and np.array_equal(want, pixels)
  with pytest.raises(UnreadableImage) as e:
    load_image(f"{gcs_path}/none.png")
  assert f"{gcs_path}/none.png" in _one_line(e)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("max_shard_bytes", [1 << 20, 200])  # one file; three shards + index
def test_safetensors_written_to_a_bucket_equal_the_local_files(gcs_path, tmp_path, max_shard_bytes):
  rng = np.random.default_rng(2)
  tensors = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(20), "c": np.ones((2, 2))}
  shapes = [(key, value.shape) for key, value in tensors.items()]
  local = tmp_path / "out"
  names = safetensors_io.write_safetensors(
    str(local), shapes, tensors.__getitem__, max_shard_bytes=max_shard_bytes
  )
  assert names == safetensors_io.write_safetensors(
    f"{gcs_path}/out", shapes, tensors.__getitem__, max_shard_bytes=max_shard_bytes
  )
  written = sorted(p.name for p in epath.Path(gcs_path, "out").iterdir())
  assert written == sorted(p.name for p in local.iterdir()) and len(written) in (1, 4)
  for name in written:
    assert epath.Path(gcs_path, "out", name).read_bytes() == (local / name).read_bytes(), name
  with safetensors_io.SafetensorsSource(f"{gcs_path}/out") as source:
    for key, value in tensors.items():
      assert np.array_equal(source.read(key), value.astype(np.float32)), key


@pytest.mark.timeout(30)
def test_commonsense_tasks_from_a_bucket(gcs_path, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  from monoformer_jax.eval import commonsense

  local = FIXTURES / "commonsense"
  for task in sorted(p.name for p in local.iterdir() if p.is_dir()):
    _upload(local / task, f"{gcs_path}/tasks/{task}")
  for name in commonsense.TASKS:
    mine = commonsense.task_files(name, str(local))
    got = commonsense.task_files(name, f"{gcs_path}/tasks")
    assert got == [p.replace(str(local), f"{gcs_path}/tasks") for p in mine]
    for (_, a), (_, b) in zip(
      commonsense.read_examples(got[0]), commonsense.read_examples(mine[0]), strict=True
    ):
      assert a == b
  # Parquet shards, found in order and read through epath.
  rows = [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(5)]
  for k, part in enumerate((rows[:3], rows[3:])):
    pq.write_table(pa.Table.from_pylist(part), tmp_path / f"validation-0000{k}-of-00002.parquet")
  folder = _upload(tmp_path, f"{gcs_path}/shards/piqa")
  found = commonsense.task_files("piqa", f"{gcs_path}/shards")
  assert found == [
    f"{folder}/validation-00000-of-00002.parquet",
    f"{folder}/validation-00001-of-00002.parquet",
  ]
  assert [ex for f in found for _, ex in commonsense.read_examples(f)] == rows
  with pytest.raises(MissingPathError) as e:
    commonsense.task_files("piqa", f"{gcs_path}/none")
  assert f"{gcs_path}/none" in _one_line(e)
