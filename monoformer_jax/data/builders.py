"""TFDS builders: every prepared dataset, written as `array_record` and read back.

One builder, whatever the dataset: its records are dicts of the features the
dataset's source declares (data/sources/: `DataSource.features`, what each
record holds), all read back without TensorFlow
(`tfds.builder_from_directory(dir).as_data_source(split)`, random access, what
Grain reads) as `Records`.

`write(name, output_dir, {split: records}, features)` writes the splits into
`output_dir/monoformer_{name}/1.0.0` (`prepared_dir`, what data.dir names). The
image sources encode first (data/encode.py, resumable chunks); the builder
only copies finished records into array_record, so an interrupted preparation
resumes where it stopped. The records are written in an order TFDS chooses
(by a hash of each key); readers shuffle anyway.

On an object store (`gs://...`) a dataset is built in a local staging folder
and uploaded file by file, `dataset_info.json` last: that one object (a single
upload is atomic) marks it complete, and a folder without it is refused by
every reader. array_record opens local files only, so `data_source` of a
`gs://` folder first copies the dataset to local disk (`local_copy`); on a pod
the faster way is a gcsfuse mount with data.dir pointing into it
(launch/tpu_pod.sh, docs/data.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
from absl import logging
from etils import epath

from monoformer_jax.config import fields
from monoformer_jax.errors import ConfigError, FileFormatError, MissingPathError, PathError
from monoformer_jax.paths import copy_file, free_bytes, is_local

VERSION = "1.0.0"
INFO = "dataset_info.json"  # written last: its presence marks a dataset complete


Splits = dict  # split name -> a function returning that split's records (dicts)


class NoRecords(FileFormatError):
  """A split whose input gave no record: nothing is written (TFDS leaves no dataset)."""


def _builder(kind: str, output_dir: str, splits: Splits, features, description: str):
  """A TFDS builder (not registered by name) that writes each of `splits`."""
  import tensorflow_datasets as tfds

  names = set(features.keys())

  class MonoformerData(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(VERSION)
    name = f"monoformer_{kind}"

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, description=description, features=features)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(split, records) for split, records in splits.items()}

    def _generate_examples(self, split, records):
      count = 0
      for count, record in enumerate(records(), 1):
        yield str(record.get("key", count - 1)), {k: v for k, v in record.items() if k in names}
      if not count:  # raised here, TFDS would only say "No examples were yielded"
        raise NoRecords(f"{kind}/{split}: the input gave no record to write")

  return MonoformerData(data_dir=output_dir, file_format="array_record")


def prepared_dir(output_dir: str, name: str) -> str:
  """Where `write` puts the dataset `name` under `output_dir` (what data.dir names)."""
  output_dir = os.fspath(output_dir)
  if not is_local(output_dir):
    return f"{output_dir.rstrip('/')}/monoformer_{name}/{VERSION}"
  return os.path.join(output_dir, f"monoformer_{name}", VERSION)


def write(
  name: str,
  output_dir: str,
  splits: Splits,
  features: dict,
  *,
  uncompressed: bool = False,
  description: str = "",
) -> str:
  """Writes each split (`{split: records}`, records() yielding dicts of
  `features`, {name: tfds feature}) as array_record in `output_dir`; returns
  the dataset's folder (what data.dir names). `uncompressed` rewrites the
  shards without compression (UNCOMPRESSED). A dataset already there is an
  error, never overwritten."""
  import tensorflow_datasets as tfds

  folder = check_not_prepared(output_dir, name)
  staging = tempfile.mkdtemp(prefix="monoformer_prepare_") if not is_local(output_dir) else None
  built = prepared_dir(staging or output_dir, name)
  try:
    _builder(
      name, staging or output_dir, splits, tfds.features.FeaturesDict(features), description or name
    ).download_and_prepare()
    if uncompressed:
      for shard in sorted(os.listdir(built)):
        if ".array_record-" in shard:
          _store_uncompressed(os.path.join(built, shard))
    if staging:
      _upload(built, folder)
  finally:
    if staging:
      shutil.rmtree(staging, ignore_errors=True)
  return folder


def _upload(local: str, remote: str) -> None:
  """Copies the dataset folder `local` to `remote`, dataset_info.json last."""
  names = sorted(os.listdir(local), key=lambda name: name == INFO)
  target = epath.Path(remote)
  target.mkdir(parents=True, exist_ok=True)
  for name in names:
    logging.info("uploading %s to %s", name, remote)
    copy_file(os.path.join(local, name), target / name)


def local_copy(directory: str) -> str:
  """A local folder holding the complete dataset `directory` (a `gs://...`
  one): copied on first use into the system's temporary folder (files first,
  dataset_info.json last, so a copy cut short is copied again) and reused
  while the bucket's dataset_info.json is unchanged. array_record reads local
  files only; a gcsfuse mount (launch/tpu_pod.sh) avoids the copy."""
  remote = epath.Path(directory)
  info = (remote / INFO).read_bytes()
  tag = hashlib.sha256(directory.encode() + b"\0" + info).hexdigest()[:16]
  local = os.path.join(tempfile.gettempdir(), "monoformer_data", f"{remote.name}-{tag}")
  if os.path.exists(os.path.join(local, INFO)):
    return local
  files = sorted((p for p in remote.iterdir() if p.name != INFO), key=lambda p: p.name)
  need = sum(p.stat().length for p in files)
  free = free_bytes(local)
  if free is not None and need > free:
    raise PathError(
      f"data.dir={directory!r}: its {need / 2**30:.1f} GiB do not fit the "
      f"{free / 2**30:.1f} GiB free in {local} (array_record reads local files); mount the "
      "bucket with gcsfuse and point data.dir into the mount (launch/tpu_pod.sh)"
    )
  # Copied beside, then renamed into place: processes copying at once keep one copy.
  os.makedirs(os.path.dirname(local), exist_ok=True)
  partial = tempfile.mkdtemp(prefix=f".{os.path.basename(local)}-", dir=os.path.dirname(local))
  try:
    logging.info("copying %s (%d files, %d bytes) to %s", directory, len(files), need, local)
    for path in files:
      copy_file(path, os.path.join(partial, path.name))
    with open(os.path.join(partial, INFO), "wb") as f:
      f.write(info)
    shutil.rmtree(local, ignore_errors=True)  # a copy of an older run, cut short
    os.rename(partial, local)
  except OSError:
    if not os.path.exists(os.path.join(local, INFO)):  # not another process's finished copy
      raise
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return local


def check_not_prepared(output_dir: str, name: str) -> str:
  """The folder `write` would write `name` into, refused when it holds a
  prepared dataset already (checked before the input is read, and again by `write`)."""
  folder = prepared_dir(output_dir, name)
  if (epath.Path(folder) / INFO).exists():
    raise PathError(
      f"{folder} already holds a prepared {name} dataset; pass another "
      "--output_dir or remove it to prepare again"
    )
  return folder


# Sources whose records are latents or JPEG bytes store their shards
# uncompressed: TFDS writes zstd, which saves under a tenth of a latent's bytes
# (float32 mantissas do not compress) and triples the cost of reading a record
# (0.10 against 0.037 ms per 64 KB record on a 2-core host; docs/benchmarks.md);
# JPEG bytes are entropy-coded already. Readers take either.
UNCOMPRESSED = "group_size:1,uncompressed"


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
  info = epath.Path(directory) / INFO
  hint = (
    f"python -m monoformer_jax.data.prepare {kind} --input_dir=... "
    f"--output_dir=DIR, then data.dir=DIR/monoformer_{kind}/{VERSION}"
    if kind
    else "python -m monoformer_jax.data.prepare"
  )
  if not info.exists():
    raise MissingPathError(_not_prepared(directory, hint))
  again = f"prepare it again: {hint}"
  location = local_copy(directory) if not is_local(directory) else directory
  try:
    builder = tfds.builder_from_directory(location)
  except Exception as e:  # TFDS raises ParseError, KeyError, OSError... for a damaged folder
    raise FileFormatError(
      f"data.dir={directory!r}: its dataset_info.json cannot be read "
      f"({type(e).__name__}: {_first_line(e)}); {again}"
    ) from e
  if split not in builder.info.splits:
    raise ConfigError(
      f"data.split={split!r}: {directory} has the splits {sorted(builder.info.splits)}"
    )
  try:
    raw = builder.as_data_source(
      split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )
    for probe in {0, len(raw) - 1} if len(raw) else ():  # the first and the last shard
      raw[probe]
  except Exception as e:  # a shard missing or cut short: here, not in a worker mid-run
    raise FileFormatError(
      f"data.dir={directory!r}: its {split} records cannot be read "
      f"({type(e).__name__}: {_first_line(e)}); a shard is missing or damaged; {again}"
    ) from e
  return Records(raw, builder.info.features)


def _not_prepared(directory: str, hint: str) -> str:
  """Why `directory` (no dataset_info.json) is refused: never prepared, or half
  written (its shards there, the marker written last not yet)."""
  try:
    shards = [p.name for p in epath.Path(directory).glob("*.array_record-*")]
  except OSError as e:  # gcsfs: a bucket that is not there
    return (
      f"data.dir={directory!r} cannot be listed ({type(e).__name__}: {_first_line(e)}); "
      f"check the bucket's name and your access, or prepare it: {hint}"
    )
  if shards:
    return (
      f"data.dir={directory!r} is a half-written dataset: {len(shards)} shards but no "
      f"{INFO}, which preparation writes last; wait for the preparation to finish, "
      f"or prepare it again: {hint}"
    )
  return f"data.dir={directory!r} holds no prepared dataset (no {INFO}); prepare one first: {hint}"


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else ""


def check_prepared(field: str, directory: str, name: str):
  """`directory` (the config field `field`) names a dataset `name` prepared by
  `python -m monoformer_jax.data.prepare name`, before anything is read
  (`gs://` folders are left to their reader)."""
  if not directory:
    raise ConfigError(
      f"{field} is empty: point it at the {name} dataset prepared by "
      f"`python -m monoformer_jax.data.prepare {name}`"
    )
  if (epath.Path(directory) / INFO).exists():
    return
  inside = prepared_dir(directory, name)
  if (epath.Path(inside) / INFO).exists():
    raise ConfigError(
      f"{field}={directory!r} is the --output_dir the dataset was prepared into; "
      f"pass the dataset's own folder: {fields.flag_of(field)}={inside}"
    )
  if not is_local(directory):  # shards without the marker: half written
    raise ConfigError(_not_prepared(directory, f"python -m monoformer_jax.data.prepare {name}"))
  if os.path.isfile(directory):
    raise ConfigError(
      f"{field}={directory!r} is a file; pass the folder of the {name} dataset prepared by "
      f"`python -m monoformer_jax.data.prepare {name}` (OUT/monoformer_{name}/{VERSION})"
    )
  raise ConfigError(
    f"{field}={directory!r} is not a prepared dataset (no "
    f"dataset_info.json): prepare it with `python -m "
    f"monoformer_jax.data.prepare {name} --output_dir=OUT` and pass "
    f"OUT/monoformer_{name}/{VERSION}"
  )


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

  def __iter__(self):  # array_record ends with ValueError, not the IndexError `for` needs
    return (self[i] for i in range(len(self)))

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
        values = value.int64_list.value if value.HasField("int64_list") else value.float_list.value
        array = np.array(values, dtype).reshape(shape)
        out[name] = array if shape else array.item()
    return out

  def __getitem__(self, index) -> dict:
    return self._decode(self.raw[index])

  def __getitems__(self, indices) -> list[dict]:
    return [self._decode(r) for r in self.raw.__getitems__(list(indices))]


def dataset_info(directory: str) -> dict:
  return json.loads((epath.Path(directory) / INFO).read_text())
