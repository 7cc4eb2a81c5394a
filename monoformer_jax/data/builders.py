"""TFDS builders: every dataset the project trains on, written as `array_record`.

One builder class per kind of record, all read back without TensorFlow
(`tfds.builder_from_directory(dir).as_data_source(split)`, random access, what
Grain reads). What each record holds:

    latent images   imagenet, text_to_image: `mean`, `std` float32 [h, w, C]
                    (the SD-VAE posterior of the scaled latent, so a training
                    latent is mean + std * eps), optionally `mean_flip`,
                    `std_flip` (of the mirrored image), and `key` (the file);
                    imagenet adds `label` int64 and `wnid`, text_to_image
                    `prompt` and `caption`
    chat            `turns`: the conversation as JSON [{role, content}, ...],
                    rendered with the config's chat template at training time
    text            `text`
    llava           `conversation`: the turns as JSON [{role, content}, ...]
                    with the image's "<image>" marker, `image`: the image
                    file's bytes as they are (JPEG for mix665k; b"": a
                    text-only record; data/llava.py says why), `key`
    digits          `image` float32 [8, 8, 1] pixels in [-1, 1], `label`

`prepare(kind, output_dir, {split: records}, ...)` writes the splits. The image kinds
are encoded first by data/encode.py into resumable chunks; the builder only
copies finished chunks into array_record, so an interrupted preparation
resumes where it stopped. The records are written in an order TFDS chooses
(by a hash of each key); readers shuffle anyway.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import numpy as np

from monoformer_jax.errors import ConfigError, MissingPathError, PathError

VERSION = "1.0.0"
LATENT_KINDS = ("imagenet", "text_to_image")
KINDS = LATENT_KINDS + ("chat", "text", "llava", "digits")


def _features(kind: str, latent_shape=None, flip: bool = False):
  import tensorflow_datasets as tfds
  f = tfds.features
  if kind in LATENT_KINDS:
    # Stored as raw bytes: read back with one np.frombuffer (Records).
    tensor = lambda: f.Tensor(shape=tuple(latent_shape), dtype=np.float32,
                              encoding=f.Encoding.BYTES)
    spec = dict(mean=tensor(), std=tensor(), key=f.Text())
    if flip:
      spec.update(mean_flip=tensor(), std_flip=tensor())
    if kind == "imagenet":
      spec.update(label=f.Scalar(dtype=np.int64), wnid=f.Text())
    else:
      spec.update(prompt=f.Text(), caption=f.Text())
  elif kind == "chat":
    spec = dict(turns=f.Text())
  elif kind == "text":
    spec = dict(text=f.Text())
  elif kind == "llava":
    # Text features hold any bytes, so the image file's bytes are stored (and
    # read back by Records) as they are, with no image codec in TFDS's way.
    spec = dict(conversation=f.Text(), image=f.Text(doc="the image file's bytes"),
                key=f.Text())
  elif kind == "digits":
    spec = dict(image=f.Tensor(shape=(8, 8, 1), dtype=np.float32, encoding=f.Encoding.BYTES),
                label=f.Scalar(dtype=np.int64))
  else:
    raise ConfigError(f"dataset kind {kind!r}: use one of {KINDS}")
  return f.FeaturesDict(spec)


Splits = dict   # split name -> a function returning that split's records (dicts)


def _builder(kind: str, output_dir: str, splits: Splits, features, description: str):
  """A TFDS builder (not registered by name) that writes each of `splits`."""
  import tensorflow_datasets as tfds
  names = set(features.keys())

  class MonoformerData(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)
    name = f"monoformer_{kind}"

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, description=description,
                                   features=features)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(records) for split, records in splits.items()}

    def _generate_examples(self, records):
      for i, record in enumerate(records()):
        yield str(record.get("key", i)), {k: v for k, v in record.items() if k in names}

  return MonoformerData(data_dir=output_dir, file_format="array_record")


def prepared_dir(output_dir: str, kind: str) -> str:
  """Where `prepare` writes `kind` under `output_dir` (what data.dir names)."""
  return os.path.join(output_dir, f"monoformer_{kind}", VERSION)


def prepare(kind: str, output_dir: str, splits: Splits, *, latent_shape=None,
            flip: bool = False, description: str = "") -> str:
  """Writes each split (`{name: records}`, records() yielding dicts of the
  kind's features) as array_record in `output_dir`; returns the dataset's
  folder (what data.dir names). A dataset already there is an error, never
  overwritten."""
  folder = prepared_dir(output_dir, kind)
  if os.path.exists(os.path.join(folder, "dataset_info.json")):
    raise PathError(f"{folder} already holds a prepared {kind} dataset; pass another "
                    "--output_dir or remove it to prepare again")
  features = _features(kind, latent_shape, flip)
  _builder(kind, output_dir, splits, features, description or kind).download_and_prepare()
  if kind in UNCOMPRESSED_KINDS:
    for name in sorted(os.listdir(folder)):
      if ".array_record-" in name:
        _store_uncompressed(os.path.join(folder, name))
  return folder


# Shards of latents are rewritten uncompressed: TFDS writes zstd, which saves
# under a tenth of a latent's bytes (float32 mantissas do not compress) and
# triples the cost of reading a record (0.10 against 0.037 ms per 64 KB
# record on a 2-core host; docs/benchmarks.md). LLaVA's JPEG bytes are
# entropy-coded already, so the same holds for them. Readers take either.
UNCOMPRESSED = "group_size:1,uncompressed"
UNCOMPRESSED_KINDS = LATENT_KINDS + ("llava",)


def _store_uncompressed(path: str, chunk: int = 256):
  from array_record.python import array_record_module as ar
  reader = ar.ArrayRecordReader(path)
  if "uncompressed" in reader.writer_options_string():
    reader.close()
    return
  n = reader.num_records()
  writer = ar.ArrayRecordWriter(path + ".uncompressed", UNCOMPRESSED)
  for start in range(0, n, chunk):
    for record in reader.read(start, min(n, start + chunk)):
      writer.write(record)
  writer.close()
  reader.close()
  os.replace(path + ".uncompressed", path)


def data_source(directory: str, split: str = "train", *, kind: str | None = None) -> Records:
  """The random-access records of `split` of a prepared dataset (no TensorFlow)."""
  import tensorflow_datasets as tfds
  directory = os.fspath(directory)
  info = os.path.join(directory, "dataset_info.json")
  if not os.path.exists(info):
    hint = (f"python -m monoformer_jax.data.prepare {kind} --input_dir=... "
            f"--output_dir=DIR, then data.dir=DIR/monoformer_{kind}/{VERSION}"
            if kind else "python -m monoformer_jax.data.prepare")
    raise MissingPathError(f"data.dir={directory!r} holds no prepared dataset (no "
                           f"dataset_info.json); prepare one first: {hint}")
  builder = tfds.builder_from_directory(directory)
  if split not in builder.info.splits:
    raise ConfigError(f"data.split={split!r}: {directory} has the splits "
                      f"{sorted(builder.info.splits)}")
  raw = builder.as_data_source(split=split,
                               deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  return Records(raw, builder.info.features)


class Records:
  """A prepared split as a random-access sequence of dicts of numpy values.

  TFDS's own decoding (`deserialize_example_np`) costs about 0.3 ms of Python
  per latent record, more than everything else an example needs; the
  features this project writes (fixed-shape tensors, scalars, text) are parsed
  here straight from the tf.train.Example proto instead (a tensor stored as
  bytes is one np.frombuffer). Features of any other kind, or a record that
  does not parse this way, go through TFDS's decoding, so any prepared
  dataset reads the same either way (tested).
  """

  def __init__(self, raw, features):
    from tensorflow_datasets.core import example_parser
    self.raw, self.features = raw, features
    self._proto = example_parser.tf_example_pb2.Example
    self._fields = self._fast_fields(features)

  @staticmethod
  def _fast_fields(features) -> dict | None:
    """name -> (kind, dtype, shape) when every feature is one Records parses."""
    import tensorflow_datasets as tfds
    f = tfds.features
    fields = {}
    for name, feature in features.items():
      if isinstance(feature, f.Text):
        fields[name] = ("text", None, ())
      elif type(feature) in (f.Tensor, f.Scalar) and None not in feature.shape:
        encoding = getattr(feature, "_encoding", f.Encoding.NONE)
        if encoding not in (f.Encoding.NONE, f.Encoding.BYTES):
          return None
        kind = "bytes" if encoding == f.Encoding.BYTES else "list"
        fields[name] = (kind, np.dtype(feature.np_dtype), tuple(feature.shape))
      else:
        return None
    return fields

  def __len__(self) -> int:
    return len(self.raw)

  def _decode(self, serialized: bytes) -> dict:
    if self._fields is None:
      return self.features.deserialize_example_np(serialized)
    feature = self._proto.FromString(serialized).features.feature
    out = {}
    for name, (kind, dtype, shape) in self._fields.items():
      value = feature[name]
      if kind == "text":
        out[name] = value.bytes_list.value[0]
      elif kind == "bytes":
        out[name] = np.frombuffer(value.bytes_list.value[0], dtype).reshape(shape)
      else:
        values = (value.int64_list.value if value.HasField("int64_list")
                  else value.float_list.value)
        array = np.array(values, dtype).reshape(shape)
        out[name] = array if shape else array.item()
    return out

  def __getitem__(self, index) -> dict:
    return self._decode(self.raw[index])

  def __getitems__(self, indices) -> list[dict]:
    return [self._decode(r) for r in self.raw.__getitems__(list(indices))]


def dataset_info(directory: str) -> dict:
  with open(os.path.join(directory, "dataset_info.json")) as f:
    return json.load(f)


@contextlib.contextmanager
def _locked(path: str):
  """An exclusive lock on `path` (a file beside the data), across processes."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def digits_dir(cache_dir: str) -> str:
  """The digits prepared into `cache_dir` on first use (from scikit-learn's
  copy; nothing is downloaded); later calls reuse it. Safe when several
  processes ask at once."""
  from monoformer_jax.data.digits import load_digit_images
  folder = prepared_dir(cache_dir, "digits")
  if os.path.exists(os.path.join(folder, "dataset_info.json")):
    return folder
  with _locked(os.path.join(cache_dir, ".digits.lock")):
    if not os.path.exists(os.path.join(folder, "dataset_info.json")):
      images, labels = load_digit_images()
      prepare("digits", cache_dir, {"train": lambda: (
          dict(key=f"{i:04d}", image=images[i], label=int(labels[i]))
          for i in range(len(images)))},
          description="scikit-learn's 8x8 digits, pixels in [-1, 1]")
  return folder
