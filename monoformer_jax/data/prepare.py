r"""Prepare a dataset for training: `python -m monoformer_jax.data.prepare NAME --flags`.

    imagenet       --input_dir=DIR (train/<wnid>/*.JPEG, val/<wnid>/..., or TFDS's
                   imagenet2012 manual tars ILSVRC2012_img_train.tar / _val.tar, read
                   in place, also from gs://) --vae=SD_VAE [--image_size=256]
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

and `--output_dir=OUT` for all; each source's module (data/sources/, the
digits' in monoformer_jax/digits/) reads its input and says what its records
hold. Images are center-cropped as ADM/DiT do, then
encoded by the SD-VAE on every local device (each host of a pod its share:
run the same command on every host with --jax_distributed), in resumable
chunks under OUT/_encoded/: an interrupted run started again encodes only
what is missing. Files that cannot be read are skipped, counted in the
summary and listed with their reasons in OUT/_encoded/NAME/SPLIT/skipped.tsv;
only a split of which no file could be read (or an input that gives no
record) stops the preparation, and nothing is written then. The result is OUT/monoformer_NAME/1.0.0, array_record read
without TensorFlow; train with `--config.data.dir=OUT/monoformer_NAME/1.0.0`.
OUT may be a bucket (`gs://...`): the chunks go there as whole objects and the
dataset is uploaded with its dataset_info.json last, which marks it complete
(docs/data.md, "In a bucket"); so may the inputs of text_to_image, llava, chat
and text (--input_dir, --annotations).
"""

from __future__ import annotations

import jax
from absl import app, flags, logging

from monoformer_jax import cli
from monoformer_jax.data import builders, datasets
from monoformer_jax.data.sources import PrepareArgs
from monoformer_jax.errors import MissingPathError
from monoformer_jax.paths import path_kind, writable_dir

_INPUT = flags.DEFINE_string("input_dir", None, "What to prepare (see the module docstring).")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where the prepared dataset goes.")
_VAE = flags.DEFINE_string(
  "vae", None, "SD-VAE folder (diffusers AutoencoderKL): latent datasets need one."
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "Pixels per side after the center crop.")
_FLIP = flags.DEFINE_bool(
  "flip",
  False,
  "Also store each image's mirror's latent (data.random_flip then picks one at random).",
)
_SPLITS = flags.DEFINE_list(
  "splits",
  ["train", "val"],
  "imagenet: the splits to prepare (those that exist under --input_dir).",
)
_ANNOTATIONS = flags.DEFINE_string(
  "annotations",
  None,
  "text_to_image: the annotation jsonl; llava: llava_v1_5_mix665k.json (or a JSONL of records).",
)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per VAE batch (all local devices).")
_CHUNK = flags.DEFINE_integer("chunk_size", 1024, "Images per resumable chunk.")


def main(argv):
  if len(argv) != 2 or argv[1] not in datasets.SOURCES:
    raise app.UsageError(
      f"usage: python -m monoformer_jax.data.prepare "
      f"{{{'|'.join(datasets.SOURCES)}}} --input_dir=... --output_dir=..."
    )
  source = datasets.source(argv[1])
  if not _OUTPUT.value:
    raise app.UsageError("--output_dir is required")
  output_dir = writable_dir(_OUTPUT.value, "prepared dataset", "--output_dir")
  builders.check_not_prepared(output_dir, source.name)  # before hours of reading
  if source.needs_input:
    if not _INPUT.value:
      raise app.UsageError(f"{source.name} needs --input_dir")
    if path_kind(_INPUT.value, "--input_dir") is None:  # a local path, or one on a bucket
      raise MissingPathError(f"--input_dir={_INPUT.value!r} does not exist")
  args = PrepareArgs(
    input_dir=_INPUT.value,
    annotations=_ANNOTATIONS.value,
    vae=_VAE.value,
    image_size=_IMAGE_SIZE.value,
    flip=_FLIP.value,
    splits=tuple(_SPLITS.value),
    batch_size=_BATCH.value,
    chunk_size=_CHUNK.value,
  )
  prepared = source.prepare(args, output_dir)  # every host: the encoders' shares
  if jax.process_index() == 0:
    try:
      folder = source.write(
        output_dir,
        prepared.splits,
        latent_shape=prepared.latent_shape,
        flip=prepared.flip,
        description=prepared.description or f"prepared by monoformer_jax from {_INPUT.value}",
      )
    except builders.NoRecords as e:  # the source's report says why (what it skipped)
      raise builders.NoRecords("; ".join([str(e), *prepared.report()])) from e
    counts = {
      split["name"]: sum(int(n) for n in split["shardLengths"])
      for split in builders.dataset_info(folder)["splits"]
    }
    for line in prepared.report():
      logging.info("%s", line)
    logging.info("wrote %s: %s records; train with --config.data.dir=%s", folder, counts, folder)


if __name__ == "__main__":
  cli.run(main)
