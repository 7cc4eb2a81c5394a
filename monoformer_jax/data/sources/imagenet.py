"""ImageNet (ILSVRC2012): class-conditional SD-VAE latents of its images.

    python -m monoformer_jax.data.prepare imagenet --input_dir=DIR --vae=SD_VAE \
        --output_dir=OUT [--image_size=256] [--flip] [--splits=train,val]

--input_dir is the extracted layout, train/<wnid>/*.JPEG and val/<wnid>/...,
or TFDS's imagenet2012 manual folder with ILSVRC2012_img_train.tar / _val.tar
(local or `gs://...`), read in place: nothing is extracted. A pass over the
tars' headers (the training tar's 1000 class tars, each read in place too;
on a pod each host reads its share of them and the hosts exchange what they
found, beside the chunks) finds each image's byte range, and each host reads
only the ranges of the images of its own chunks (data/encode.py). A record is a latent
record (sources/latents.py) with `label` int64 (the wnid's index among the
1000 sorted ILSVRC2012 wnids) and `wnid`; its examples prompt the reference's
templates with the class name (data/prompts.py), dropped with probability
data.cfg_drop_prob for guidance.
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import json
import os
import tarfile
from collections.abc import Sequence

import jax
from absl import logging
from etils import epath

from monoformer_jax.data import pipeline, prompts
from monoformer_jax.data.encode import ImageItem
from monoformer_jax.data.sources import DataSource, PrepareArgs, Prepared, latents
from monoformer_jax.errors import FileFormatError, MissingPathError, PathError
from monoformer_jax.layout import Example
from monoformer_jax.paths import file_size, is_local, read_range, whole_file

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")  # matched case-insensitively
CLASSES_FILE = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "imagenet_classes.tsv"
)
NUM_IMAGENET_CLASSES = 1000


class ImageNet(DataSource):
  name = "imagenet"
  class_noun = "ImageNet class"
  uncompressed = True

  def class_names(self) -> tuple[str, ...]:
    return _class_names()

  def features(self, *, latent_shape=None, flip: bool = False) -> dict:
    import numpy as np
    import tensorflow_datasets as tfds

    f = tfds.features
    return latents.features(latent_shape, flip, label=f.Scalar(dtype=np.int64), wnid=f.Text())

  def prepare(self, args: PrepareArgs, output_dir: str) -> Prepared:
    vae, _ = latents.load_encoder(self.name, args)
    source = args.input_dir
    tars = has_imagenet_archives(source)  # TFDS's imagenet2012 manual_dir: read in place
    if tars:
      present = [
        s for s in args.splits if s in ARCHIVES and (epath.Path(source) / ARCHIVES[s]).is_file()
      ]
    else:
      present = [s for s in args.splits if os.path.isdir(os.path.join(source, s))]
    if not present:
      raise MissingPathError(
        f"--input_dir={args.input_dir!r} has none of the split folders "
        f"{list(args.splits)}; expected {args.input_dir}/train/<wnid>/"
        f"*.JPEG or the tars {TRAIN_ARCHIVE} / {VAL_ARCHIVE}"
      )
    absent = [s for s in args.splits if s not in present]
    if absent:  # a misspelt --splits would otherwise be dropped without a word
      what = "tar" if tars else "split folder"
      logging.warning(
        "imagenet: no %s %s under %s; preparing %s only", what, absent, source, present
      )
    if not tars:
      items = {s: imagenet_items(source, s) for s in present}
      return latents.encode_splits(self.name, items, vae, args, output_dir)
    items, broken = {}, {}
    for split in present:
      share = os.path.join(output_dir, "_encoded", self.name, split)  # beside its chunks
      items[split], broken[split] = imagenet_tar_items(source, split, share)
      logging.info("imagenet/%s: %d images in %s", split, len(items[split]), source)
    return latents.encode_splits(self.name, items, vae, args, output_dir, unreadable=broken)

  def examples(self, config, tokenizer, seed: int, directory: str | None = None):
    records = latents.checked_records(self, config, directory)
    to_example = imagenet_example(self.class_names(), tokenizer, **latents.options(config))
    return pipeline.record_stream(records, to_example, seed)


SOURCE = ImageNet()


def imagenet_example(
  class_names: Sequence[str], tokenizer, *, drop_prob: float, sample: bool, flip: bool
):
  """record -> Example: the record's class prompt and its training latent."""

  def to_example(record, rng) -> Example:
    prompt = prompts.training_prompt(class_names[int(record["label"])], rng, drop_prob)
    return prompts.image_example(
      prompt, latents.latent_of(record, rng, sample=sample, flip=flip), tokenizer
    )

  return to_example


@functools.lru_cache(maxsize=1)
def _class_names() -> tuple[str, ...]:
  return tuple(name for _, name in imagenet_classes())


# ------------------------------------------------------------------- readers


@functools.cache
def _classes() -> tuple[tuple[str, str], ...]:
  try:
    with open(CLASSES_FILE, encoding="utf-8") as f:
      rows = [tuple(line.rstrip("\n").split("\t")) for line in f if line.strip()]
  except FileNotFoundError as e:
    raise MissingPathError(
      f"{CLASSES_FILE} is missing: the package was installed without "
      "its data files; reinstall it (pip install -e .)"
    ) from e
  if (
    len(rows) != NUM_IMAGENET_CLASSES
    or any(len(r) != 2 for r in rows)
    or [r[0] for r in rows] != sorted({r[0] for r in rows})
  ):
    raise FileFormatError(
      f"{CLASSES_FILE} must hold {NUM_IMAGENET_CLASSES} lines "
      "'wnid<TAB>name' with unique wnids in sorted order; restore it "
      "from the repository"
    )
  return tuple(rows)


def imagenet_classes() -> list[tuple[str, str]]:
  """The 1000 ILSVRC2012 classes (wnid, name) in label order (sorted wnids);
  the names are the reference MonoFormer's prompts (data/imagenet_labels.json)."""
  return list(_classes())


@functools.cache
def _label_of() -> dict[str, int]:
  return {wnid: i for i, (wnid, _) in enumerate(_classes())}


def _is_image_name(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def imagenet_items(input_dir, split: str) -> list[ImageItem]:
  """The images of `input_dir/<split>/<wnid>/*.JPEG` (.jpeg/.jpg/.png too), sorted.

  Keys are `<wnid>/<file name>`; fields `label` (the wnid's index among the
  1000 sorted ILSVRC2012 wnids) and `wnid`. A subset of the classes is fine.
  """
  root = os.path.join(os.fspath(input_dir), split)
  extensions = "/".join(IMAGE_EXTENSIONS)
  if not os.path.exists(root):
    raise MissingPathError(
      f"ImageNet split folder {root} is not there: expected the extracted layout "
      f"{os.path.join(os.fspath(input_dir), split, '<wnid>', '*.JPEG')}; check the input "
      f"folder and the split name {split!r} (e.g. 'train' or 'val')"
    )
  if not os.path.isdir(root):
    raise PathError(f"ImageNet split path {root} is a file, not a folder of <wnid> folders")
  names = sorted(os.listdir(root))
  folders = [n for n in names if os.path.isdir(os.path.join(root, n))]
  loose = [n for n in names if _is_image_name(n) and n not in folders]
  if loose:
    raise PathError(
      f"ImageNet split folder {root} holds {len(loose)} images directly (e.g. {loose[0]}); "
      "they must be sorted into one folder per class, <wnid>/ (for the validation set, "
      "move each image into the folder of its ground-truth wnid)"
    )
  if not folders:
    raise PathError(
      f"ImageNet split folder {root} is empty: expected one folder per class "
      "(n01440764/, ...); extract the images into it"
    )
  label_of = _label_of()
  items = []
  for wnid in folders:
    if wnid not in label_of:
      raise PathError(
        f"folder {os.path.join(root, wnid)} is not an ILSVRC2012 class: {wnid!r} is not "
        f"one of the {len(label_of)} known wnids ({CLASSES_FILE}); move it out of {root}"
      )
    folder = os.path.join(root, wnid)
    files = sorted(
      n for n in os.listdir(folder) if _is_image_name(n) and os.path.isfile(os.path.join(folder, n))
    )
    if not files:
      raise PathError(
        f"class folder {folder} has no images ({extensions}, any case); an "
        "interrupted extraction? Extract it again or remove the folder"
      )
    items.extend(
      ImageItem(
        key=f"{wnid}/{name}",
        path=os.path.join(folder, name),
        fields={"label": label_of[wnid], "wnid": wnid},
      )
      for name in files
    )
  return items


TRAIN_ARCHIVE = "ILSVRC2012_img_train.tar"
VAL_ARCHIVE = "ILSVRC2012_img_val.tar"
ARCHIVES = {"train": TRAIN_ARCHIVE, "val": VAL_ARCHIVE}


def has_imagenet_archives(folder) -> bool:
  """Whether `folder` (local or `gs://...`) holds the ILSVRC2012 tars (TFDS's
  imagenet2012 manual_dir)."""
  return any((epath.Path(folder) / name).is_file() for name in ARCHIVES.values())


def _validation_wnids() -> list[str]:
  """The ground-truth wnid of each validation image, in sorted file-name order
  (the list TFDS ships for its imagenet2012 builder)."""
  import tensorflow_datasets

  path = os.path.join(
    os.path.dirname(tensorflow_datasets.__file__),
    "datasets",
    "imagenet2012",
    "validation_labels.txt",
  )
  with open(path) as f:
    return f.read().strip().splitlines()


# Bytes a header read fetches: where headers are dense (a class tar's, the
# validation tar's: one per ~110 kB image) a bucket is read in large sequential
# blocks, as a ranged request costs far more in latency than its bytes; the
# training tar's 1000 headers lie ~140 MB apart, and a local disk seeks cheaply:
# there a read takes the header alone.
_SMALL_BLOCK, _LARGE_BLOCK = 4 << 10, 16 << 20  # 4 kB: a header and the byte before it


class _Window(io.RawIOBase):
  """Bytes [start, start + size) of the file `path` (local or on a bucket) as a
  file of their own, read `block` bytes at a time by paths.read_range (the
  last block kept): a tar, or a tar inside a tar, read in place."""

  def __init__(self, path: str, start: int, size: int, block: int):
    self._path, self._start, self._size, self._block = path, start, size, block
    self._pos, self._at, self._data = 0, 0, b""

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def tell(self) -> int:
    return self._pos

  def seek(self, pos: int, whence: int = 0) -> int:
    self._pos = max(0, pos + (0, self._pos, self._size)[whence])
    return self._pos

  def readinto(self, buffer) -> int:
    """Fills `buffer` (tarfile takes a short header read for a cut file),
    short only where the window or the file ends."""
    done = 0
    while done < len(buffer) and self._pos < self._size:
      if not self._at <= self._pos < self._at + len(self._data):
        self._at = self._pos
        want = min(max(self._block, len(buffer) - done), self._size - self._pos)
        self._data = read_range(self._path, self._start + self._pos, want)
        if not self._data:  # the file ends before the window does
          break
      piece = self._data[self._pos - self._at : self._pos - self._at + len(buffer) - done]
      buffer[done : done + len(piece)] = piece
      done += len(piece)
      self._pos += len(piece)
    return done


def _members(
  path: str, start: int, size: int, where: str, block: int
) -> tuple[list[tarfile.TarInfo], list]:
  """The regular files of the tar `where` that is bytes [start, start + size) of
  the file `path` (its headers, `block` bytes a read: data is skipped), their
  `offset_data` made absolute, as ([complete member], [(name, reason)] of what
  is cut short: a tar cut short keeps the files before the cut, and lists the
  file the cut falls in, or itself when cut between files). tarfile.ReadError
  when not even its first header reads."""
  end, members, error = start + size, [], None
  with tarfile.open(fileobj=_Window(path, start, size, block), mode="r:") as tar:
    try:
      for m in tar:  # one header at a time: a cut keeps what came before it
        if m.isfile():
          members.append(m)
    except tarfile.TarError as e:
      error = e
  for m in members:
    m.offset_data += start
  cut = [(f"{where}/{m.name}", _CUT) for m in members if m.offset_data + m.size > end]
  if error and not cut:
    cut = [(where, f"cut short after {len(members)} files ({error}); download it again")]
  return [m for m in members if m.offset_data + m.size <= end], cut


_CUT = "the archive ends inside it (cut short); download it again"


def _outer_members(tar_path: str, block: int) -> tuple[list[tarfile.TarInfo], list]:
  """The complete files of the tar `tar_path` and [(name, reason)] of what is cut short."""
  try:
    members, cut = _members(tar_path, 0, file_size(tar_path), tar_path, block)
  except tarfile.TarError as e:
    raise FileFormatError(
      f"{tar_path} is not a tar file ({e}); download the ILSVRC2012 tar again"
    ) from e
  return members, [(name.replace(f"{tar_path}/", f"{tar_path}:"), why) for name, why in cut]


def _train_members(tar_path: str, share_dir: str | None = None) -> tuple[list, list]:
  """([(wnid, name, offset, size)] of the images in ILSVRC2012_img_train.tar's
  class tars; [(name, reason)] of class tars, or their images, that cannot be
  read). The class tars are read in parallel threads; on several hosts with a
  `share_dir` they all can read and write (a bucket), host h reads the class
  tars i % process_count == h and the hosts exchange what they found there."""
  members, broken = _outer_members(tar_path, _SMALL_BLOCK)
  block = _SMALL_BLOCK if is_local(tar_path) else _LARGE_BLOCK
  classes = [m for m in members if m.name.endswith(".tar")]
  label_of = _label_of()
  for m in classes:
    wnid = os.path.basename(m.name)[: -len(".tar")]
    if wnid not in label_of:
      raise PathError(
        f"{tar_path} holds {m.name}, which is not an ILSVRC2012 class: {wnid!r} is not one "
        f"of the {len(label_of)} known wnids ({CLASSES_FILE}); is it ILSVRC2012_img_train.tar?"
      )

  def scan(member):
    """(the images of one class tar, [(name, reason)] of what cannot be read)."""
    wnid, where = os.path.basename(member.name)[: -len(".tar")], f"{tar_path}:{member.name}"
    try:
      inner, cut = _members(tar_path, member.offset_data, member.size, where, block)
    except tarfile.TarError as e:
      return [], [(where, f"not a tar file ({e}); none of its images are encoded")]
    cut = [(n, why) for n, why in cut if n == where or _is_image_name(os.path.basename(n))]
    if not cut and not any(_is_image_name(os.path.basename(m.name)) for m in inner):
      cut = [(where, f"holds no images ({'/'.join(IMAGE_EXTENSIONS)}, any case)")]
    return [(wnid, f"{member.name}/{m.name}", m.offset_data, m.size) for m in inner], cut

  count, index = jax.process_count(), jax.process_index()
  shared = share_dir is not None and count > 1
  with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
    scanned = list(pool.map(scan, classes[index::count] if shared else classes))
  found = [f for part, _ in scanned for f in part]
  cut = [b for _, part in scanned for b in part]
  if shared:
    found, cut = _exchange(share_dir, (found, cut), index, count)
  return found, broken + sorted(cut)


def _exchange(share_dir: str, mine: tuple[list, list], index: int, count: int):
  """Every host's (found, cut) of the class tars, concatenated: each writes
  its own as one object of `share_dir`, waits for the others, reads them all."""
  from jax.experimental import multihost_utils

  def name(h: int) -> str:
    return f"{share_dir.rstrip('/')}/tar_index.{h:05d}-of-{count:05d}.json"

  epath.Path(share_dir).mkdir(parents=True, exist_ok=True)
  with whole_file(name(index)) as f:
    f.write(json.dumps(dict(found=mine[0], cut=mine[1])).encode())
  multihost_utils.sync_global_devices(f"imagenet tar index in {share_dir}")
  found, cut = [], []
  for h in range(count):
    part = json.loads(epath.Path(name(h)).read_text())
    found += [tuple(f) for f in part["found"]]
    cut += [tuple(b) for b in part["cut"]]
  return found, cut


def _val_members(tar_path: str) -> tuple[list, list]:
  """([(wnid, name, offset, size)] of ILSVRC2012_img_val.tar: flat images, labelled in
  sorted name order by the list TFDS ships; [(name, reason)] of what is cut short)."""
  labels = _validation_wnids()
  members, broken = _outer_members(tar_path, _SMALL_BLOCK if is_local(tar_path) else _LARGE_BLOCK)
  members = sorted(members, key=lambda m: m.name)
  if len(members) > len(labels):
    raise FileFormatError(
      f"{tar_path} holds {len(members)} files but the validation labels list "
      f"{len(labels)}; is it ILSVRC2012_img_val.tar?"
    )
  return [(wnid, m.name, m.offset_data, m.size) for wnid, m in zip(labels, members)], broken


def imagenet_tar_items(
  input_dir, split: str, share_dir: str | None = None
) -> tuple[list[ImageItem], list[tuple[str, str]]]:
  """(the images of the split's ILSVRC2012 tar in `input_dir` (local or
  `gs://...`) as items read in place by byte range; [(name, reason)] of class
  tars, or images, that cannot be read, so give no item). The items equal
  `imagenet_items` of the extracted layout: keys `<wnid>/<file name>`, the
  same fields, the same order. `share_dir`: a folder every host reads and
  writes, through which a pod's hosts share the reading of the class tars."""
  tar_path = str(epath.Path(input_dir) / ARCHIVES[split])
  try:
    if split == "train":
      found, broken = _train_members(tar_path, share_dir)
    else:
      found, broken = _val_members(tar_path)
  except OSError as e:  # gone, unreadable, or the bucket refused
    raise PathError(f"cannot read {tar_path} ({e}); check that it is there and readable") from e
  label_of = _label_of()
  items = [
    ImageItem(
      key=f"{wnid}/{os.path.basename(name)}",
      path=tar_path,
      fields={"label": label_of[wnid], "wnid": wnid},
      member=name,
      span=(offset, size),
    )
    for wnid, name, offset, size in found
    if _is_image_name(os.path.basename(name))
  ]
  return sorted(items, key=lambda item: item.key), broken
