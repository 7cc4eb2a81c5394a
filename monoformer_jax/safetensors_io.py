"""Other people's weights in, safetensors in and out, one tensor (or one slice of one) at a time.

    open_weights(path)   the weights a file, an index or a folder holds, as one
                         source (keys, shape, dtype, read -> float32): safetensors
                         when the folder has them, else PyTorch files (.bin, .pt,
                         .pth, sharded by pytorch_model.bin.index.json) read
                         without torch by torch_files.py
    find_weights(path)   which files those are (the one home of the folder,
                         index and shard rules, for both formats)
    write_safetensors    a model written shard by shard

Reads a single `.safetensors` file or a Hugging Face folder (`model.safetensors`,
or the shards that `model.safetensors.index.json` lists) through one memory map
per file, so reading a slice costs only the pages it touches, and any float
dtype (float32, float16, bfloat16: TinyLlama ships bfloat16) comes out as
float32. A file on a bucket (`gs://...`) is read through epath: its header in
one ranged request, then each tensor in one ranged request when it is wanted,
so reading a few tensors of a large file does not fetch the rest. A PyTorch
file's tensor is read whole when it is wanted (its zip record), never the whole
file at once. Writes the same layout shard by shard, header first, then each
tensor as it is produced, so a converted model never needs a second full copy
in host memory (local or on a bucket).

File format: 8-byte little-endian header size N, N bytes of JSON
{key: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}},
then the raw little-endian bytes, offsets relative to the end of the header.
`read_header` checks all of it before anything is mapped, so a truncated,
corrupted or mislabelled file (an .npz renamed .safetensors) is one
`FileFormatError` naming the file and the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np
from etils import epath

from monoformer_jax import torch_files
from monoformer_jax.errors import ConfigError, FileFormatError, MissingPathError
from monoformer_jax.paths import file_size, is_local, read_range

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {
  "F64": np.dtype("<f8"),
  "F32": np.dtype("<f4"),
  "F16": np.dtype("<f2"),
  "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype("<i8"),
  "I32": np.dtype("<i4"),
  "I16": np.dtype("<i2"),
  "I8": np.dtype("i1"),
  "U8": np.dtype("u1"),
  "BOOL": np.dtype("?"),
}


# safetensors' own limit on the JSON header; a larger "size" means another format.
MAX_HEADER_BYTES = 100_000_000
# Bytes read at once from the start of a file: the size and, for most models, the
# whole header (TinyLlama's is ~20 KB), so a bucket sees one request, not three.
_FIRST_READ = 1 << 16
_CONVERT_FIX = (
  "convert it to safetensors (safetensors.numpy.save_file or "
  "safetensors.torch.save_file) or pass the real .safetensors file"
)


def _what_it_is(head: bytes) -> str:
  """A guess at the format of a file that is not safetensors, from its first bytes."""
  if head.startswith(b"PK\x03\x04"):
    return "a zip archive (an .npz, or a PyTorch .pt/.bin)"
  if head[:1] == b"\x80":
    return "a pickle (a PyTorch .bin/.pt?)"
  if head.startswith(b"\x93NUMPY"):
    return "a NumPy .npy file"
  if head.startswith(b"\x89HDF"):
    return "an HDF5 file (Keras .h5?)"
  return "some other format"


def _json_loads_unique(text: str, where: str):
  """json.loads that refuses a key given twice (the last would silently win)."""

  def pairs(items):
    out = {}
    for key, value in items:
      if key in out:
        raise FileFormatError(
          f"{where}: key {key!r} appears twice; the file is corrupted or hand-edited: re-export it"
        )
      out[key] = value
    return out

  return json.loads(text, object_pairs_hook=pairs)


def read_json_object(path: str, what: str = "a JSON file") -> dict:
  """The JSON object in `path`; `FileFormatError` naming the file (and line/column) if
  it is not UTF-8, not JSON, or not an object. `what` says what the file should be."""
  path = os.fspath(path)
  blob = epath.Path(path).read_bytes()
  try:
    value = json.loads(blob.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise FileFormatError(
      f"{path} is not UTF-8 text ({e.reason} at byte {e.start}), so not {what}; pass the right file"
    ) from None
  except json.JSONDecodeError as e:
    raise FileFormatError(
      f"{path} is not valid JSON ({e.msg} at line {e.lineno} column "
      f"{e.colno}); fix or re-download {what}"
    ) from None
  if not isinstance(value, dict):
    raise FileFormatError(
      f"{path} holds a JSON {type(value).__name__}, expected an object "
      f"({what}); pass the right file"
    )
  return value


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: str) -> tuple[dict, dict, int]:
  """(tensor entries, metadata, data start) of a safetensors file, checked.

  Every check runs before anything is mapped or reshaped, so a broken, truncated
  or mislabelled file gives one `FileFormatError` naming the file and the tensor.
  """
  size = file_size(path)
  first = read_range(path, 0, min(size, _FIRST_READ if not is_local(path) else 4096))
  head = first[:8]
  if len(head) < 8:
    raise FileFormatError(
      f"{path} is truncated: expected at least 8 bytes (the header size), found {size}; "
      "re-download or re-copy it"
    )
  (n,) = struct.unpack("<Q", head)
  peek = first[8 : 8 + min(n, 16)]
  if n == 0:
    raise FileFormatError(
      f"{path}: its header size (first 8 bytes) is 0, so it is not a "
      f"safetensors file (it looks like {_what_it_is(head)}); "
      f"{_CONVERT_FIX}"
    )
  if n > MAX_HEADER_BYTES or (8 + n > size and peek and not peek.startswith(b"{")):
    raise FileFormatError(
      f"{path} is not a safetensors file: its first 8 bytes give a header size of {n} "
      f"bytes (limit {MAX_HEADER_BYTES}, file {size} bytes); it looks like "
      f"{_what_it_is(head)}; {_CONVERT_FIX}"
    )
  if 8 + n > size:
    raise FileFormatError(
      f"{path} is truncated inside its header: expected at least {8 + n} bytes "
      f"(8 + a {n}-byte header), found {size}; re-download or re-copy it"
    )
  blob = first[8 : 8 + n]
  if len(blob) < n:
    blob += read_range(path, len(first), 8 + n - len(first))
  try:
    text = blob.decode("utf-8")
  except UnicodeDecodeError as e:
    raise FileFormatError(
      f"{path}: its {n}-byte header is not UTF-8 ({e.reason} at byte "
      f"{8 + e.start}): it looks like {_what_it_is(head)}, or is corrupted; "
      f"{_CONVERT_FIX}"
    ) from None
  try:
    header = _json_loads_unique(text, f"{path}: header")
  except json.JSONDecodeError as e:
    raise FileFormatError(
      f"{path}: its {n}-byte header is not valid JSON ({e.msg} at line "
      f"{e.lineno} column {e.colno}): the file is corrupted or not a "
      f"safetensors file; {_CONVERT_FIX}"
    ) from None
  if not isinstance(header, dict):
    raise FileFormatError(
      f"{path}: its header is a JSON {type(header).__name__}, expected an "
      "object {name: {dtype, shape, data_offsets}}; the file is corrupted "
      f"or not a safetensors file; {_CONVERT_FIX}"
    )
  metadata = header.pop("__metadata__", None)
  if metadata is None:
    metadata = {}
  if not (
    isinstance(metadata, dict)
    and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
  ):
    raise FileFormatError(
      f"{path}: its __metadata__ {str(metadata)[:200]} is not an object of "
      "strings to strings, as the safetensors format requires; re-export it"
    )
  data_size = size - (8 + n)
  for key, e in header.items():
    where = f"{path}: tensor {key!r}"
    if not isinstance(e, dict):
      raise FileFormatError(
        f"{where}: its header entry is {str(e)[:200]}, expected an object "
        "{dtype, shape, data_offsets}; the file is corrupted"
      )
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in e]
    if missing:
      raise FileFormatError(
        f"{where}: its header entry has no {', '.join(missing)} "
        f"(has {sorted(e)}); the file is corrupted"
      )
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
      raise FileFormatError(
        f"{where} has dtype {dtype!r}, which this reader does not know "
        f"(known: {', '.join(sorted(_DTYPES))}); convert it to one of them"
      )
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
      raise FileFormatError(
        f"{where} has shape {str(shape)[:200]}, expected a list of "
        "non-negative ints; the file is corrupted"
      )
    if not (
      isinstance(offsets, list)
      and len(offsets) == 2
      and all(map(_is_int, offsets))
      and 0 <= offsets[0] <= offsets[1]
    ):
      raise FileFormatError(
        f"{where} has data_offsets {str(offsets)[:200]}, expected "
        "[begin, end] ints with 0 <= begin <= end; the file is corrupted"
      )
    begin, end = offsets
    want = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - begin != want:
      raise FileFormatError(
        f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but shape "
        f"{shape} of {dtype} needs {want}; the header is corrupted: re-export the file"
      )
  past = sorted(
    (e["data_offsets"][1], key) for key, e in header.items() if e["data_offsets"][1] > data_size
  )
  if past:
    last = past[-1][0]
    names = ", ".join(repr(k) for _, k in past[:5]) + (" ..." if len(past) > 5 else "")
    raise FileFormatError(
      f"{path} is truncated: {len(past)} tensor(s) end past its last byte ({names}); "
      f"expected at least {8 + n + last} bytes (8 + {n}-byte header + {last} of data), "
      f"found {size}; re-download or re-copy it"
    )
  spans = sorted(
    (e["data_offsets"][0], e["data_offsets"][1], key)
    for key, e in header.items()
    if e["data_offsets"][1] > e["data_offsets"][0]
  )
  for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
    if b1 < e0:
      raise FileFormatError(
        f"{path}: tensors {k0!r} (bytes [{b0}, {e0}]) and {k1!r} (bytes [{b1}, {e1}]) "
        "overlap; the header is corrupted: re-export the file"
      )
  return header, metadata, 8 + n


class SafetensorsFile:
  """One `.safetensors` file: its header (checked, see `read_header`), and
  lazy views of its tensors (local), or each tensor read when asked (a bucket)."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    self.entries, self.metadata, self._start = read_header(self.path)
    self._map = None
    if is_local(self.path):
      size = os.path.getsize(self.path)
      # One read-only map for the whole file; tensors are views into it.
      self._map = (
        np.memmap(self.path, dtype=np.uint8, mode="r")
        if size > self._start
        else np.zeros(size, np.uint8)
      )

  def keys(self) -> list[str]:
    return list(self.entries)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self.entries[key]["shape"])

  def numpy_dtype(self, key: str) -> np.dtype:
    return _DTYPES[self.entries[key]["dtype"]]

  def view(self, key: str) -> np.ndarray:
    """The tensor `key` in its stored dtype, read-only: a lazy view of the map
    (local), or its bytes fetched in one ranged read (a bucket)."""
    e = self.entries[key]
    begin, end = e["data_offsets"]
    if self._map is None:
      raw = np.frombuffer(read_range(self.path, self._start + begin, end - begin), np.uint8)
      if raw.size != end - begin:
        raise FileFormatError(
          f"{self.path}: tensor {key!r} came back with {raw.size} of {end - begin} bytes "
          "(the file changed while read?); copy it again"
        )
    else:
      raw = self._map[self._start + begin : self._start + end]
    return raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a Hugging Face folder holds weights of one format: the index names
  (shards), the single-file names, and the suffix of any one file."""

  what: str
  suffixes: tuple[str, ...]
  indexes: tuple[str, ...]
  singles: tuple[str, ...]


SAFETENSORS = Layout(
  "safetensors",
  (".safetensors",),
  (INDEX_NAME, "diffusion_pytorch_model.safetensors.index.json"),
  (SINGLE_NAME, "diffusion_pytorch_model.safetensors"),
)
TORCH = Layout(
  "PyTorch",
  (".bin", ".pt", ".pth"),
  ("pytorch_model.bin.index.json", "diffusion_pytorch_model.bin.index.json"),
  ("pytorch_model.bin", "diffusion_pytorch_model.bin"),
)
LAYOUTS = (SAFETENSORS, TORCH)  # a folder holding both is read as the first


@dataclasses.dataclass(frozen=True)
class Found:
  """The weights a path names: their layout, files, and the index that listed them."""

  layout: Layout
  files: list[str]
  index: str | None = None


def _expected() -> str:
  return (
    f"expected {SINGLE_NAME}, a single .safetensors file or shards listed by {INDEX_NAME}; "
    f"else PyTorch files: {TORCH.singles[0]}, a single .bin/.pt/.pth file or shards listed "
    f"by {TORCH.indexes[0]}"
  )


def _in_folder(path: str, layout: Layout) -> Found | None:
  """The weights of `layout` in folder `path`; None when it holds none of them."""
  where = epath.Path(path)
  for name in layout.indexes:
    if (where / name).exists():
      index = os.path.join(path, name)
      return Found(layout, _files_of_index(index), index)
  for name in layout.singles:
    if (where / name).exists():
      return Found(layout, [os.path.join(path, name)])
  found = sorted(f.name for f in where.iterdir() if f.name.endswith(layout.suffixes))
  if not found:
    return None
  if len(found) == 1:
    return Found(layout, [os.path.join(path, found[0])])
  raise MissingPathError(
    f"{path} holds {len(found)} {layout.what} files {found[:5]} and no "
    f"{' or '.join(layout.indexes)}: {_expected()}"
  )


def find_weights(path: str) -> Found:
  """The weights files that `path` names: a file (a .safetensors, a PyTorch
  .bin/.pt/.pth, or an index .json), or a folder holding safetensors (read
  first) or else PyTorch files. One-line errors name the path and what was expected."""
  path = os.fspath(path)
  where = epath.Path(path)
  if where.is_file():
    if path.endswith(".json"):
      shards = _files_of_index(path)
      layout = next((x for x in LAYOUTS if all(f.endswith(x.suffixes) for f in shards)), None)
      if layout is None:
        raise FileFormatError(
          f"{path} lists shards {[os.path.basename(f) for f in shards][:5]} that are neither "
          "all .safetensors nor all PyTorch .bin/.pt/.pth files; re-download it"
        )
      return Found(layout, shards, path)
    for layout in LAYOUTS:
      if path.endswith(layout.suffixes):
        return Found(layout, [path])
    raise FileFormatError(
      f"{path} is not a weights file; pass a .safetensors file, a PyTorch .bin/.pt/.pth "
      f"file, or a folder of weights ({_expected()})"
    )
  if not where.is_dir():
    raise MissingPathError(f"weights path {path!r} does not exist")
  for layout in LAYOUTS:
    found = _in_folder(path, layout)
    if found is not None:
      return found
  raise MissingPathError(f"{path} holds no weights: {_expected()}")


def find_files(path: str) -> list[str]:
  """The weights files that `path` (a file or a folder) names; see `find_weights`."""
  return find_weights(path).files


def read_index(index_path: str) -> dict[str, str]:
  """The weight_map {tensor: shard file name} of an index (`model.safetensors.index.json`,
  `pytorch_model.bin.index.json`: one format), checked."""
  blob = epath.Path(index_path).read_bytes()
  try:
    index = _json_loads_unique(blob.decode("utf-8"), index_path)
  except UnicodeDecodeError as e:
    raise FileFormatError(
      f"{index_path} is not a weights index: not UTF-8 text ({e.reason} "
      f"at byte {e.start}); pass the folder or a weights file"
    ) from None
  except json.JSONDecodeError as e:
    raise FileFormatError(
      f"{index_path} is not valid JSON ({e.msg} at line {e.lineno} column "
      f"{e.colno}); re-download it, or delete it if the folder holds a "
      f"single weights file"
    ) from None
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not weight_map:
    raise FileFormatError(f"{index_path} has no 'weight_map'; is it a weights index?")
  if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
    raise FileFormatError(
      f"{index_path}: its 'weight_map' is not an object of tensor names to "
      "shard file names; re-download it"
    )
  return weight_map


def _files_of_index(index_path: str) -> list[str]:
  weight_map = read_index(index_path)
  folder = os.path.dirname(index_path)
  files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
  missing = [f for f in files if not epath.Path(f).exists()]
  if missing:
    raise MissingPathError(f"{index_path} lists shards that are not there: {missing}")
  return files


# numpy dtype -> safetensors' name for it: what `dtype(key)` says for either format
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class WeightsSource:
  """Tensors by key over one file or a set of shards; `read` gives float32.

  `found`: the files (see `find_weights`); `open_file(path)` opens one of them
  as an object with `path`, `keys()`, `shape(key)`, `numpy_dtype(key)`,
  `view(key)` (the tensor in its stored dtype) and `close()`.
  """

  def __init__(self, path: str, found: Found, open_file):
    self.path = os.fspath(path)
    self.layout = found.layout
    self.files = []
    self._where: dict = {}
    try:
      for p in found.files:
        self.files.append(open_file(p))
      for f in self.files:
        for key in f.keys():
          if key in self._where:
            raise FileFormatError(
              f"tensor {key!r} is in both {self._where[key].path} and "
              f"{f.path}; pass one set of shards"
            )
          self._where[key] = f
      if found.index:
        listed = set(read_index(found.index))
        if listed != set(self._where):
          raise FileFormatError(
            f"{found.index} does not match its shards: listed but absent "
            f"{sorted(listed - set(self._where))[:5]}, present but unlisted "
            f"{sorted(set(self._where) - listed)[:5]}"
          )
    except BaseException:
      self.close()
      raise

  def keys(self) -> list[str]:
    return list(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._where[key].shape(key))

  def dtype(self, key: str) -> str:
    """The stored dtype as safetensors names it ('F32', 'BF16', 'F16', 'I64', ...),
    for a PyTorch file too."""
    dtype = np.dtype(self._where[key].numpy_dtype(key))
    return _DTYPE_NAMES.get(dtype, dtype.name)

  def view(self, key: str) -> np.ndarray:
    """The whole tensor in its stored dtype: a read-only view of a safetensors
    map, or a PyTorch file's tensor read out."""
    return self._where[key].view(key)

  def read(self, key: str, index: tuple = ()) -> np.ndarray:
    """float32 copy of `tensor[index]` (a tuple of slices); from safetensors,
    reads only that part."""
    return np.array(self._where[key].view(key)[index], dtype=np.float32)

  def close(self):
    for f in self.files:
      getattr(f, "close", lambda: None)()
    self.files, self._where = [], {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class SafetensorsSource(WeightsSource):
  """The safetensors weights that `path` names (a file, an index, a folder)."""

  def __init__(self, path: str):
    found = find_weights(path)
    if found.layout is not SAFETENSORS:
      raise FileFormatError(
        f"{path} holds PyTorch weights, not safetensors; open it with open_weights"
      )
    super().__init__(path, found, SafetensorsFile)


def open_weights(path: str, *, hint: str = "") -> WeightsSource:
  """The weights at `path` (a file, an index .json, or a folder), whatever
  their format: safetensors when the folder holds them, else PyTorch files
  (`pytorch_model.bin`, `diffusion_pytorch_model.bin`, shards listed by
  `pytorch_model.bin.index.json`, a single .bin/.pt/.pth), read without
  torch. `hint` ends a PyTorch file's errors (which flag to pass)."""
  found = find_weights(path)
  if found.layout is SAFETENSORS:
    return WeightsSource(path, found, SafetensorsFile)
  return WeightsSource(path, found, lambda p: torch_files.TorchFile(p, hint=hint))


def parse_size(size: str | int) -> int:
  """Bytes in '5GB', '500MB', '10KB' (powers of 1000, as Hugging Face) or an int."""
  if isinstance(size, int):
    value = size
  else:
    s, scale = size.strip().upper(), 1
    for unit, unit_scale in (
      ("GIB", 2**30),
      ("MIB", 2**20),
      ("KIB", 2**10),
      ("GB", 10**9),
      ("MB", 10**6),
      ("KB", 10**3),
      ("B", 1),
    ):
      if s.endswith(unit):
        s, scale = s[: -len(unit)], unit_scale
        break
    try:
      value = int(float(s) * scale)
    except ValueError:
      value = None
  if value is None or value < 1:
    raise ConfigError(f"size {size!r}: give a positive size such as 5GB, 500MB or 10KB")
  return value


def write_safetensors(
  folder: str,
  shapes: Sequence[tuple[str, tuple[int, ...]]],
  produce: Callable[[str], np.ndarray],
  *,
  max_shard_bytes: int,
  on_tensor: Callable[[str], None] = lambda key: None,
) -> list[str]:
  """Writes float32 tensors `shapes` ([(key, shape)], in file order) to `folder`.

  `produce(key)` is called once per tensor, in order, just before it is written
  (then `on_tensor(key)`, e.g. to advance a progress bar).
  One file `model.safetensors` if everything fits in `max_shard_bytes`, else
  `model-0000k-of-0000n.safetensors` shards and `model.safetensors.index.json`
  (Hugging Face's names). `folder` may be on a bucket (`gs://...`). Returns
  the file names written.
  """
  epath.Path(folder).mkdir(parents=True, exist_ok=True)
  shards, size = [[]], 0
  for key, shape in shapes:
    nbytes = 4 * int(np.prod(shape, dtype=np.int64))
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((key, tuple(shape)))
    size += nbytes
  n = len(shards)
  names = (
    [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  )
  total = 0
  for name, shard in zip(names, shards):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shard:
      nbytes = 4 * int(np.prod(shape, dtype=np.int64))
      header[key] = {
        "dtype": "F32",
        "shape": list(shape),
        "data_offsets": [offset, offset + nbytes],
      }
      offset += nbytes
    total += offset
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps the data 8-byte aligned, as the spec advises
    # On a bucket each file is one object, there only once it is whole (no partial
    # shard is ever seen), streamed up as it is written.
    with epath.Path(folder, name).open("wb") as f:
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
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    epath.Path(folder, INDEX_NAME).write_text(json.dumps(index, indent=2))
  return names
