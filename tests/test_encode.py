"""Dataset preparation, image side (monoformer_jax/data/encode.py): crops, readers,
item lists (the imagenet and text_to_image sources') and the resumable, sharded
VAE encoding into chunk files."""

import io
import json
import logging
import os
import pathlib
import tarfile
import threading

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from monoformer_jax.data import encode
from monoformer_jax.data.encode import (
  EncodeReport,
  ImageItem,
  UnreadableImage,
  adm_center_crop,
  chunk_report,
  encode_items,
  read_chunks,
)
from monoformer_jax.data.sources import imagenet as imagenet_source
from monoformer_jax.data.sources.imagenet import imagenet_classes, imagenet_items
from monoformer_jax.data.sources.text_to_image import journeydb_items
from monoformer_jax.errors import (
  ConfigError,
  DoesNotFitError,
  FileFormatError,
  MissingPathError,
  PathError,
)
from monoformer_jax.vae import load_vae
from monoformer_jax.vision.images import load_image

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "tiny_vae"
IMAGE_SIZE = 16  # the tiny VAE halves it: latents 8x8x4
# Three real classes with labels far apart: 0, 151 and 999 of the sorted 1000.
WNIDS = {"n01440764": 0, "n02085620": 151, "n15075141": 999}


def noise(w, h, channels=3, seed=0):
  """A smooth-ish random uint8 image [h, w, channels] (JPEG keeps it recognisable)."""
  rng = np.random.default_rng(seed + 1000 * w + h)
  small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), channels), dtype=np.uint8)
  big = Image.fromarray(small.squeeze(-1) if channels == 1 else small).resize((w, h))
  return np.asarray(big)


def reference_crop(image: Image.Image, size: int) -> np.ndarray:
  """The ADM crop, written independently: index arithmetic on the array for the crop."""
  img = image.convert("RGB")
  while min(*img.size) >= 2 * size:
    img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
  scale = size / min(*img.size)
  img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
  arr = np.array(img)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top : top + size, left : left + size]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
  """input_dir with train/<wnid>/ holding 12 files: varied sizes, CMYK, grayscale,
  a PNG named .JPEG, a truncated JPEG, and a text file that is not an item."""
  root = tmp_path_factory.mktemp("imagenet")
  a, b, c = (root / "train" / w for w in WNIDS)
  for folder in (a, b, c):
    folder.mkdir(parents=True)
  Image.fromarray(noise(600, 400)).save(a / "n01440764_1.JPEG", quality=95)
  Image.fromarray(noise(100, 300)).save(a / "n01440764_2.jpeg")
  Image.fromarray(noise(40, 33)).save(a / "n01440764_3.JPG")
  Image.fromarray(noise(50, 70)).convert("CMYK").save(a / "n01440764_cmyk.JPEG")
  Image.fromarray(noise(64, 48, 1)).save(b / "n02085620_gray.JPEG")
  Image.fromarray(noise(30, 20)).save(b / "n02085620_png.JPEG", format="PNG")
  Image.fromarray(noise(16, 16)).save(b / "n02085620_small.png")
  Image.fromarray(noise(17, 90)).save(b / "n02085620_tall.jpg")
  (b / "README.txt").write_text("not an image")
  Image.fromarray(noise(200, 150)).save(c / "n15075141_1.JPEG")
  whole = c / "whole.bin"
  Image.fromarray(noise(200, 200, seed=5)).save(whole, format="JPEG")
  data = whole.read_bytes()
  (c / "n15075141_cut.JPEG").write_bytes(data[: len(data) // 2])
  whole.unlink()
  Image.fromarray(noise(333, 61)).save(c / "n15075141_wide.JPEG")
  Image.fromarray(noise(23, 23)).save(c / "n15075141_x.jpg")
  return root


@pytest.fixture(scope="module")
def items(imagenet):
  return imagenet_items(imagenet, "train")


@pytest.fixture(scope="module")
def vae():
  return load_vae(FIXTURE)


def truncated(items):
  return [item for item in items if item.key.endswith("_cut.JPEG")]


def readable(items):
  return [item for item in items if not item.key.endswith("_cut.JPEG")]


# --- Crops and readers --------------------------------------------------------------


@pytest.mark.parametrize(
  "w,h,size",
  [
    (600, 400, 64),
    (100, 300, 64),
    (64, 64, 64),
    (1000, 130, 64),
    (257, 129, 64),
    (513, 1031, 32),
    (20, 30, 64),
  ],
)
def test_adm_center_crop_matches_independent_implementation(w, h, size):
  image = Image.fromarray(noise(w, h, seed=w))
  out = adm_center_crop(image, size)
  assert out.mode == "RGB" and out.size == (size, size)
  np.testing.assert_array_equal(np.asarray(out), reference_crop(image, size))


def test_adm_center_crop_converts_to_rgb_and_checks_size():
  gray = Image.fromarray(noise(80, 50, 1))
  out = adm_center_crop(gray, 32)
  assert out.mode == "RGB"
  np.testing.assert_array_equal(np.asarray(out), reference_crop(gray, 32))
  with pytest.raises(ConfigError, match="size=0"):
    adm_center_crop(gray, 0)


def test_prepare_reads_by_content(imagenet):
  """CMYK, grayscale and a PNG named .JPEG read as PIL's convert("RGB") reads
  them, the reference's reader (vision/images.py: the reader's own cases)."""
  folder = imagenet / "train"
  for name in (
    "n01440764/n01440764_cmyk.JPEG",
    "n02085620/n02085620_gray.JPEG",
    "n02085620/n02085620_png.JPEG",
  ):
    image = load_image(folder / name, orient=False).convert("RGB")
    np.testing.assert_array_equal(
      np.asarray(image), np.asarray(Image.open(folder / name).convert("RGB"))
    )
  assert Image.open(folder / "n01440764/n01440764_cmyk.JPEG").mode == "CMYK"
  assert Image.open(folder / "n02085620/n02085620_png.JPEG").format == "PNG"


def test_prepare_reader_raises_unreadable_for_broken_files(imagenet, tmp_path):
  cut = imagenet / "train" / "n15075141" / "n15075141_cut.JPEG"
  Image.open(cut)  # the header is fine: only a full decode finds it
  with pytest.raises(UnreadableImage, match="truncated") as error:
    load_image(cut, orient=False)
  assert error.value.path == str(cut) and isinstance(error.value, FileFormatError)
  (tmp_path / "junk.JPEG").write_bytes(b"not an image at all")
  with pytest.raises(UnreadableImage, match="junk.JPEG: not an image file"):
    load_image(tmp_path / "junk.JPEG", orient=False)
  with pytest.raises(UnreadableImage, match="no such file"):
    load_image(tmp_path / "absent.JPEG", orient=False)


# --- Item lists -------------------------------------------------------------------------


def test_imagenet_classes():
  classes = imagenet_classes()
  wnids = [w for w, _ in classes]
  assert len(classes) == 1000 and len(set(wnids)) == 1000 and wnids == sorted(wnids)
  names = dict(classes)
  assert names["n01440764"] == "tench"
  assert names["n01443537"] == "goldfish"
  assert names["n01484850"] == "great white shark"
  assert names["n02085620"] == "Chihuahua" and names["n15075141"] == "toilet tissue"
  assert all(name and name == name.strip() for name in names.values())


def test_imagenet_items_labels_and_order(items, imagenet):
  assert len(items) == 12  # README.txt is not an image
  assert [item.key for item in items] == sorted(item.key for item in items)
  for item in items:
    wnid = item.key.split("/")[0]
    assert item.fields == {"label": WNIDS[wnid], "wnid": wnid}
    assert item.path == str(imagenet / "train" / item.key)
  assert {item.key for item in items} >= {
    "n01440764/n01440764_3.JPG",
    "n02085620/n02085620_small.png",
  }


def test_imagenet_items_errors_name_the_problem(imagenet, tmp_path):
  with pytest.raises(MissingPathError, match=r"val.*'val'"):
    imagenet_items(imagenet, "val")
  (tmp_path / "train").mkdir()
  with pytest.raises(PathError, match="train is empty"):
    imagenet_items(tmp_path, "train")
  (tmp_path / "train" / "n01440764").mkdir()
  (tmp_path / "train" / "n01440764" / "x.JPEG").write_bytes(b"")
  (tmp_path / "train" / "n99999999").mkdir()
  with pytest.raises(PathError, match=r"'n99999999' is not one of the 1000 known wnids"):
    imagenet_items(tmp_path, "train")
  (tmp_path / "train" / "n99999999").rmdir()
  (tmp_path / "train" / "n01443537").mkdir()
  with pytest.raises(PathError, match="n01443537 has no images"):
    imagenet_items(tmp_path, "train")
  (tmp_path / "train" / "n01443537").rmdir()
  (tmp_path / "train" / "loose.JPEG").write_bytes(b"")
  with pytest.raises(PathError, match="one folder per class"):
    imagenet_items(tmp_path, "train")


def test_journeydb_items(tmp_path):
  images = tmp_path / "imgs"
  (images / "000").mkdir(parents=True)
  Image.fromarray(noise(32, 32)).save(images / "000" / "a.jpg")
  Image.fromarray(noise(32, 48)).save(images / "000" / "b.jpg")
  lines = [
    {"img_path": "./000/a.jpg", "prompt": "a cat", "caption": "A cat."},
    {"img_path": "./000/gone.jpg", "prompt": "lost"},
    {"img_path": "000/b.jpg", "prompt": "a dog", "Task2": {"Caption": "A dog."}},
  ]
  jsonl = tmp_path / "anno.jsonl"
  jsonl.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
  items, missing = journeydb_items(jsonl, images)
  assert [item.key for item in items] == ["000/a.jpg", "000/b.jpg"]
  assert items[0].fields == {"prompt": "a cat", "caption": "A cat."}
  assert items[1].fields == {"prompt": "a dog", "caption": "A dog."}
  assert missing == [os.path.join(images, "./000/gone.jpg")]

  jsonl.write_text(json.dumps(lines[0]) + "\n{oops\n")
  with pytest.raises(FileFormatError, match=r"anno.jsonl, line 2: not JSON"):
    journeydb_items(jsonl, images)
  jsonl.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps({"img_path": "000/b.jpg"}))
  with pytest.raises(FileFormatError, match=r"line 3: 'prompt' is missing"):
    journeydb_items(jsonl, images)
  with pytest.raises(MissingPathError, match="nowhere"):
    journeydb_items(jsonl, tmp_path / "nowhere")


# --- Encoding ---------------------------------------------------------------------------


def direct_encoding(vae, pixels_BxHxWx3):
  """The scaled posterior of uint8 pixels, one device, no sharding: (mean, std)."""
  graphdef, state = nnx.split(vae)
  cpu = jax.local_devices()[0]

  @jax.jit
  def run(state, x):
    posterior = nnx.merge(graphdef, state).encode(x)
    return posterior.mean, posterior.std

  x = jax.device_put(np.asarray(pixels_BxHxWx3, np.float32) / 127.5 - 1.0, cpu)
  mean, std = jax.device_get(run(jax.device_put(state, cpu), x))
  cfg = vae.config
  return (mean - cfg.shift_factor) * cfg.scaling_factor, std * cfg.scaling_factor


@pytest.fixture(scope="module")
def encoded(items, vae, tmp_path_factory):
  out = tmp_path_factory.mktemp("encoded")
  report = encode_items(
    items, vae, out, image_size=IMAGE_SIZE, flip=True, batch_size=8, chunk_size=16, progress=False
  )
  return out, report


def test_encode_items_counts_and_skips(encoded, items):
  out, report = encoded
  assert jax.local_device_count() == 8  # the batch is split over 8 devices
  assert report.encoded == 11 and report.chunks_written == 1 and report.chunks_reused == 0
  [cut] = truncated(items)
  [(path, reason)] = report.skipped
  assert path == cut.path and "truncated" in reason
  summary = report.summary()
  assert summary.startswith("encoded 11 images in 1 chunks (0 reused); skipped 1: ")
  assert "n15075141_cut.JPEG (" in summary
  assert sorted(os.listdir(out)) == ["chunk_000000.npz", "encode_manifest.json"]
  with np.load(out / "chunk_000000.npz") as chunk:
    assert chunk["skipped"].tolist() == [cut.path]
    assert chunk["mean"].shape == (11, 8, 8, 4) and chunk["mean"].dtype == np.float32
    assert chunk["label"].tolist() == [i.fields["label"] for i in readable(items)]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # see test_read_images
def test_prepare_reads_16_bit_and_alpha_and_skips_an_image_past_the_pixel_limit(
  vae, tmp_path, monkeypatch
):
  """encode_items through the one reader (#6, #7 and the 14,000-pixel PNG): a
  16-bit gradient scaled (x/257), a black digit on a transparent background
  composited on white, and an image past Pillow's pixel limit skipped and
  listed with its size, the others encoded as their numpy references."""
  g = np.round(np.linspace(0, 65535, 24 * 20)).reshape(20, 24).astype(np.uint16)
  Image.fromarray(g).save(tmp_path / "deep.png")
  rgba = np.zeros((20, 20, 4), np.uint8)
  rgba[4:16, 8:12, 3] = 255
  Image.fromarray(rgba).save(tmp_path / "digit.png")
  Image.fromarray(noise(40, 30)).save(tmp_path / "big.png")
  names = ("deep", "big", "digit")
  items = [ImageItem(n, str(tmp_path / f"{n}.png"), {"label": i}) for i, n in enumerate(names)]
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x30 is past it, 24x20 is not
  report = encode_items(
    items, vae, tmp_path / "out", image_size=IMAGE_SIZE, batch_size=8, chunk_size=4, progress=False
  )
  assert report.encoded == 2 and [path for path, _ in report.skipped] == [items[1].path]
  assert "big.png (40x30 = 1,200 pixels, past Pillow's limit of 1,000" in report.summary()
  deep = np.stack([np.rint(g / 257.0).astype(np.uint8)] * 3, -1)
  digit = 255 - rgba[..., 3:].repeat(3, -1)  # black on white
  pixels = np.stack([reference_crop(Image.fromarray(x), IMAGE_SIZE) for x in (deep, digit)])
  mean, _ = direct_encoding(vae, pixels)
  examples = list(read_chunks(tmp_path / "out"))
  assert [e["key"] for e in examples] == ["deep", "digit"]
  np.testing.assert_allclose(np.stack([e["mean"] for e in examples]), mean, rtol=1e-5, atol=1e-5)


def test_encoded_latents_equal_direct_encoding(encoded, items, vae):
  out, _ = encoded
  good = readable(items)
  pixels = np.stack([reference_crop(Image.open(i.path), IMAGE_SIZE) for i in good])
  mean, std = direct_encoding(vae, pixels)
  mean_flip, std_flip = direct_encoding(vae, pixels[:, :, ::-1])
  examples = list(read_chunks(out))
  assert [e["key"] for e in examples] == [i.key for i in good]
  assert [(e["label"], e["wnid"]) for e in examples] == [
    (i.fields["label"], i.fields["wnid"]) for i in good
  ]
  got = {
    name: np.stack([e[name] for e in examples]) for name in ("mean", "std", "mean_flip", "std_flip")
  }
  for name, want in (
    ("mean", mean),
    ("std", std),
    ("mean_flip", mean_flip),
    ("std_flip", std_flip),
  ):
    np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-5, err_msg=name)
  assert np.abs(got["mean"] - got["mean_flip"]).max() > 1e-3  # flipping changed something


def test_interrupted_build_resumes_only_missing_chunks(items, vae, encoded, tmp_path, monkeypatch):
  out = tmp_path / "resume"
  real_load, lock, loaded = encode.load_image, threading.Lock(), []
  stop_at = items[4].path  # the first item of chunk 2 (chunk_size=2)

  def spy(path, fail=True, **kwargs):
    with lock:
      loaded.append(str(path))
    if fail and str(path) == stop_at:
      raise RuntimeError("interrupted")
    return real_load(path, **kwargs)

  run = lambda: encode_items(
    items, vae, out, image_size=IMAGE_SIZE, batch_size=3, chunk_size=2, progress=False
  )
  monkeypatch.setattr(encode, "load_image", spy)
  with pytest.raises(RuntimeError, match="interrupted"):
    run()
  assert sorted(os.listdir(out)) == [
    "chunk_000000.npz",
    "chunk_000001.npz",
    "encode_manifest.json",
  ]  # no temporaries left
  partial = chunk_report(out)
  assert partial.missing_chunks == [2, 3, 4, 5] and partial.encoded == 4
  with pytest.raises(MissingPathError, match=r"chunk 2 of 6 .*chunk_000002.npz"):
    list(read_chunks(out))

  monkeypatch.setattr(encode, "load_image", lambda path, **kw: spy(path, fail=False, **kw))
  loaded.clear()
  report = run()
  assert sorted(loaded) == sorted(i.path for i in items[4:])
  assert (report.chunks_reused, report.chunks_written, report.encoded) == (2, 4, 11)

  os.remove(out / "chunk_000003.npz")
  loaded.clear()
  report = run()
  # chunk 3's items, and the file chunk 4 skipped, tried again (still broken: chunk 4 is kept)
  assert sorted(loaded) == sorted([i.path for i in items[6:8]] + [truncated(items)[0].path])
  assert (report.chunks_reused, report.chunks_written) == (5, 1)

  full = chunk_report(out)
  assert (full.encoded, full.chunks_written, full.missing_chunks) == (11, 6, [])
  assert [path for path, _ in full.skipped] == [truncated(items)[0].path]
  examples = list(read_chunks(out))
  assert [e["key"] for e in examples] == [i.key for i in readable(items)]
  reference = list(read_chunks(encoded[0]))  # the one-chunk, batch-8 build
  np.testing.assert_allclose(
    np.stack([e["mean"] for e in examples]),
    np.stack([e["mean"] for e in reference]),
    rtol=1e-5,
    atol=1e-6,
  )
  assert "mean_flip" not in examples[0]


def test_a_split_with_no_readable_image_names_them_and_a_repaired_file_is_encoded(
  vae, tmp_path, caplog
):
  """The issue's `prepare imagenet` where every file is broken: was TFDS's "No
  examples were yielded" with the files unnamed; a rerun after a repair reused
  the chunk that had skipped it."""
  folder = tmp_path / "in" / "train" / "n01440764"
  folder.mkdir(parents=True)
  bad = [folder / f"bad{k}.JPEG" for k in range(3)]
  for k, path in enumerate(bad):
    path.write_bytes(b"not an image %d" % k)
  args = imagenet_source.PrepareArgs(
    input_dir=str(tmp_path / "in"),
    vae=str(FIXTURE),
    image_size=IMAGE_SIZE,
    splits=("train", "vla"),  # a misspelt split is named in a warning
    batch_size=2,
    chunk_size=2,
  )
  out = tmp_path / "out"
  listed = out / "_encoded" / "imagenet" / "train" / "skipped.tsv"
  with pytest.raises(FileFormatError) as error:
    imagenet_source.SOURCE.prepare(args, str(out))
  message = str(error.value)
  unread = "not an image file Pillow reads (UnidentifiedImageError)"
  assert message.startswith(
    f"imagenet/train: none of its 3 images could be read, e.g. {bad[0]} ({unread}), "
    f"{bad[1]} ({unread}), {bad[2]} "
  )
  assert f"; all of them listed in {listed}; " in message and "\n" not in message
  rows = [row.split("\t") for row in listed.read_text().splitlines()]
  assert rows[0] == ["path", "reason"] and [r[0] for r in rows[1:]] == list(map(str, bad))
  assert all(r[1] == unread for r in rows[1:])
  assert not (out / "monoformer_imagenet").exists()  # no dataset, finished or not

  Image.fromarray(noise(24, 20)).save(bad[1], format="JPEG")  # repaired: chunk 0 again
  with caplog.at_level(logging.WARNING):
    prepared = imagenet_source.SOURCE.prepare(args, str(out))
  assert f"imagenet: no split folder ['vla'] under {tmp_path / 'in'}; preparing ['train'] only" in (
    caplog.text
  )
  [line] = prepared.report()
  assert line.startswith("imagenet/train: encoded 1 images in 2 chunks (1 reused); skipped 2: ")
  assert line.endswith(f"; all of them listed in {listed}")
  assert [row.split("\t")[0] for row in listed.read_text().splitlines()[1:]] == [
    str(bad[0]),
    str(bad[2]),
  ]
  [record] = list(prepared.splits["train"]())
  assert record["key"] == "n01440764/bad1.JPEG" and record["label"] == 0
  mean, std = direct_encoding(vae, reference_crop(Image.open(bad[1]), IMAGE_SIZE)[None])
  np.testing.assert_allclose(record["mean"], mean[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(record["std"], std[0], rtol=1e-5, atol=1e-5)


def test_a_batch_too_large_for_the_devices_is_one_line_and_keeps_the_chunks(
  items, vae, tmp_path, monkeypatch
):
  """An out-of-memory encoder (what --batch_size=4096 gives on a chip) was a raw
  JaxRuntimeError traceback."""
  make_encoder, calls = encode._make_encoder, []

  def after_one_batch(vae, flip):
    run, n_devices = make_encoder(vae, flip)

    def encode_or_run_out(pixels_BxHxWx3):
      calls.append(len(pixels_BxHxWx3))
      if len(calls) > 1:
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 9 bytes.")
      return run(pixels_BxHxWx3)

    return encode_or_run_out, n_devices

  monkeypatch.setattr(encode, "_make_encoder", after_one_batch)
  with pytest.raises(
    DoesNotFitError,
    match=r"^encoding 8 images of 16x16 at once does not fit the memory of 8 cpu devices; lower "
    r"--batch_size \(now 8\) and run again: the 1 chunks written so far are kept$",
  ):
    encode_items(items, vae, tmp_path, image_size=IMAGE_SIZE, batch_size=8, chunk_size=4)
  assert sorted(os.listdir(tmp_path)) == ["chunk_000000.npz", "encode_manifest.json"]
  with np.load(tmp_path / "chunk_000000.npz") as chunk:
    assert chunk["keys"].tolist() == [i.key for i in items[:4]] and len(chunk["mean"]) == 4


def test_encode_items_refuses_a_folder_of_another_encoding(items, vae, encoded):
  out, _ = encoded
  with pytest.raises(ConfigError, match=r"image_size: 16 there, 32 now"):
    encode_items(items, vae, out, image_size=32, flip=True, batch_size=8, chunk_size=16)
  with pytest.raises(ConfigError, match=r"items \(keys or order\) differ"):
    encode_items(
      items[::-1], vae, out, image_size=IMAGE_SIZE, flip=True, batch_size=8, chunk_size=16
    )


def test_encode_items_checks_arguments(items, vae, tmp_path):
  with pytest.raises(ConfigError, match="image_size=15 must be a multiple of"):
    encode_items(items, vae, tmp_path, image_size=15)
  dup = [ImageItem("k", "a.JPEG"), ImageItem("k", "b.JPEG")]
  with pytest.raises(ConfigError, match="key 'k'"):
    encode_items(dup, vae, tmp_path, image_size=IMAGE_SIZE)
  clash = [ImageItem("k", "a.JPEG", {"mean": 1})]
  with pytest.raises(ConfigError, match=r"\['mean'\] clash"):
    encode_items(clash, vae, tmp_path, image_size=IMAGE_SIZE)
  with pytest.raises(MissingPathError, match="encode_manifest.json is not there"):
    chunk_report(tmp_path / "nothing")


def test_summary_names_at_most_twenty():
  report = EncodeReport(
    encoded=5,
    skipped=[(f"f{i}.JPEG", "broken") for i in range(25)],
    chunks_written=2,
    chunks_reused=1,
  )
  text = report.summary()
  assert text.startswith("encoded 5 images in 3 chunks (1 reused); skipped 25: f0.JPEG (broken)")
  assert "f19.JPEG (broken), and 5 more" in text and "f20.JPEG" not in text


# --- ImageNet's tars, read in place ----------------------------------------------------


def tar_bytes(files: dict) -> bytes:
  """A tar of {name: bytes}, in the dict's order."""
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def jpeg(seed, size=(20, 30)):
  buf = io.BytesIO()
  Image.fromarray(noise(*size, seed=seed)).save(buf, format="JPEG")
  return buf.getvalue()


# Class tars that give no items: one is not a tar, one is cut inside its image,
# one holds no image.
BROKEN_CLASS, CUT_CLASS, EMPTY_CLASS = "n01443537", "n01484850", "n01491361"


@pytest.fixture(scope="module")
def manual(imagenet, tmp_path_factory):
  """TFDS's imagenet2012 manual_dir made of the `imagenet` folder layout: the
  training tar of class tars (members in reverse name order) plus a class tar
  that is no tar and one cut short inside its image; the flat validation tar."""
  classes = {
    f"{wnid}.tar": tar_bytes(
      {p.name: p.read_bytes() for p in sorted((imagenet / "train" / wnid).iterdir())[::-1]}
    )
    for wnid in WNIDS
  }
  classes[f"{BROKEN_CLASS}.tar"] = b"not a tar at all" * 64
  cut = tar_bytes({f"{CUT_CLASS}_1.JPEG": jpeg(7, (64, 64))})
  classes[f"{CUT_CLASS}.tar"] = cut[: 512 + 300]  # its header and 300 bytes of the image
  classes[f"{EMPTY_CLASS}.tar"] = tar_bytes({"README.txt": b"no images here"})
  root = tmp_path_factory.mktemp("manual")
  (root / imagenet_source.TRAIN_ARCHIVE).write_bytes(tar_bytes(classes))
  (root / imagenet_source.VAL_ARCHIVE).write_bytes(
    tar_bytes({f"ILSVRC2012_val_0000000{i}.JPEG": jpeg(10 + i) for i in (3, 1, 2)})
  )
  return root


@pytest.fixture(scope="module")
def tar_items(manual):
  return imagenet_source.imagenet_tar_items(manual, "train")


def test_imagenet_tars_read_in_place_give_the_items_of_the_folder_layout(
  tar_items, items, manual, imagenet
):
  """Nothing is extracted: each image is a byte range of the training tar, and
  the items (keys, fields, order, decoded pixels) equal those of the folder
  layout; a class tar that is no tar, or that is cut inside an image, is named
  with its reason. The validation tar's flat images take TFDS's labels (the
  first three validation images are n01751748, n09193705, n02105855)."""
  got, broken = tar_items
  train_tar = str(manual / imagenet_source.TRAIN_ARCHIVE)
  assert [(i.key, i.fields) for i in got] == [(i.key, i.fields) for i in items]
  assert {i.path for i in got} == {train_tar} and all(i.span for i in got)
  assert got[0].source == f"{train_tar}:n01440764.tar/n01440764_1.JPEG"
  for tar_item, file_item in zip(got, items):
    offset, size = tar_item.span
    with open(train_tar, "rb") as f:
      f.seek(offset)
      assert f.read(size) == pathlib.Path(file_item.path).read_bytes()  # the file's own bytes
    if file_item in truncated(items):
      with pytest.raises(UnreadableImage, match="truncated"):
        encode.read_item(tar_item)
    else:
      np.testing.assert_array_equal(
        np.asarray(encode.read_item(tar_item)), np.asarray(load_image(file_item.path, orient=False))
      )
  assert [(name, reason.split(" (")[0]) for name, reason in broken] == [
    (f"{train_tar}:{BROKEN_CLASS}.tar", "not a tar file"),
    (f"{train_tar}:{CUT_CLASS}.tar/{CUT_CLASS}_1.JPEG", "the archive ends inside it"),
    (f"{train_tar}:{EMPTY_CLASS}.tar", "holds no images"),
  ]
  assert sorted(os.listdir(manual)) == [imagenet_source.TRAIN_ARCHIVE, imagenet_source.VAL_ARCHIVE]
  val, none = imagenet_source.imagenet_tar_items(manual, "val")
  assert none == [] and [(i.key, i.fields["label"]) for i in val] == [
    ("n01751748/ILSVRC2012_val_00000001.JPEG", imagenet_source._label_of()["n01751748"]),
    ("n02105855/ILSVRC2012_val_00000003.JPEG", imagenet_source._label_of()["n02105855"]),
    ("n09193705/ILSVRC2012_val_00000002.JPEG", imagenet_source._label_of()["n09193705"]),
  ]
  np.testing.assert_array_equal(
    np.asarray(encode.read_item(val[0])), np.asarray(Image.open(io.BytesIO(jpeg(11))))
  )


def test_two_hosts_read_only_their_chunks_byte_ranges_and_write_only_their_chunks(
  tar_items, vae, encoded, tmp_path, monkeypatch
):
  """A pod's `prepare` from the tars: host h encodes the chunks k % 2 == h,
  reading exactly their images' byte ranges; together the chunks equal a
  one-host encoding of the same items, and of the folder layout."""
  got, _ = tar_items
  reads, read_range, host = [], encode.read_range, [0]

  def spy(path, start, size):
    reads.append((host[0], start, size))
    return read_range(path, start, size)

  monkeypatch.setattr(encode, "read_range", spy)
  kwargs = dict(image_size=IMAGE_SIZE, flip=True, batch_size=8, chunk_size=4, progress=False)
  chunks = [got[k * 4 : (k + 1) * 4] for k in range(3)]
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for h, mine in ((0, (0, 2)), (1, (1,))):
    host[0] = h
    monkeypatch.setattr(jax, "process_index", lambda h=h: h)
    report = encode_items(got, vae, tmp_path / "pod", **kwargs)
    assert report.chunks_written == len(mine)
    assert set(os.listdir(tmp_path / "pod")) == {"encode_manifest.json"} | {
      f"chunk_{k:06d}.npz" for k in (0, 2, 1)[: 2 + h]
    }
    assert sorted(r[1:] for r in reads if r[0] == h) == sorted(
      item.span for k in mine for item in chunks[k]
    )
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  encode_items(got, vae, tmp_path / "one", **kwargs)
  for k in range(3):
    with np.load(tmp_path / "pod" / f"chunk_{k:06d}.npz") as pod:
      with np.load(tmp_path / "one" / f"chunk_{k:06d}.npz") as one:
        assert sorted(pod.files) == sorted(one.files)
        for name in one.files:
          np.testing.assert_array_equal(pod[name], one[name])
  pod, folder = list(read_chunks(tmp_path / "pod")), list(read_chunks(encoded[0]))
  assert [e["key"] for e in pod] == [e["key"] for e in folder]
  for name in ("mean", "std", "mean_flip"):
    np.testing.assert_allclose(
      np.stack([e[name] for e in pod]), np.stack([e[name] for e in folder]), rtol=1e-5, atol=1e-6
    )
  [cut] = [i for i in got if i.key.endswith("_cut.JPEG")]
  assert chunk_report(tmp_path / "pod").skipped[0][0] == cut.source  # archive:member
  reads.clear()  # a rerun reads again only the skipped image's range, to see it is still cut
  report = encode_items(got, vae, tmp_path / "one", **kwargs)
  assert (report.chunks_reused, report.chunks_written) == (3, 0)
  assert [r[1:] for r in reads] == [cut.span]


def test_two_hosts_share_the_reading_of_the_class_tars(manual, tar_items, tmp_path, monkeypatch):
  """On a pod each host reads the headers of its share of the class tars
  (i % 2 == h), writes what it found beside the chunks and reads the others'
  after a barrier: both get the one-host items. The hosts run one after the
  other: host 0's barrier runs host 1 whole."""
  from jax.experimental import multihost_utils

  train_tar = manual / imagenet_source.TRAIN_ARCHIVE
  with tarfile.open(train_tar) as tar:
    classes = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
  host, reads, results = [0], {0: set(), 1: set()}, {}
  read_range = imagenet_source.read_range

  def spy(path, start, size):  # the class tars each host reads (from their first byte)
    reads[host[0]] |= {name for name, first, _ in classes if start == first}
    return read_range(path, start, size)

  def barrier(name):
    assert name == f"imagenet tar index in {tmp_path / 'share'}"
    if host[0] == 0:
      host[0] = 1
      results[1] = imagenet_source.imagenet_tar_items(manual, "train", str(tmp_path / "share"))
      host[0] = 0

  monkeypatch.setattr(imagenet_source, "read_range", spy)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: host[0])
  monkeypatch.setattr(multihost_utils, "sync_global_devices", barrier)
  results[0] = imagenet_source.imagenet_tar_items(manual, "train", str(tmp_path / "share"))
  assert results[0] == results[1] == tar_items
  names = [name for name, _, _ in classes]
  assert reads == {0: set(names[0::2]), 1: set(names[1::2])}
  assert sorted(os.listdir(tmp_path / "share")) == [
    "tar_index.00000-of-00002.json",
    "tar_index.00001-of-00002.json",
  ]


@pytest.mark.timeout(120)
def test_imagenet_prepared_from_tars_in_a_bucket_equals_the_local_tars(
  manual, tar_items, encoded, gcs_path, caplog
):
  """`prepare imagenet --input_dir=gs://...` (the tars in a bucket) into a
  bucket: the same items, byte ranges and latents as the local tars; the
  unreadable images and class tars listed in skipped.tsv."""
  from etils import epath

  for name in (imagenet_source.TRAIN_ARCHIVE, imagenet_source.VAL_ARCHIVE):
    (epath.Path(gcs_path) / "in" / name).write_bytes((manual / name).read_bytes())
  local, local_broken = tar_items
  remote, remote_broken = imagenet_source.imagenet_tar_items(f"{gcs_path}/in", "train")
  tar = f"{gcs_path}/in/{imagenet_source.TRAIN_ARCHIVE}"
  assert [(i.key, i.fields, i.member, i.span) for i in remote] == [
    (i.key, i.fields, i.member, i.span) for i in local
  ]
  assert {i.path for i in remote} == {tar}
  assert [(n.replace(str(manual), f"{gcs_path}/in"), r) for n, r in local_broken] == remote_broken
  args = imagenet_source.PrepareArgs(
    input_dir=f"{gcs_path}/in",
    vae=str(FIXTURE),
    image_size=IMAGE_SIZE,
    flip=True,
    splits=("train",),
    batch_size=8,
    chunk_size=16,
  )
  out = f"{gcs_path}/out"
  prepared = imagenet_source.SOURCE.prepare(args, out)
  [line] = prepared.report()
  assert line.startswith("imagenet/train: encoded 11 images in 1 chunks (0 reused); skipped 4: ")
  records, folder = list(prepared.splits["train"]()), list(read_chunks(encoded[0]))
  assert [r["key"] for r in records] == [e["key"] for e in folder]
  for name in ("mean", "std", "mean_flip", "std_flip"):
    np.testing.assert_array_equal(
      np.stack([r[name] for r in records]), np.stack([e[name] for e in folder])
    )
  listed = (epath.Path(out) / "_encoded" / "imagenet" / "train" / "skipped.tsv").read_text()
  assert [row.split("\t")[0] for row in listed.splitlines()] == [
    "path",
    f"{tar}:n15075141.tar/n15075141_cut.JPEG",
    f"{tar}:{BROKEN_CLASS}.tar",
    f"{tar}:{CUT_CLASS}.tar/{CUT_CLASS}_1.JPEG",
    f"{tar}:{EMPTY_CLASS}.tar",
  ]
  assert [p.name for p in epath.Path(out).iterdir()] == ["_encoded"]  # nothing extracted
  assert sorted(
    p.name for p in (epath.Path(out) / "_encoded" / "imagenet" / "train").iterdir()
  ) == ["chunk_000000.npz", "encode_manifest.json", "skipped.tsv"]
