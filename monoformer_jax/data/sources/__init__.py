"""Dataset sources: one module per source, each holding everything about it.

A source is a `DataSource` (below) made once in its own module as `SOURCE`
and registered by one line in data/datasets.py (`SOURCES`, name -> module,
imported only when asked for). It says

    features     what its prepared records hold ({name: tfds feature})
    prepare      `python -m monoformer_jax.data.prepare NAME`: its input read
                 into {split: records} (`Prepared`), which the entry point writes
    examples     its example stream at training time, `example_at(i)` of an
                 infinite stream seeded by `seed` (data/pipeline.py)
    class names, whether its images are pixels or SD-VAE latents, and how its
    data fields are checked before anything is read

    imagenet.py       class-conditional SD-VAE latents of ILSVRC2012 folders
    text_to_image.py  prompted latents (JourneyDB-style annotations)
    latents.py        what those two share (the latent records, the encoding)
    chat.py, text.py  conversations (loss on the answers) and plain text
    llava.py          conversations about READ images (LLaVA's instruction data)
    mix.py            several of those by weight (`data.mix`, `data.dirs`)
The embedded default lives in its own package (monoformer_jax/digits/).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

from monoformer_jax.data import builders
from monoformer_jax.layout import Example


@dataclasses.dataclass(frozen=True)
class PrepareArgs:
  """The flags of `python -m monoformer_jax.data.prepare` (its docstring says which
  source reads which)."""

  input_dir: str | None = None
  annotations: str | None = None  # text_to_image: the JSONL; llava: LLaVA's list
  vae: str | None = None  # latent sources: the SD-VAE folder
  image_size: int = 256  # pixels per side after the centre crop
  flip: bool = False  # also each image's mirror's latent
  splits: tuple[str, ...] = ("train", "val")
  batch_size: int = 32  # images per VAE batch
  chunk_size: int = 1024  # images per resumable chunk


class Prepared(NamedTuple):
  """What a source's `prepare` read: {split: records()} to write (the records
  of its `features`), the latent shape and mirrors of latent records, the
  lines to log once the records are written (counted while writing), and the
  dataset's description ("": where it was prepared from)."""

  splits: dict[str, Callable]
  latent_shape: tuple[int, ...] | None = None
  flip: bool = False
  report: Callable[[], list[str]] = list
  description: str = ""


class DataSource:
  """One dataset source; subclasses set the attributes and the methods they need."""

  name = ""  # data.name, `prepare NAME`, the folder monoformer_{name}
  pixels = False  # its images are pixels in [-1, 1]; else SD-VAE latents
  class_noun = ""  # what one class is ("ImageNet class"), for messages
  # Training steps at its default config before its samples are recognisable
  # (measured; 0: not known). Shorter runs are warned about.
  steps_for_samples = 0
  mixable = True  # data.mix may name it (its folder from data.dirs)
  needs_input = True  # `prepare NAME` reads --input_dir
  uncompressed = False  # its shards are stored uncompressed (builders.UNCOMPRESSED)

  def class_names(self) -> tuple[str, ...]:
    """The names class-conditional prompts fill in; () when it has no classes."""
    return ()

  def features(self, *, latent_shape=None, flip: bool = False) -> dict:
    """{name: tfds feature}: what each prepared record holds."""
    raise NotImplementedError

  def prepare(self, args: PrepareArgs, output_dir: str) -> Prepared:
    """Reads the input `args` name into records (on every host of a
    multi-host run; process 0 writes them)."""
    raise NotImplementedError

  def check(self, config):
    """The data fields that name its files, before anything is read."""
    builders.check_prepared("data.dir", config.data.dir, self.name)

  def examples(
    self, config, tokenizer, seed: int, directory: str | None = None
  ) -> Callable[[int], Example]:
    """example_at(i) of its infinite stream seeded by `seed`, read from
    `directory` (a mix's data.dirs entry) or data.dir."""
    raise NotImplementedError

  def records(self, config, directory: str | None = None) -> builders.Records:
    """The records of data.split of its prepared folder (`directory` or data.dir)."""
    directory = directory or config.data.dir
    builders.check_prepared("data.dir", directory, self.name)
    return builders.data_source(directory, config.data.split, kind=self.name)

  def write(
    self,
    output_dir: str,
    splits: dict,
    *,
    latent_shape=None,
    flip: bool = False,
    description: str = "",
  ) -> str:
    """Writes `splits` as its prepared dataset under `output_dir`; returns the folder."""
    return builders.write(
      self.name,
      output_dir,
      splits,
      self.features(latent_shape=latent_shape, flip=flip),
      uncompressed=self.uncompressed,
      description=description,
    )
