"""ImageNet (ILSVRC2012): class-conditional SD-VAE latents of its images.

    python -m monoformer_jax.data.prepare imagenet --input_dir=DIR --vae=SD_VAE \
        --output_dir=OUT [--image_size=256] [--flip] [--splits=train,val]

--input_dir is the extracted layout, train/<wnid>/*.JPEG and val/<wnid>/...,
or TFDS's imagenet2012 manual folder with ILSVRC2012_img_train.tar / _val.tar,
which are extracted into that layout first (resumably). A record is a latent
record (sources/latents.py) with `label` int64 (the wnid's index among the
1000 sorted ILSVRC2012 wnids) and `wnid`; its examples prompt the reference's
templates with the class name (data/prompts.py), dropped with probability
data.cfg_drop_prob for guidance.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

from absl import logging
from tqdm import tqdm

from monoformer_jax.data import pipeline, prompts
from monoformer_jax.data.encode import ImageItem
from monoformer_jax.data.sources import DataSource, PrepareArgs, Prepared, latents
from monoformer_jax.errors import FileFormatError, MissingPathError, PathError
from monoformer_jax.layout import Example
from monoformer_jax.paths import is_local

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
    if has_imagenet_archives(source):  # TFDS's imagenet2012 manual_dir
      if not is_local(output_dir):  # the images are read back by file name: a local disk's
        raise PathError(
          f"--input_dir={source!r} holds the ILSVRC2012 tars, which are extracted under "
          f"--output_dir, and {output_dir!r} is a bucket; prepare into a local --output_dir, "
          "or extract the tars first and pass the extracted folder as --input_dir"
        )
      source = extract_imagenet_archives(source, os.path.join(output_dir, "_extracted", "imagenet"))
    present = [s for s in args.splits if os.path.isdir(os.path.join(source, s))]
    if not present:
      raise MissingPathError(
        f"--input_dir={args.input_dir!r} has none of the split folders "
        f"{list(args.splits)}; expected {args.input_dir}/train/<wnid>/"
        f"*.JPEG or the tars {TRAIN_ARCHIVE} / {VAL_ARCHIVE}"
      )
    absent = [s for s in args.splits if s not in present]
    if absent:  # a misspelt --splits would otherwise be dropped without a word
      logging.warning(
        "imagenet: no split folder %s under %s; preparing %s only", absent, source, present
      )
    items = {s: imagenet_items(source, s) for s in present}
    return latents.encode_splits(self.name, items, vae, args, output_dir)

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
_DONE = ".extracted"


def has_imagenet_archives(folder) -> bool:
  """Whether `folder` holds the ILSVRC2012 tars (TFDS's imagenet2012 manual_dir)."""
  return any(
    os.path.isfile(os.path.join(os.fspath(folder), name)) for name in (TRAIN_ARCHIVE, VAL_ARCHIVE)
  )


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


def _extract_members(tar, members, folder: str):
  """Writes the regular files `members` of the open `tar` into `folder`
  (flat: base names only, so no member can write outside it)."""
  os.makedirs(folder, exist_ok=True)
  for member in members:
    data = tar.extractfile(member)
    if data is None:
      continue
    with open(os.path.join(folder, os.path.basename(member.name)), "wb") as out:
      out.write(data.read())


def extract_imagenet_archives(manual_dir, output_dir) -> str:
  """The ILSVRC2012 tars of `manual_dir` unpacked into the folder layout that
  `imagenet_items` reads (`output_dir/train/<wnid>/`, `output_dir/val/<wnid>/`);
  returns `output_dir`. The training tar holds one tar per class; the
  validation tar holds flat images, sorted into their classes by the labels
  TFDS ships. Each class (and the validation set) is marked when complete,
  so an interrupted extraction resumes with the next class."""
  import tarfile

  manual_dir, output_dir = os.fspath(manual_dir), os.fspath(output_dir)
  train = os.path.join(manual_dir, TRAIN_ARCHIVE)
  if os.path.isfile(train):
    with tarfile.open(train, mode="r:") as outer:
      members = [m for m in outer.getmembers() if m.isfile() and m.name.endswith(".tar")]
      for member in tqdm(members, desc="extracting train classes", unit="class"):
        wnid = os.path.basename(member.name)[: -len(".tar")]
        folder = os.path.join(output_dir, "train", wnid)
        if os.path.exists(os.path.join(folder, _DONE)):
          continue
        with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
          _extract_members(inner, [m for m in inner.getmembers() if m.isfile()], folder)
        open(os.path.join(folder, _DONE), "w").close()
  val = os.path.join(manual_dir, VAL_ARCHIVE)
  done = os.path.join(output_dir, "val", _DONE)
  if os.path.isfile(val) and not os.path.exists(done):
    labels = _validation_wnids()
    with tarfile.open(val, mode="r:") as tar:
      members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
      if len(members) > len(labels):
        raise FileFormatError(
          f"{val} holds {len(members)} images but the validation "
          f"labels list {len(labels)}; is it ILSVRC2012_img_val.tar?"
        )
      for member, wnid in tqdm(list(zip(members, labels)), desc="extracting val", unit="image"):
        _extract_members(tar, [member], os.path.join(output_dir, "val", wnid))
    open(done, "w").close()
  if not (os.path.isfile(train) or os.path.isfile(val)):
    raise MissingPathError(f"{manual_dir} holds neither {TRAIN_ARCHIVE} nor {VAL_ARCHIVE}")
  return output_dir
