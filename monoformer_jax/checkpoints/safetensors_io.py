"""Safetensors in and out, one tensor (or one slice of one) at a time.

Reads a single `.safetensors` file or a Hugging Face folder (`model.safetensors`,
or the shards that `model.safetensors.index.json` lists) through one memory map
per file, so reading a slice costs only the pages it touches, and any float
dtype (float32, float16, bfloat16: TinyLlama ships bfloat16) comes out as
float32. Writes the same layout shard by shard, header first, then each tensor
as it is produced, so a converted model never needs a second full copy in host
memory.

File format: 8-byte little-endian header size N, N bytes of JSON
{key: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}},
then the raw little-endian bytes, offsets relative to the end of the header.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


class SafetensorsFile:
  """One `.safetensors` file: its header, and lazy views of its tensors."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    with open(self.path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
    self.metadata = header.pop("__metadata__", None) or {}
    self.entries = header
    self._start = 8 + n
    size = os.path.getsize(self.path)
    # One read-only map for the whole file; tensors are views into it.
    self._map = (np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._start
                 else np.zeros(size, np.uint8))

  def keys(self) -> list[str]:
    return list(self.entries)

  def view(self, key: str) -> np.ndarray:
    """The tensor `key` as a lazy view in its stored dtype."""
    e = self.entries[key]
    if e["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {key!r} has dtype {e['dtype']}, which this "
                       f"reader does not know (known: {sorted(_DTYPES)})")
    begin, end = e["data_offsets"]
    raw = self._map[self._start + begin:self._start + end]
    return raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])


def find_files(path: str) -> list[str]:
  """The `.safetensors` files that `path` (a file or a folder) names."""
  path = os.fspath(path)
  if os.path.isfile(path):
    if path.endswith(".json"):
      return _files_of_index(path)
    if not path.endswith(".safetensors"):
      raise ValueError(f"{path} is not a .safetensors file; pass a .safetensors file, or "
                       f"a folder holding {SINGLE_NAME} or sharded weights with {INDEX_NAME}")
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"weights path {path!r} does not exist")
  if os.path.exists(os.path.join(path, INDEX_NAME)):
    return _files_of_index(os.path.join(path, INDEX_NAME))
  if os.path.exists(os.path.join(path, SINGLE_NAME)):
    return [os.path.join(path, SINGLE_NAME)]
  found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if len(found) == 1:
    return [os.path.join(path, found[0])]
  raise FileNotFoundError(
      f"{path} holds {len(found)} .safetensors files {found[:5]} and no {INDEX_NAME}: "
      f"expected {SINGLE_NAME}, a single .safetensors file, or shards listed by {INDEX_NAME}")


def _files_of_index(index_path: str) -> list[str]:
  with open(index_path) as f:
    weight_map = json.load(f).get("weight_map")
  if not weight_map:
    raise ValueError(f"{index_path} has no 'weight_map'; is it a safetensors index?")
  folder = os.path.dirname(index_path)
  files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
  missing = [f for f in files if not os.path.exists(f)]
  if missing:
    raise FileNotFoundError(f"{index_path} lists shards that are not there: {missing}")
  return files


class SafetensorsSource:
  """Tensors by key over one file or a folder of shards; `read` gives float32."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    self.files = [SafetensorsFile(p) for p in find_files(path)]
    self._where: dict[str, SafetensorsFile] = {}
    for f in self.files:
      for key in f.keys():
        if key in self._where:
          raise ValueError(f"tensor {key!r} is in both {self._where[key].path} and {f.path}")
        self._where[key] = f
    index = os.path.join(self.path, INDEX_NAME) if os.path.isdir(self.path) else None
    if index and os.path.exists(index):
      with open(index) as fh:
        listed = set(json.load(fh)["weight_map"])
      if listed != set(self._where):
        raise ValueError(f"{index} does not match its shards: listed but absent "
                         f"{sorted(listed - set(self._where))[:5]}, present but unlisted "
                         f"{sorted(set(self._where) - listed)[:5]}")

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._where[key].entries[key]["shape"])

  def dtype(self, key: str) -> str:
    return self._where[key].entries[key]["dtype"]

  def read(self, key: str, index: tuple = ()) -> np.ndarray:
    """float32 copy of `tensor[index]` (a tuple of slices); reads only that part."""
    return np.array(self._where[key].view(key)[index], dtype=np.float32)

  def close(self):
    self.files, self._where = [], {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def parse_size(size: str | int) -> int:
  """Bytes in '5GB', '500MB', '10KB' (powers of 1000, as Hugging Face) or an int."""
  if isinstance(size, int):
    return size
  s = size.strip().upper()
  for unit, scale in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10),
                      ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
    if s.endswith(unit):
      return int(float(s[:-len(unit)]) * scale)
  return int(s)


def write_safetensors(folder: str, shapes: Sequence[tuple[str, tuple[int, ...]]],
                      produce: Callable[[str], np.ndarray], *, max_shard_bytes: int,
                      on_tensor: Callable[[str], None] = lambda key: None) -> list[str]:
  """Writes float32 tensors `shapes` ([(key, shape)], in file order) to `folder`.

  `produce(key)` is called once per tensor, in order, just before it is written
  (then `on_tensor(key)`, e.g. to advance a progress bar).
  One file `model.safetensors` if everything fits in `max_shard_bytes`, else
  `model-0000k-of-0000n.safetensors` shards and `model.safetensors.index.json`
  (Hugging Face's names). Returns the file names written.
  """
  os.makedirs(folder, exist_ok=True)
  shards, size = [[]], 0
  for key, shape in shapes:
    nbytes = 4 * int(np.prod(shape, dtype=np.int64))
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((key, tuple(shape)))
    size += nbytes
  n = len(shards)
  names = ([SINGLE_NAME] if n == 1 else
           [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
  total = 0
  for name, shard in zip(names, shards):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shard:
      nbytes = 4 * int(np.prod(shape, dtype=np.int64))
      header[key] = {"dtype": "F32", "shape": list(shape),
                     "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
    total += offset
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps the data 8-byte aligned, as the spec advises
    with open(os.path.join(folder, name), "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for key, shape in shard:
        x = np.ascontiguousarray(produce(key), dtype="<f4")
        if x.shape != shape:
          raise ValueError(f"tensor {key!r} came out with shape {x.shape}, expected {shape}")
        f.write(x.data)
        on_tensor(key)
  if n > 1:
    weight_map = {key: name for name, shard in zip(names, shards) for key, _ in shard}
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names
