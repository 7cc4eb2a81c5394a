"""Text-to-image: prompted SD-VAE latents of images with annotations (JourneyDB's).

    python -m monoformer_jax.data.prepare text_to_image --input_dir=IMAGE_ROOT \
        --annotations=FILE.jsonl --vae=SD_VAE --output_dir=OUT [--image_size=256] [--flip]

Each annotation line: `img_path` (relative to IMAGE_ROOT), `prompt`, optional
`caption` (else JourneyDB's `Task2.Caption`). A record is a latent record
(sources/latents.py) with `prompt` and `caption`; its examples are the image
under its prompt, the prompt dropped with probability data.cfg_drop_prob for
guidance. A prompt too long for a row of data.seq_len beside its image (or
longer than the reference's 128 ids with <s>) is cut from its end as the
reference cuts it (prompts.image_example) and counted: the training log says
how many examples were cut since its last line.
"""

from __future__ import annotations

import os

from monoformer_jax.data import pipeline, prompts
from monoformer_jax.data.encode import ImageItem
from monoformer_jax.data.jsonl import json_objects
from monoformer_jax.data.sources import DataSource, PrepareArgs, Prepared, latents
from monoformer_jax.errors import ConfigError, FileFormatError, MissingPathError
from monoformer_jax.layout import Example, row_spec
from monoformer_jax.paths import FileLookup, join, path_kind


class TextToImage(DataSource):
  name = "text_to_image"
  uncompressed = True

  def features(self, *, latent_shape=None, flip: bool = False) -> dict:
    import tensorflow_datasets as tfds

    f = tfds.features
    return latents.features(latent_shape, flip, prompt=f.Text(), caption=f.Text())

  def prepare(self, args: PrepareArgs, output_dir: str) -> Prepared:
    vae, _ = latents.load_encoder(self.name, args)
    if not args.annotations:
      raise ConfigError("text_to_image needs --annotations=FILE.jsonl (img_path, prompt)")
    found, gone = journeydb_items(args.annotations, args.input_dir)
    return latents.encode_splits(
      self.name, {"train": found}, vae, args, output_dir, missing={"train": gone}
    )

  def examples(self, config, tokenizer, seed: int, directory: str | None = None):
    records = latents.checked_records(self, config, directory)
    room = prompts.caption_room(row_spec(config, tokenizer))
    to_example = text_to_image_example(tokenizer, max_ids=room, **latents.options(config))
    return pipeline.record_stream(records, to_example, seed)


SOURCE = TextToImage()


def text_to_image_example(
  tokenizer, *, drop_prob: float, sample: bool, flip: bool, max_ids: int | None = None
):
  """record -> Example: the image under its prompt (or the dropped, empty one),
  the prompt cut to `max_ids` ids in all (prompts.caption_room; None: uncut)."""

  def to_example(record, rng) -> Example:
    prompt = None if rng.random() < drop_prob else _text(record["prompt"])
    image = latents.latent_of(record, rng, sample=sample, flip=flip)
    return prompts.image_example(prompt, image, tokenizer, max_ids=max_ids)

  return to_example


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def journeydb_items(annotations_jsonl, image_root) -> tuple[list[ImageItem], list[str]]:
  """(items, missing image paths) of a JourneyDB-style JSONL, in file order.

  Each line: `img_path` (relative to `image_root`), `prompt`, optional
  `caption` (else JourneyDB's `Task2.Caption`, else ""). Keys are the
  normalized img_path; fields `prompt` and `caption`. Lines whose image is not
  there are left out and their paths returned for the caller to report. Both
  may be on a bucket (`gs://...`), whose image folders are listed once each
  (paths.FileLookup) rather than asked about image by image.
  """
  annotations_jsonl, image_root = os.fspath(annotations_jsonl), os.fspath(image_root)
  if path_kind(annotations_jsonl, "--annotations") != "file":
    raise MissingPathError(
      f"annotations file {annotations_jsonl} is not there; give the "
      'JSONL with one {"img_path", "prompt"} object per line'
    )
  if path_kind(image_root, "--input_dir") != "folder":
    raise MissingPathError(
      f"image root {image_root} is not a folder; give the folder the "
      f"img_path entries of {annotations_jsonl} are relative to"
    )
  items, missing, line_of, there = [], [], {}, FileLookup()
  for lineno, entry in json_objects(annotations_jsonl):
    where = f"{annotations_jsonl}, line {lineno}"
    for name in ("img_path", "prompt"):
      if not isinstance(entry.get(name), str) or (name == "img_path" and not entry[name]):
        got = "missing" if name not in entry else f"{entry[name]!r}"
        raise FileFormatError(
          f"{where}: {name!r} is {got}; each line needs a string img_path and prompt"
        )
    caption = entry.get("caption")
    if caption is None and isinstance(entry.get("Task2"), dict):
      caption = entry["Task2"].get("Caption")
    key = os.path.normpath(entry["img_path"]).replace(os.sep, "/")
    if key in line_of:
      raise FileFormatError(
        f"{where}: img_path {entry['img_path']!r} is already on line "
        f"{line_of[key]}; keys must be unique, delete one of them"
      )
    line_of[key] = lineno
    path = join(image_root, entry["img_path"])
    if path not in there:
      missing.append(path)
      continue
    items.append(
      ImageItem(
        key=key,
        path=path,
        fields={"prompt": entry["prompt"], "caption": "" if caption is None else str(caption)},
      )
    )
  return items, missing
