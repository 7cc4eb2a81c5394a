"""Prepared data in a bucket (conftest's GCS-protocol server on localhost):
ImageNet prepared from a local folder into gs:// equals a local preparation,
a half-written dataset in the bucket is refused in one line, and training's
first batch read from data.dir=gs://... equals the one read from local disk."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from etils import epath
from PIL import Image

from monoformer_jax.config import config_file
from monoformer_jax.data import builders, encode
from monoformer_jax.data.datasets import make_batches, source
from monoformer_jax.data.sources import PrepareArgs
from monoformer_jax.data.sources.imagenet import imagenet_items
from monoformer_jax.errors import ConfigError, MissingPathError
from monoformer_jax.text.tokenizer import tokenizer_of
from monoformer_jax.vae import load_vae

TINY_VAE = pathlib.Path(__file__).resolve().parent / "fixtures" / "tiny_vae"
WNIDS = ("n01440764", "n01443537")


def _prepare(input_dir, output_dir) -> str:
  """What `python -m monoformer_jax.data.prepare imagenet` does, in-process."""
  imagenet = source("imagenet")
  args = PrepareArgs(
    input_dir=str(input_dir), vae=str(TINY_VAE), image_size=16, flip=True, chunk_size=3
  )
  prepared = imagenet.prepare(args, output_dir)
  return imagenet.write(output_dir, prepared.splits, latent_shape=prepared.latent_shape, flip=True)


def _by_key(folder) -> dict:
  records = builders.data_source(folder, "train", kind="imagenet")
  return {r["key"]: r for r in records}


@pytest.fixture(scope="module")
def local_and_bucket(tmp_path_factory, gcs_server):
  """(local dataset folder, gs:// dataset folder, the gs:// --output_dir),
  prepared from the same 5 JPEGs."""
  root = tmp_path_factory.mktemp("imagenet")
  rng = np.random.default_rng(0)
  for wnid, count in zip(WNIDS, (3, 2)):
    (root / "train" / wnid).mkdir(parents=True)
    for k in range(count):
      pixels = rng.integers(0, 256, (20 + 4 * k, 24, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / "train" / wnid / f"{wnid}_{k}.JPEG")
  local = _prepare(root, str(tmp_path_factory.mktemp("prepared")))
  out = f"gs://bucket/prepared-{rng.integers(1 << 30)}"
  return local, _prepare(root, out), out, root


@pytest.mark.timeout(120)
def test_imagenet_prepared_into_a_bucket_equals_a_local_preparation(local_and_bucket):
  local, remote, out, root = local_and_bucket
  assert remote == f"{out}/monoformer_imagenet/1.0.0"
  names = sorted(p.name for p in epath.Path(remote).iterdir())
  assert names == sorted(p.name for p in epath.Path(local).iterdir())
  assert "dataset_info.json" in names and any(".array_record-" in n for n in names)
  # The resumable chunks are in the bucket too: 5 images in chunks of 3.
  work = epath.Path(out) / "_encoded" / "imagenet" / "train"
  assert sorted(p.name for p in work.iterdir()) == [
    "chunk_000000.npz",
    "chunk_000001.npz",
    "encode_manifest.json",
  ]
  ours, theirs = _by_key(local), _by_key(remote)
  assert len(ours) == 5 and sorted(ours) == sorted(theirs)
  for key, record in ours.items():
    for name in ("mean", "std", "mean_flip", "std_flip", "label", "wnid"):
      np.testing.assert_array_equal(record[name], theirs[key][name], err_msg=f"{key} {name}")
  assert builders.dataset_info(remote)["splits"] == builders.dataset_info(local)["splits"]
  # A chunk not there (a host still encoding, or killed before its one upload)
  # is named, never read as fewer records, and a rerun encodes only it again.
  first = (work / "chunk_000000.npz").read_bytes()
  (work / "chunk_000001.npz").unlink()
  with pytest.raises(MissingPathError, match="chunk 1 of 2 .* is not written"):
    list(encode.read_chunks(str(work)))
  items = imagenet_items(root, "train")
  again = encode.encode_items(
    items, load_vae(str(TINY_VAE)), str(work), image_size=16, flip=True, chunk_size=3
  )
  assert (again.chunks_reused, again.chunks_written, again.encoded) == (1, 1, 5)
  assert (work / "chunk_000000.npz").read_bytes() == first  # kept, not redone
  assert [e["key"] for e in encode.read_chunks(str(work))] == [item.key for item in items]
  # Preparing again into the bucket is refused before anything is read.
  with pytest.raises(Exception, match="already holds a prepared imagenet dataset"):
    builders.check_not_prepared(out, "imagenet")


@pytest.mark.timeout(60)
def test_a_half_written_dataset_in_the_bucket_is_refused_in_one_line(local_and_bucket, gcs_path):
  local, *_ = local_and_bucket
  half = epath.Path(gcs_path) / "monoformer_imagenet" / "1.0.0"
  half.mkdir(parents=True, exist_ok=True)
  for path in epath.Path(local).iterdir():  # every file but the marker written last
    if path.name != "dataset_info.json":
      (half / path.name).write_bytes(path.read_bytes())
  with pytest.raises(MissingPathError) as error:
    builders.data_source(str(half), "train", kind="imagenet")
  message = str(error.value)
  assert "\n" not in message and "half-written dataset" in message and str(half) in message
  with pytest.raises(MissingPathError, match=r"'gs://no-such-bucket/d' cannot be listed"):
    builders.data_source("gs://no-such-bucket/d", "train", kind="imagenet")
  config = config_file("imagenet256:tiny")
  config.data.dir = str(half)
  with pytest.raises(ConfigError, match="half-written dataset: 1 shards but no dataset_info"):
    source("imagenet").check(config)


@pytest.mark.timeout(120)
def test_training_reads_its_first_batch_from_the_bucket_as_from_local_disk(
  local_and_bucket, tmp_path, monkeypatch, one_device
):
  local, remote, *_ = local_and_bucket
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the local copy goes
  batches = []
  for folder in (local, remote):
    config = config_file("imagenet256:tiny")
    config.data.dir = folder
    config.mesh.update(data=1, fsdp=-1)
    batches.append(next(make_batches(config, tokenizer_of(config))))
  ours, theirs = batches
  assert ours["latents"].shape == (8, 1, 8, 8, 4) and ours["image_valid"].all()
  assert sorted(ours) == sorted(theirs)
  for name in ours:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
  [copy] = (tmp_path / "monoformer_data").iterdir()  # the bucket's dataset, copied whole
  assert sorted(p.name for p in copy.iterdir()) == sorted(
    p.name for p in pathlib.Path(local).iterdir()
  )


@pytest.mark.timeout(60)
def test_a_dataset_is_uploaded_with_its_completion_marker_last(gcs_path, monkeypatch):
  import tensorflow_datasets as tfds

  uploaded, copy = [], builders.copy_file
  monkeypatch.setattr(
    builders,
    "copy_file",
    lambda source, target: (uploaded.append(epath.Path(target).name), copy(source, target)),
  )
  records = lambda: ({"key": str(i), "x": np.full((3,), i, np.int64)} for i in range(4))
  f = tfds.features
  folder = builders.write(
    "t", gcs_path, {"train": records}, {"key": f.Text(), "x": f.Tensor(shape=(3,), dtype=np.int64)}
  )
  assert uploaded[-1] == "dataset_info.json" and len(uploaded) >= 3  # shards, features, marker
  assert sorted(uploaded) == sorted(p.name for p in epath.Path(folder).iterdir())
  got = {r["key"]: r["x"] for r in builders.data_source(folder, "train")}
  assert {k.decode(): v.tolist() for k, v in got.items()} == {str(i): [i] * 3 for i in range(4)}


# ------------------------------------------------------------- inputs read from a bucket


def _upload_tree(local: pathlib.Path, url: str) -> str:
  """Every file under `local` copied to the same relative name under `url`."""
  for path in sorted(local.rglob("*")):
    if path.is_file():
      epath.Path(url, path.relative_to(local).as_posix()).write_bytes(path.read_bytes())
  return url


class _Requests:
  """Counts the HTTP requests gcsfs makes (every epath / fsspec call to the bucket)."""

  def __init__(self, monkeypatch):
    import gcsfs

    self.calls, call = [], gcsfs.GCSFileSystem._call

    async def counted(fs, method, path, *args, **kwargs):
      self.calls.append((method, path.format(*args) if "{}" in path else path))
      return await call(fs, method, path, *args, **kwargs)

    monkeypatch.setattr(gcsfs.GCSFileSystem, "_call", counted)


def _records(folder, kind) -> dict:
  records = builders.data_source(folder, "train", kind=kind)
  return {bytes(r["key"]): r for r in map(records.__getitem__, range(len(records)))}


@pytest.mark.timeout(120)
def test_text_to_image_prepared_from_a_bucket_equals_the_local_preparation(
  tmp_path, gcs_path, monkeypatch
):
  from monoformer_jax.data.sources.text_to_image import journeydb_items

  local = tmp_path / "input"
  rng = np.random.default_rng(3)
  lines = []
  for folder in ("000", "001"):
    (local / "imgs" / folder).mkdir(parents=True)
    for k in range(5):
      pixels = rng.integers(0, 256, (18 + 2 * k, 20, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(local / "imgs" / folder / f"{k}.jpg")
      lines.append({"img_path": f"./{folder}/{k}.jpg", "prompt": f"p{folder}{k}", "caption": "c"})
  lines.insert(3, {"img_path": "000/../001/gone.jpg", "prompt": "not there"})
  (local / "anno.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  remote = _upload_tree(local, f"{gcs_path}/input")

  requests = _Requests(monkeypatch)
  items, missing = journeydb_items(f"{remote}/anno.jsonl", f"{remote}/imgs")
  # No request per image (10 of them; epath.exists makes ~5 each): each image
  # folder is listed once, beside a fixed few for the annotations file and root.
  assert not [path for _, path in requests.calls if ".jpg" in path], requests.calls
  assert len(requests.calls) < 20, requests.calls
  assert missing == [f"{remote}/imgs/001/gone.jpg"]
  assert [i.path for i in items][:2] == [f"{remote}/imgs/000/0.jpg", f"{remote}/imgs/000/1.jpg"]
  want_items, want_missing = journeydb_items(local / "anno.jsonl", local / "imgs")
  assert [i.key for i in items] == [i.key for i in want_items] and len(items) == 10
  assert want_missing == [os.path.join(local / "imgs", "000/../001/gone.jpg")]

  t2i = source("text_to_image")
  folders, requests.calls[:] = [], []
  for where in (str(local), remote):
    args = PrepareArgs(
      input_dir=f"{where}/imgs",
      annotations=f"{where}/anno.jsonl",
      vae=str(TINY_VAE),
      image_size=16,
      chunk_size=4,
    )
    out = str(tmp_path / f"out{len(folders)}")
    prepared = t2i.prepare(args, out)
    folders.append(t2i.write(out, prepared.splits, latent_shape=prepared.latent_shape))
    assert "; missing 1: " in " ".join(prepared.report()), prepared.report()
  # Each image is read from the bucket by one request, no checks around it.
  assert len([path for _, path in requests.calls if ".jpg" in path]) == 10, requests.calls
  ours, theirs = (_records(folder, "text_to_image") for folder in folders)
  assert sorted(ours) == sorted(theirs) == sorted(i.key.encode() for i in want_items)
  for key, record in ours.items():
    for name in ("prompt", "caption", "mean", "std"):
      np.testing.assert_array_equal(record[name], theirs[key][name], err_msg=f"{key} {name}")
  # A missing annotations file or image root on the bucket: one line naming it.
  for annotations, root, named in (
    (f"{remote}/none.jsonl", f"{remote}/imgs", f"{remote}/none.jsonl"),
    (f"{remote}/anno.jsonl", f"{remote}/no-imgs", f"{remote}/no-imgs"),
  ):
    with pytest.raises(MissingPathError) as e:
      journeydb_items(annotations, root)
    assert named in str(e.value) and "\n" not in str(e.value)


@pytest.mark.timeout(60)
def test_llava_prepared_from_a_bucket_equals_the_local_preparation(tmp_path, gcs_path, monkeypatch):
  from monoformer_jax.data.sources import llava

  local = tmp_path / "input"
  rng = np.random.default_rng(4)
  turns = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  records = [dict(id="text", conversations=turns("Name a prime?", "Seven."))]
  for folder in ("coco", "gqa"):
    (local / "images" / folder).mkdir(parents=True)
    for k in range(3):
      pixels = rng.integers(0, 256, (12, 10 + k, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(local / "images" / folder / f"{k}.jpg")
      records.append(
        dict(
          id=f"{folder}{k}",
          image=f"{folder}/{k}.jpg",
          conversations=turns("<image>\nWhat is it?", f"Noise {folder} {k}."),
        )
      )
  records.append(dict(id="gone", image="coco/gone.jpg", conversations=turns("<image>?", "No.")))
  # An empty file is no image; stored, its b"" would read as a text-only record.
  (local / "images" / "gqa" / "empty.jpg").write_bytes(b"")
  records.append(dict(id="empty", image="gqa/empty.jpg", conversations=turns("<image>?", "?")))
  (local / "mix.json").write_text(json.dumps(records))
  (local / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  remote = _upload_tree(local, f"{gcs_path}/input")

  requests = _Requests(monkeypatch)
  kept = list(llava.read_llava(f"{remote}/mix.jsonl", f"{remote}/images"))
  assert not [path for _, path in requests.calls if ".jpg" in path], requests.calls
  assert [r["image"] for r in kept] == [None] + [
    f"{remote}/images/{folder}/{k}.jpg" for folder in ("coco", "gqa") for k in range(3)
  ] + [f"{remote}/images/gqa/empty.jpg"]  # there: dropped when its bytes are read
  monkeypatch.undo()

  llava_source, folders = source("llava"), []
  for where, annotations in ((str(local), "mix.json"), (remote, "mix.json"), (remote, "mix.jsonl")):
    args = PrepareArgs(input_dir=f"{where}/images", annotations=f"{where}/{annotations}")
    prepared = llava_source.prepare(args, "unused")
    out = str(tmp_path / f"out{len(folders)}")
    folders.append(llava_source.write(out, prepared.splits))
    place = "record 7" if annotations == "mix.json" else "line 8"
    assert prepared.report() == [
      "llava/train: 9 records: kept 7 (1 text-only), skipped 0 malformed and 2 whose image is "
      f"missing; e.g. {where}/{annotations} {place} (id 'gone'): image 'coco/gone.jpg' is not "
      f"under {where}/images; record 000000008:empty: image "
      f"'{where}/images/gqa/empty.jpg' is empty (0 bytes)"
    ]
  ours, *theirs = (_records(folder, "llava") for folder in folders)
  assert (
    len(ours) == 7
    and ours[b"000000001:coco0"]["image"] == (local / "images" / "coco" / "0.jpg").read_bytes()
  )
  for other in theirs:
    assert sorted(other) == sorted(ours)
    for key, record in ours.items():
      for name in ("conversation", "image"):
        assert bytes(record[name]) == bytes(other[key][name]), (key, name)
  for annotations, root, named in (
    (f"{remote}/none.json", f"{remote}/images", f"{remote}/none.json"),
    (f"{remote}/mix.json", f"{remote}/no-images", f"{remote}/no-images"),
  ):
    with pytest.raises(MissingPathError) as e:
      llava.read_llava(annotations, root)
    assert named in str(e.value) and "\n" not in str(e.value)


_PREPARE_TWICE = """
import json, sys
from absl import flags
from monoformer_jax.data import prepare
from monoformer_jax.errors import UserError
for argv in json.loads(sys.argv[1]):
  flags.FLAGS.unparse_flags()
  try:
    prepare.main(flags.FLAGS(["prepare", *argv]))
    print("done")
  except UserError as e:
    print(f"error: {e}")
"""


@pytest.mark.timeout(60)
def test_prepare_takes_an_input_dir_in_a_bucket_and_names_a_missing_one(tmp_path, gcs_path):
  texts = ["one document", "caf\u00e9 two", "three"]
  (tmp_path / "texts").mkdir()
  (tmp_path / "texts" / "a.jsonl").write_text(
    "".join(json.dumps({"text": t}) + "\n" for t in texts)
  )
  remote = _upload_tree(tmp_path / "texts", f"{gcs_path}/texts")
  out = tmp_path / "out"
  runs = [
    ["text", f"--input_dir={gcs_path}/none", f"--output_dir={out}"],
    ["text", f"--input_dir={remote}", f"--output_dir={out}"],
  ]
  run = subprocess.run(
    [sys.executable, "-c", _PREPARE_TWICE, json.dumps(runs)],
    capture_output=True,
    text=True,
    timeout=55,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert run.returncode == 0, run.stderr[-3000:]
  said = [line for line in run.stdout.splitlines() if line in ("done",) or "error" in line]
  assert said == [f"error: --input_dir='{gcs_path}/none' does not exist", "done"]
  records = builders.data_source(builders.prepared_dir(str(out), "text"), "train", kind="text")
  got = sorted(bytes(records[i]["text"]).decode() for i in range(len(records)))
  assert got == sorted(texts)


@pytest.mark.timeout(60)
def test_the_digits_are_prepared_into_and_read_from_data_dir_in_a_bucket(
  gcs_path, tmp_path, monkeypatch
):
  from monoformer_jax.digits import source as digits

  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the local copy goes
  monkeypatch.chdir(tmp_path)  # where a bucket path taken for a local one would make "gs:"
  # Another host writes the copy while this one prepares it too (a bucket has
  # no lock): this one's write is refused, and it reads the other's copy.
  prepare = digits._prepare_digits
  monkeypatch.setattr(digits, "_prepare_digits", lambda *a: (prepare(*a), prepare(*a)))
  config = config_file("digits:tiny")
  config.data.dir = gcs_path
  assert digits.cache_dir(config) == gcs_path  # probed by writing: a bucket that takes objects
  records = digits.digit_records(config)
  folder = epath.Path(builders.prepared_dir(gcs_path, "digits"))
  assert (folder / "dataset_info.json").exists() and not (tmp_path / "gs:").exists()
  images, labels = digits.load_digit_images()
  assert len(records) == len(labels) == 1797
  got = sorted((int(r["label"]), np.asarray(r["image"]).tobytes()) for r in records)
  assert got == sorted((int(y), x.tobytes()) for x, y in zip(images, labels))
  stamp = (folder / "dataset_info.json").stat().mtime
  assert len(digits.digit_records(config)) == 1797  # reused, not prepared again
  assert (folder / "dataset_info.json").stat().mtime == stamp
