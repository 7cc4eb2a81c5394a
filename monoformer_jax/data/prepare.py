r"""Prepare a dataset for training: `python -m monoformer_jax.data.prepare NAME --flags`.

    imagenet       --input_dir=DIR (train/<wnid>/*.JPEG, val/<wnid>/..., or TFDS's
                   imagenet2012 manual tars ILSVRC2012_img_train.tar / _val.tar, which
                   are extracted first, resumably) --vae=SD_VAE [--image_size=256]
                   [--flip] [--splits=train,val]
    text_to_image  --input_dir=IMAGE_ROOT --annotations=FILE.jsonl (img_path, prompt,
                   optional caption: JourneyDB's) --vae=SD_VAE [--image_size=256] [--flip]
    chat           --input_dir=FILE.jsonl or a folder of them (UltraChat `data`, or
                   `messages` / ShareGPT `conversations`)
    text           --input_dir=FILE.jsonl ({"text": ...}) / .txt, or a folder of them
    llava          --input_dir=IMAGE_ROOT --annotations=llava_v1_5_mix665k.json (LLaVA's
                   list, or a JSONL of its records; "image" paths relative to IMAGE_ROOT):
                   the conversations and the image files' bytes, nothing encoded
    digits         the embedded default (no input; training prepares it on first use)

and `--output_dir=OUT` for all. Images are center-cropped as ADM/DiT do, then
encoded by the SD-VAE on every local device (each host of a pod its share:
run the same command on every host with --jax_distributed), in resumable
chunks under OUT/_encoded/: an interrupted run started again encodes only
what is missing. Files that cannot be read are skipped and listed at the
end, never fatal. The result is OUT/monoformer_NAME/1.0.0, array_record read
without TensorFlow; train with `--config.data.dir=OUT/monoformer_NAME/1.0.0`.
"""

from __future__ import annotations

import glob
import json
import os

import jax
from absl import app, flags, logging

from monoformer_jax import cli
from monoformer_jax.data import builders
from monoformer_jax.errors import ConfigError, MissingPathError
from monoformer_jax.config.fields import integer
from monoformer_jax.paths import writable_dir

_INPUT = flags.DEFINE_string("input_dir", None, "What to prepare (see the module docstring).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where the prepared dataset goes.")
_VAE = flags.DEFINE_string("vae", None, "SD-VAE folder (diffusers AutoencoderKL): latent "
                           "datasets need one.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Pixels per side after the center crop.")
_FLIP = flags.DEFINE_bool("flip", False, "Also store each image's mirror's latent "
                          "(data.random_flip then picks one at random).")
_SPLITS = flags.DEFINE_list("splits", ["train", "val"], "imagenet: the splits to prepare "
                            "(those that exist under --input_dir).")
_ANNOTATIONS = flags.DEFINE_string("annotations", None, "text_to_image: the annotation jsonl; "
                                   "llava: llava_v1_5_mix665k.json (or a JSONL of records).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per VAE batch (all local devices).")
_CHUNK = flags.DEFINE_integer("chunk_size", 1024, "Images per resumable chunk.")


def _latent_splits(name: str, output_dir: str) -> tuple[dict, tuple, list[str]]:
  """Encodes the images of `name` (each host its chunks) and returns
  ({split: records}, latent shape, report lines)."""
  from monoformer_jax.data import encode
  from monoformer_jax.vae import load_vae
  if not _VAE.value:
    raise ConfigError(f"{name} stores SD-VAE latents: pass --vae=DIR (a diffusers "
                      "AutoencoderKL folder such as sd-vae-ft-mse)")
  size = integer("--image_size", _IMAGE_SIZE.value, low=8)
  vae = load_vae(_VAE.value)
  factor = vae.config.downsample_factor
  if size % factor:
    raise ConfigError(f"--image_size={size}: must be a multiple of the VAE's downsampling "
                      f"factor {factor}")
  if name == "imagenet":
    source = _INPUT.value
    if encode.has_imagenet_archives(source):   # TFDS's imagenet2012 manual_dir
      source = encode.extract_imagenet_archives(
          source, os.path.join(output_dir, "_extracted", "imagenet"))
    present = [s for s in _SPLITS.value if os.path.isdir(os.path.join(source, s))]
    if not present:
      raise MissingPathError(f"--input_dir={_INPUT.value!r} has none of the split folders "
                             f"{_SPLITS.value}; expected {_INPUT.value}/train/<wnid>/*.JPEG "
                             f"or the tars {encode.TRAIN_ARCHIVE} / {encode.VAL_ARCHIVE}")
    items = {s: encode.imagenet_items(source, s) for s in present}
    missing = {}
  else:
    if not _ANNOTATIONS.value:
      raise ConfigError("text_to_image needs --annotations=FILE.jsonl (img_path, prompt)")
    found, gone = encode.journeydb_items(_ANNOTATIONS.value, _INPUT.value)
    items, missing = {"train": found}, {"train": gone}
  lines, splits = [], {}
  for split, split_items in items.items():
    work = os.path.join(output_dir, "_encoded", name, split)
    logging.info("%s/%s: %d images to encode into %s", name, split, len(split_items), work)
    encode.encode_items(split_items, vae, work, image_size=size, flip=_FLIP.value,
                        batch_size=_BATCH.value, chunk_size=_CHUNK.value)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"encoded {name}/{split}")
    report = encode.chunk_report(work)
    lines.append(f"{name}/{split}: {report.summary()}")
    if missing.get(split):
      gone = missing[split]
      lines.append(f"{name}/{split}: {len(gone)} annotated images are missing under "
                   f"--input_dir and were skipped, e.g. {gone[:5]}")
    splits[split] = (lambda work=work: encode.read_chunks(work))
  shape = (size // factor, size // factor, vae.config.latent_channels)
  return splits, shape, lines


def _files(path: str) -> list[str]:
  if os.path.isdir(path):
    found = sorted(glob.glob(os.path.join(path, "*.jsonl")) + glob.glob(os.path.join(path, "*.txt")))
    if not found:
      raise MissingPathError(f"--input_dir={path!r} holds no .jsonl or .txt files")
    return found
  if not os.path.exists(path):
    raise MissingPathError(f"--input_dir={path!r} does not exist")
  return [path]


def _text_splits(name: str) -> dict:
  from monoformer_jax.data import chat
  files = _files(_INPUT.value)
  if name == "chat":
    records = lambda: ({"key": f"{i:09d}", "turns": json.dumps(turns)}
                       for i, turns in enumerate(t for f in files
                                                 for t in chat.read_conversations(f)))
  else:
    records = lambda: ({"key": f"{i:09d}", "text": text}
                       for i, text in enumerate(t for f in files for t in chat.read_texts(f)))
  return {"train": records}


def _llava_splits() -> tuple:
  """({"train": records}, the llava.LlavaAnnotations they come from, whose
  `report` counts what was kept and skipped as the records are written)."""
  import tqdm
  from monoformer_jax.data import llava
  if not _ANNOTATIONS.value:
    raise ConfigError("llava needs --annotations=llava_v1_5_mix665k.json (LLaVA's annotation "
                      "list) beside --input_dir=IMAGE_ROOT")
  annotations = llava.read_llava(_ANNOTATIONS.value, _INPUT.value)

  def records():
    with tqdm.tqdm(desc="llava records", unit="record") as bar:
      for record in llava.prepared_records(annotations):
        if bar.total is None and annotations.total is not None:
          bar.total = annotations.total
        bar.update(annotations.report.records - bar.n)
        yield record
      bar.update(annotations.report.records - bar.n)

  return {"train": records}, annotations


def main(argv):
  if len(argv) != 2 or argv[1] not in builders.KINDS:
    raise app.UsageError(f"usage: python -m monoformer_jax.data.prepare "
                         f"{{{'|'.join(builders.KINDS)}}} --input_dir=... --output_dir=...")
  name = argv[1]
  if not _OUTPUT.value:
    raise app.UsageError("--output_dir is required")
  output_dir = writable_dir(_OUTPUT.value, "prepared dataset", "--output_dir")
  if name == "digits":
    logging.info("prepared %s", builders.digits_dir(output_dir))
    return
  if not _INPUT.value:
    raise app.UsageError(f"{name} needs --input_dir")
  if not os.path.exists(_INPUT.value):
    raise MissingPathError(f"--input_dir={_INPUT.value!r} does not exist")
  lines, shape, annotations = [], None, None
  if name in builders.LATENT_KINDS:
    splits, shape, lines = _latent_splits(name, output_dir)
  elif name == "llava":
    splits, annotations = _llava_splits()
  else:
    splits = _text_splits(name)
  if jax.process_index() == 0:
    folder = builders.prepare(name, output_dir, splits, latent_shape=shape, flip=_FLIP.value,
                              description=f"prepared by monoformer_jax from {_INPUT.value}")
    counts = {split["name"]: sum(int(n) for n in split["shardLengths"])
              for split in builders.dataset_info(folder)["splits"]}
    if annotations is not None:   # counted while the records were written
      lines.append(f"llava/train: {annotations.report.summary()}")
    for line in lines:
      logging.info("%s", line)
    logging.info("wrote %s: %s records; train with --config.data.dir=%s", folder, counts,
                 folder)


if __name__ == "__main__":
  cli.run(main)
