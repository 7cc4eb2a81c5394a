"""Reading PyTorch state-dict files (`.pth`, `.pt`, `.bin`) without torch, and
without running anything the file says.

    TorchFile(path)        one file: its keys, shapes and dtypes from the pickle,
                           each tensor's bytes read when it is asked for (zip
                           format; a legacy file is read whole)
    read_state_dict(path)  every tensor of one file, key -> numpy array

Folders and shards (`pytorch_model.bin.index.json`) are safetensors_io's
`open_weights`, which serves these files and safetensors alike.

`torch.save` writes one of two formats, both read here:

  zip (torch >= 1.6)  an uncompressed zip archive `<name>/data.pkl` (the object,
                      each storage pickled as a persistent id
                      ('storage', storage class, key, location, numel)) beside
                      `<name>/data/<key>`, each storage's raw bytes in the byte
                      order `<name>/byteorder` names (little when absent).
  legacy              pickles one after another: the magic number
                      0x1950a86a20f9469cfc6c, protocol version 1001, a sys-info
                      dict, the object (persistent ids ('storage', storage class,
                      root key, location, numel, view or None)), the sorted list
                      of storage keys, then per key an int64 element count and
                      the raw little-endian bytes. `_use_new_zipfile_serialization=
                      False` still writes it; pytorch-fid's 2019 weights may be one.

A tensor is pickled as `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)`; here it becomes a numpy array with that offset and those strides
(in elements), checked to lie inside its storage and then copied out.

The unpickler resolves only the globals a state dict needs (OrderedDict, the
tensor and parameter rebuild functions, torch's typed storage classes), each to
a harmless stand-in: any other global (a module's class, `os.system`, ...)
stops the read with a FileFormatError, so an untrusted file cannot run code.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pickle
import struct
import sys
import zipfile
from typing import BinaryIO

import ml_dtypes
import numpy as np
from etils import epath

from monoformer_jax.errors import FileFormatError, MissingPathError, PathError
from monoformer_jax.paths import open_binary

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# torch.<Name>Storage -> numpy dtype of its elements.
STORAGE_DTYPES = {
  "DoubleStorage": np.dtype(np.float64),
  "FloatStorage": np.dtype(np.float32),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
  "LongStorage": np.dtype(np.int64),
  "IntStorage": np.dtype(np.int32),
  "ShortStorage": np.dtype(np.int16),
  "CharStorage": np.dtype(np.int8),
  "ByteStorage": np.dtype(np.uint8),
  "BoolStorage": np.dtype(np.bool_),
  "ComplexFloatStorage": np.dtype(np.complex64),
  "ComplexDoubleStorage": np.dtype(np.complex128),
  "UntypedStorage": np.dtype(np.uint8),
}


@dataclasses.dataclass(frozen=True)
class _StorageClass:
  """Stands in for `torch.FloatStorage` and friends: only their dtype matters."""

  dtype: np.dtype


class _Storage:
  """One storage of the file; `array` (1-D, its dtype) is filled once read."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.array: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _StorageView:
  """A storage or (legacy files) a slice of one, `offset` elements in."""

  storage: _Storage
  offset: int
  numel: int


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """A tensor to cut out of its storage once the storage's bytes are read."""

  view: _StorageView
  offset: int
  size: tuple
  stride: tuple
  metadata: dict | None = None


def _as_view(storage) -> _StorageView:
  if isinstance(storage, _StorageView):
    return storage
  raise FileFormatError(
    f"a tensor in the file is built from {type(storage).__name__}, "
    "not a storage; it is not a PyTorch state dict"
  )


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _Tensor(_as_view(storage), int(storage_offset), tuple(size), tuple(stride))


def _rebuild_tensor_v2(
  storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
  del requires_grad, backward_hooks
  return _Tensor(
    _as_view(storage),
    int(storage_offset),
    tuple(size),
    tuple(stride),
    dict(metadata) if metadata else None,
  )


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  """nn.Parameter(data): a state dict keeps only the data."""
  del requires_grad, backward_hooks, state
  return data


class _TensorType:
  """Stands in for torch.Tensor / nn.Parameter in `_rebuild_from_type_v2`."""


def _rebuild_from_type_v2(func, new_type, args, state):
  del state
  if not isinstance(new_type, _TensorType):
    raise FileFormatError(
      f"the file rebuilds a tensor as {new_type!r}; only plain tensors and parameters are read"
    )
  return func(*args)


_ALLOWED = {
  ("collections", "OrderedDict"): collections.OrderedDict,
  ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
  ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
  ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
  ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
  ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
  ("torch", "Tensor"): _TensorType(),
  ("torch._tensor", "Tensor"): _TensorType(),
  ("torch.nn.parameter", "Parameter"): _TensorType(),
  ("torch", "Size"): tuple,
}
for _name, _dtype in STORAGE_DTYPES.items():
  _ALLOWED[("torch", _name)] = _StorageClass(_dtype)
_ALLOWED[("torch.storage", "UntypedStorage")] = _StorageClass(STORAGE_DTYPES["UntypedStorage"])


class _Unpickler(pickle.Unpickler):
  """pickle.Unpickler that resolves only `_ALLOWED` globals, storages through
  `storage_for(persistent id)`."""

  def __init__(self, file, source: str, storage_for=None):
    super().__init__(file)
    self.source = source
    self.storage_for = storage_for

  def find_class(self, module, name):
    try:
      return _ALLOWED[(module, name)]
    except KeyError:
      raise FileFormatError(
        f"{self.source} refers to {module}.{name}, which a state dict does not need; "
        "it is not loaded (unpickling it could run code). Save the weights alone: "
        "torch.save(model.state_dict(), path)"
      ) from None

  def persistent_load(self, pid):
    if self.storage_for is None or not isinstance(pid, tuple) or not pid:
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind != "storage":
      raise FileFormatError(
        f"{self.source} holds a {kind!r} object (a whole pickled "
        "module?); save model.state_dict() instead"
      )
    return self.storage_for(pid[1:])


def _storage_class(value, source) -> _StorageClass:
  if not isinstance(value, _StorageClass):
    raise FileFormatError(f"{source}: a storage of type {value!r} is not a torch storage")
  return value


def _from_bytes(raw: bytes, dtype: np.dtype, little_endian: bool) -> np.ndarray:
  """A storage's elements in native byte order (a swapped copy when they differ)."""
  if little_endian == (sys.byteorder == "little") or dtype.itemsize == 1:
    return np.frombuffer(raw, dtype)
  unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize  # complex: 2 floats
  return np.frombuffer(raw, f"u{unit}").byteswap().view(dtype)


def _tensor_array(t: _Tensor, source: str) -> np.ndarray:
  base = t.view.storage.array
  if base is None:
    raise FileFormatError(f"{source}: storage {t.view.storage.key!r} has no data in the file")
  dtype = base.dtype
  size = tuple(int(n) for n in t.size)
  stride = tuple(int(s) for s in t.stride)
  if len(stride) != len(size) or any(n < 0 for n in size) or any(s < 0 for s in stride):
    raise FileFormatError(f"{source}: a tensor has size {size} and stride {stride}")
  if 0 in size:
    return np.zeros(size, dtype)
  start = t.view.offset + t.offset
  last = start + sum((n - 1) * s for n, s in zip(size, stride))
  if t.offset < 0 or last >= t.view.offset + t.view.numel or last >= base.size:
    raise FileFormatError(
      f"{source}: a tensor of size {size}, stride {stride} at offset "
      f"{t.offset} reaches past its storage of {t.view.numel} elements; "
      "the file is damaged"
    )
  view = np.lib.stride_tricks.as_strided(
    base[start:], shape=size, strides=tuple(s * dtype.itemsize for s in stride), writeable=False
  )
  array = np.array(view, order="C")  # owned and C-contiguous
  if t.metadata and t.metadata.get("conj"):
    array = np.conj(array)
  if t.metadata and t.metadata.get("neg"):
    array = -array
  return array


def _zip_layout(archive: zipfile.ZipFile, source: str) -> tuple[str, bool]:
  """(record prefix `<name>/`, little-endian?) of a torch.save zip archive."""
  names = archive.namelist()
  pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise FileFormatError(
      f"{source} is a zip archive without one <name>/data.pkl "
      f"(found {names[:5]}); it is not a torch.save file"
    )
  prefix = pickles[0][: -len("data.pkl")]
  little_endian = True  # files from before the byteorder record were little-endian
  if prefix + "byteorder" in names:
    value = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
    if value not in ("little", "big"):
      raise FileFormatError(f"{source}: byteorder {value!r} is neither little nor big")
    little_endian = value == "little"
  return prefix, little_endian


def _read_zip_pickle(archive: zipfile.ZipFile, prefix: str, source: str):
  """The unpickled object of a zip file; its storages' bytes are not read yet."""
  storages: dict[str, _Storage] = {}

  def storage_for(data):
    if len(data) != 4:
      raise FileFormatError(f"{source}: storage id {data!r} is not (type, key, location, numel)")
    kind, key, _, numel = data
    dtype = _storage_class(kind, source).dtype
    if key not in storages:
      storages[key] = _Storage(str(key), dtype, int(numel))
    storage = storages[key]
    return _StorageView(storage, 0, storage.numel)

  with archive.open(prefix + "data.pkl") as f:
    return _Unpickler(f, source, storage_for).load()


def _read_legacy(f: BinaryIO, source: str):
  """The unpickled object of a legacy file, every storage read."""
  storages: dict[str, _Storage] = {}
  views: dict[str, _StorageView] = {}

  def storage_for(data):
    if len(data) != 5:
      raise FileFormatError(
        f"{source}: storage id {data!r} is not (type, key, location, numel, view)"
      )
    kind, key, _, numel, view = data
    dtype = _storage_class(kind, source).dtype
    if key not in storages:
      storages[key] = _Storage(str(key), dtype, int(numel))
    storage = storages[key]
    if view is None:
      return _StorageView(storage, 0, storage.numel)
    view_key, offset, view_numel = view
    if view_key not in views:
      views[view_key] = _StorageView(storage, int(offset), int(view_numel))
    return views[view_key]

  def load():
    return _Unpickler(f, source).load()

  try:
    magic = load()
  except FileFormatError:
    raise
  except Exception as e:
    raise FileFormatError(
      f"{source} is not a PyTorch weights file (neither a zip archive nor a legacy "
      f"torch.save pickle: {type(e).__name__}); pass a file written by torch.save"
    ) from e
  if magic != MAGIC_NUMBER:
    raise FileFormatError(
      f"{source} is a pickle but not a torch.save file (no torch "
      "magic number); pass a file written by torch.save"
    )
  version = load()
  if version != PROTOCOL_VERSION:
    raise FileFormatError(
      f"{source}: torch.save protocol version {version!r}, only "
      f"{PROTOCOL_VERSION} is read; re-save it with a recent torch"
    )
  load()  # sys info; torch writes these storages little-endian on any machine
  obj = _Unpickler(f, source, storage_for).load()
  keys = load()
  for key in keys:
    if key not in storages:
      raise FileFormatError(f"{source}: storage {key!r} is listed but not used")
    storage = storages[key]
    head = f.read(8)
    if len(head) != 8:
      raise FileFormatError(f"{source} ends before storage {key!r}; the file is truncated")
    (count,) = struct.unpack("<q", head)
    nbytes = count * storage.dtype.itemsize
    raw = f.read(nbytes)
    if count < 0 or len(raw) != nbytes:
      raise FileFormatError(
        f"{source} ends inside storage {key!r} ({len(raw)} of "
        f"{nbytes} bytes); the file is truncated"
      )
    storage.array = _from_bytes(raw, storage.dtype, little_endian=True)
    storage.numel = count
  return obj


@contextlib.contextmanager
def _one_line(source: str, hint: str):
  """Any failure to read the file as one FileFormatError naming it (and `hint`)."""
  try:
    yield
  except OSError:
    raise
  except FileFormatError as e:
    if not hint:
      raise
    raise FileFormatError(f"{e}; {hint}") from e
  except Exception as e:
    raise FileFormatError(
      f"{source} cannot be read as a torch.save file ({type(e).__name__}: {e}); the file "
      "is damaged or not a state dict" + (f"; {hint}" if hint else "")
    ) from e


class TorchFile:
  """One file `torch.save(state_dict)` wrote (local or `gs://...`): its keys,
  shapes and dtypes from the pickle, a tensor's bytes read when `view` asks.

  `hint` ends the message of a missing or unreadable file's error (which flag
  or file to pass). Raises MissingPathError, PathError (a folder),
  FileFormatError (not a torch.save file, a damaged one, or one holding more
  than tensors: any global a state dict does not need is refused unrun).
  """

  def __init__(self, path, *, hint: str = ""):
    self.path = os.fspath(path)
    self.source, self.hint = f"PyTorch weights {self.path}", hint
    where = epath.Path(self.path)
    if not where.exists():
      raise MissingPathError(f"{self.source} do not exist" + (f"; {hint}" if hint else ""))
    if where.is_dir():
      raise PathError(f"{self.source} is a folder; pass the .pth/.pt/.bin file itself")
    self._file = open_binary(self.path)  # local, or a bucket's file (gs://...)
    self._archive = None
    self._last: tuple = (None, None)
    try:
      with _one_line(self.source, hint):
        if zipfile.is_zipfile(self._file):
          self._archive = zipfile.ZipFile(self._file)
          self._prefix, self._little = _zip_layout(self._archive, self.source)
          obj = _read_zip_pickle(self._archive, self._prefix, self.source)
        else:
          self._file.seek(0)
          obj = _read_legacy(self._file, self.source)
      self.tensors = self._checked(obj)
    except BaseException:
      self.close()
      raise
    if self._archive is None:
      self.close()  # a legacy file is read whole: nothing more to fetch

  def _checked(self, obj) -> dict[str, _Tensor]:
    if not isinstance(obj, dict):
      raise FileFormatError(
        f"{self.source} holds a {type(obj).__name__}, not a state dict "
        "(key -> tensor); save model.state_dict()"
      )
    for key, value in obj.items():
      if not isinstance(value, _Tensor):
        raise FileFormatError(
          f"{self.source}: entry {key!r} is a {type(value).__name__}, not a tensor; a state "
          "dict holds only tensors (nested checkpoints: save checkpoint['state_dict'] alone)"
        )
    return {str(key): value for key, value in obj.items()}

  def keys(self) -> list[str]:
    return list(self.tensors)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(int(n) for n in self.tensors[key].size)

  def numpy_dtype(self, key: str) -> np.dtype:
    return self.tensors[key].view.storage.dtype

  def view(self, key: str) -> np.ndarray:
    """The tensor `key` in its stored dtype (read-only, C-contiguous, native byte
    order; bfloat16 via ml_dtypes). A zip file's storage is read for it and not
    kept, so a model is never whole in memory; the last tensor is, so that
    reading it slice by slice (one per device shard) reads the file once."""
    if self._last[0] == key:
      return self._last[1]
    array = self._read(key)
    array.flags.writeable = False  # handed out again: nobody may change it
    self._last = (key, array)
    return array

  def _read(self, key: str) -> np.ndarray:
    tensor = self.tensors[key]
    storage = tensor.view.storage
    if storage.array is not None:  # a legacy file's, read at open
      return _tensor_array(tensor, self.source)
    if self._archive is None:
      raise ValueError(f"{self.source} is closed")
    record = f"{self._prefix}data/{storage.key}"
    with _one_line(self.source, self.hint):
      try:
        raw = self._archive.read(record)
      except KeyError:
        raise FileFormatError(
          f"{self.source}: storage {record} is missing from the archive"
        ) from None
      if len(raw) % storage.dtype.itemsize:
        raise FileFormatError(
          f"{self.source}: storage {record} has {len(raw)} bytes, not a "
          f"multiple of {storage.dtype.itemsize}"
        )
      storage.array = _from_bytes(raw, storage.dtype, self._little)
      try:
        return _tensor_array(tensor, self.source)
      finally:
        storage.array = None

  def close(self):
    self._last = (None, None)
    if self._archive is not None:
      self._archive.close()
      self._archive = None
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_state_dict(path, *, hint: str = "") -> dict[str, np.ndarray]:
  """Every tensor of the state dict `torch.save` wrote at `path`: key -> a numpy
  array (owned, native byte order; bfloat16 via ml_dtypes), in file order.
  `hint` and the errors as `TorchFile`'s."""
  with TorchFile(path, hint=hint) as file:
    return {key: file._read(key) for key in file.keys()}
