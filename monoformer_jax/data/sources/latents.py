"""What the latent sources (imagenet, text_to_image) share: their records, their
encoding at preparation and the training latent drawn from a record.

A latent record holds `mean` and `std` float32 [h, w, C], the SD-VAE posterior
of the scaled latent (a training latent is mean + std * eps), optionally
`mean_flip` and `std_flip` (of the mirrored image), and `key` (the file);
each source adds its own fields. Preparation encodes the images with
data/encode.py into resumable chunks (each host its share) and writes the
finished chunks' records.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from monoformer_jax.config.fields import integer
from monoformer_jax.data.sources import PrepareArgs, Prepared
from monoformer_jax.errors import ConfigError


def features(latent_shape, flip: bool, **extra) -> dict:
  """The latent fields (stored as raw bytes: read back with one np.frombuffer,
  builders.Records) and the source's `extra` ones."""
  import tensorflow_datasets as tfds

  f = tfds.features
  tensor = lambda: f.Tensor(shape=tuple(latent_shape), dtype=np.float32, encoding=f.Encoding.BYTES)
  spec = dict(mean=tensor(), std=tensor(), key=f.Text())
  if flip:
    spec.update(mean_flip=tensor(), std_flip=tensor())
  return dict(spec, **extra)


def load_encoder(name: str, args: PrepareArgs):
  """(the SD-VAE of --vae, --image_size checked against its downsampling)."""
  from monoformer_jax.vae import load_vae

  if not args.vae:
    raise ConfigError(
      f"{name} stores SD-VAE latents: pass --vae=DIR (a diffusers "
      "AutoencoderKL folder such as sd-vae-ft-mse)"
    )
  size = integer("--image_size", args.image_size, low=8)
  vae = load_vae(args.vae)
  factor = vae.config.downsample_factor
  if size % factor:
    raise ConfigError(
      f"--image_size={size}: must be a multiple of the VAE's downsampling factor {factor}"
    )
  return vae, size


def encode_splits(
  name: str,
  items: dict,
  vae,
  args: PrepareArgs,
  output_dir: str,
  missing: dict | None = None,
  unreadable: dict | None = None,
) -> Prepared:
  """Encodes the images of `items` ({split: [encode.ImageItem]}; each host its
  chunks, under output_dir/_encoded/NAME/SPLIT) and returns their records;
  `missing` ({split: paths}) are annotated images that were not there,
  `unreadable` ({split: [(name, reason)]}) inputs that gave no items (a broken
  archive): both are counted and listed with the skipped images."""
  from monoformer_jax.data import encode

  size = args.image_size  # checked by load_encoder
  lines, splits = [], {}
  for split, split_items in items.items():
    work = os.path.join(output_dir, "_encoded", name, split)
    logging.info("%s/%s: %d images to encode into %s", name, split, len(split_items), work)
    mine = encode.encode_items(
      split_items,
      vae,
      work,
      image_size=size,
      flip=args.flip,
      batch_size=args.batch_size,
      chunk_size=args.chunk_size,
    )
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"encoded {name}/{split}")
    report = encode.chunk_report(work)  # every host's chunks
    # Of those, the ones there before this run (this host's, on several hosts).
    report.chunks_reused, report.chunks_written = (
      mine.chunks_reused,
      report.chunks_written - mine.chunks_reused,
    )
    report.missing = list((missing or {}).get(split, ()))  # annotated, not under --input_dir
    report.skipped.extend((unreadable or {}).get(split, ()))
    listed = os.path.join(work, encode.SKIPPED_LIST)
    if jax.process_index() == 0:
      encode.write_skipped(work, report)
    if report.encoded == 0:  # TFDS would only say "No examples were yielded"
      raise report.nothing_encoded(f"{name}/{split}", listed)
    lines.append(f"{name}/{split}: {report.summary(listed)}")
    splits[split] = lambda work=work: encode.read_chunks(work)
  factor = vae.config.downsample_factor
  shape = (size // factor, size // factor, vae.config.latent_channels)
  return Prepared(splits, latent_shape=shape, flip=args.flip, report=lambda: lines)


def checked_records(source, config, directory: str | None = None):
  """The source's prepared records, their latents checked against the model."""
  records = source.records(config, directory)
  m = config.model
  want = (m.image_size, m.image_size, m.in_channels)
  got = tuple(np.asarray(records[0]["mean"]).shape)
  if got != want:
    raise ConfigError(
      f"the prepared {source.name} latents are {got} but the model reads "
      f"(model.image_size, model.image_size, model.in_channels)={want}; "
      "prepare with the matching --image_size, or change the model"
    )
  return records


def options(config) -> dict:
  """How examples draw their latents and prompts: the guidance drop
  (data.cfg_drop_prob), a posterior draw or the mean (data.latent_sample), a
  random mirror (data.random_flip)."""
  d = config.data
  return dict(
    drop_prob=float(d.cfg_drop_prob), sample=bool(d.latent_sample), flip=bool(d.random_flip)
  )


def latent_of(record, rng: np.random.Generator, *, sample: bool, flip: bool) -> np.ndarray:
  """The training latent of a latent record: mean + std * eps (or the mean),
  mirrored with probability 1/2 when `flip` and the record has a mirror."""
  suffix = "_flip" if flip and "mean_flip" in record and rng.random() < 0.5 else ""
  mean = np.asarray(record["mean" + suffix], np.float32)
  if not sample:
    return mean
  std = np.asarray(record["std" + suffix], np.float32)
  return mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
