"""LLaVA's visual instruction data (llava_v1_5_mix665k.json) as reading examples.

The annotations are a JSON list (or JSONL) of records

    {"id": str, "image": "coco/train2017/000000033471.jpg" (optional, relative
     to the image root), "conversations": [{"from": "human" | "gpt", "value": str}, ...]}

whose first human value holds the literal "<image>" (usually "<image>\\n"
first) when there is an image; mix665k has one image per record, and
text-only records (ShareGPT) without one. `read_llava` parses and checks them;
`prepared_records` adds each image file's bytes for the prepared records
(`conversation`, the turns as JSON with the image's "<image>" marker;
`image`, the file's bytes as they are, JPEG for mix665k, b"" for a text-only
record; `key`), what

    python -m monoformer_jax.data.prepare llava --input_dir=IMAGE_ROOT \
        --annotations=llava_v1_5_mix665k.json --output_dir=OUT

writes (nothing encoded); at training time `LlavaExamples` turns a prepared record into
an `Example` with `read=[True]`: the conversation rendered by the chat
machinery (chat.py) with the image as ONE `<image>` placeholder inside
`<|im_start|> <image> <|im_end|>`, and the image as the vision encoder takes
it (vision/inputs.py `read_inputs`, CLIP's pixels for `vision_encoder=clip`).

What the reference does (data/dataset.py LLaVAFinetuneDataset; train.py
LLaVAItemProcessor and tokenize_conversation; configs/train_llava_journeydb.py):
- it json.loads the whole list and shuffles it; a record's image is opened
  (RGB) from data_root + "image", and one that fails to open becomes a black
  224 x 224 image, with a warning, and still trains;
- "human" becomes the user, "gpt" the assistant, and the turns are tokenized
  without a chat template (`use_chat_template = False`, so `train_on_source =
  True`): each user turn is bos + its value (cut to source_max_length = 128
  tokens), each assistant turn its value + eos (cut to 512), the pairs
  concatenated, and the labels are every token, the questions included;
- the "<image>" marker is not rewritten: the tokenizer reads it as the added
  `<image>` token, so the image sits bare where the marker was, without
  `<|im_start|>` / `<|im_end|>`, and the "\\n" after it stays (its `<PAD>`
  after `<|im_start|>` rewrite only concerns generation prompts). The model
  replaces that token by the timestep token (t = 0, add_before_image_tokens)
  and the CLIP features, none of them a label, and cuts the row to 512 tokens;
- the config weighs JourneyDB and LLaVA 1:1, but with `use_iterable_dataset =
  False` the two are concatenated and sampled uniformly, so the weights are
  not applied (each dataset's share is its size's).

Ours, and why:
- the image is `<|im_start|> <image> <|im_end|>` in place of the marker, the
  text around it (its "\\n" included) kept: the reference's own inference
  prompt (infer_mllm.py; prompts.read_prompt_example), so what the model is
  trained on and prompted with agree. A record with an image but no marker
  gets it, followed by "\\n", at the start of its first question, as LLaVA's
  own preprocessing places it;
- the turns are rendered with `data.chat_template` (default human_assistant,
  the reference's chat template) and, unless `data.train_on_source`, the loss
  is on the assistant's answers only, what instruction tuning trains;
- an example with an image is cut at the end, as the reference's row, so
  that it fits one row of `data.seq_len` with its image (a text-only one is
  split by packing instead); the per-turn cuts are not applied; cuts are
  counted and logged (on the training log's lines too: `Example.cut`), and a record whose image would fall past the cut is
  skipped;
- records whose image file is missing are skipped at preparation (counted);
  an image that does not decode at training time skips to the next record
  (counted, warned) instead of training on a black image; images are read
  as the project reads every image (vision/images.py: a transparent one is
  composited on white where the reference's `convert("RGB")` drops the
  alpha; no EXIF orientation, as the reference);
- `data.mix`'s weights are applied (pipeline.mix).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from monoformer_jax.data import chat, pipeline
from monoformer_jax.data.datasets import draws_pixels
from monoformer_jax.data.sources import DataSource, PrepareArgs, Prepared
from monoformer_jax.errors import ConfigError, FileFormatError, MissingPathError, PathError
from monoformer_jax.layout import Example, read_image_spec, row_spec
from monoformer_jax.paths import FileLookup, join, path_kind, read_all
from monoformer_jax.vision.images import UnreadableImage, load_image
from monoformer_jax.vision.inputs import read_inputs

IMAGE_MARKER = "<image>"  # where a record's text places its image
SPEAKERS = ("human", "gpt")  # the turns alternate, human first
SHOWN_REASONS = 5  # skipped records named in the log, then only counted
# Records in a row whose images do not decode before the stream gives up: more
# means the prepared data, not one file, is broken.
MAX_CONSECUTIVE_SKIPS = 64


class Llava(DataSource):
  name = "llava"
  uncompressed = True  # JPEG bytes are entropy-coded already

  def features(self, *, latent_shape=None, flip: bool = False) -> dict:
    import tensorflow_datasets as tfds

    f = tfds.features
    # Text features hold any bytes, so the image file's bytes are stored (and
    # read back by Records) as they are, with no image codec in TFDS's way.
    return dict(conversation=f.Text(), image=f.Text(doc="the image file's bytes"), key=f.Text())

  def prepare(self, args: PrepareArgs, output_dir: str) -> Prepared:
    import tqdm

    if not args.annotations:
      raise ConfigError(
        "llava needs --annotations=llava_v1_5_mix665k.json (LLaVA's "
        "annotation list) beside --input_dir=IMAGE_ROOT"
      )
    annotations = read_llava(args.annotations, args.input_dir)

    def records():
      with tqdm.tqdm(desc="llava records", unit="record") as bar:
        for record in prepared_records(annotations):
          if bar.total is None and annotations.total is not None:
            bar.total = annotations.total
          bar.update(annotations.report.records - bar.n)
          yield record
        bar.update(annotations.report.records - bar.n)

    # The report counts what was kept and skipped as the records are written.
    return Prepared(
      {"train": records}, report=lambda: [f"llava/train: {annotations.report.summary()}"]
    )

  def examples(self, config, tokenizer, seed: int, directory: str | None = None):
    to_example = LlavaExamples(config, tokenizer)  # the config's errors first
    directory = directory or config.data.dir
    return LlavaStream(
      self.records(config, directory),
      to_example,
      seed,
      where=f"the prepared llava dataset {directory}",
    )


SOURCE = Llava()


# ----------------------------------------------------------------------------- reader


@dataclasses.dataclass
class ReadReport:
  """What `read_llava` (and `prepared_records`) kept and skipped, and why."""

  records: int = 0  # records in the file (lines, for JSONL)
  kept: int = 0  # yielded, text-only ones included
  text_only: int = 0
  malformed: int = 0  # not a record the format allows: skipped
  missing_images: int = 0  # a well-formed record whose image file is not there: skipped
  reasons: list = dataclasses.field(default_factory=list)  # the first SHOWN_REASONS

  def skip(self, what: str, reason: str):
    """Counts a skipped record, `what` "malformed" or "missing" (its image)."""
    if what == "malformed":
      self.malformed += 1
    elif what == "missing":
      self.missing_images += 1
    else:
      raise ValueError(f"skip({what!r}): say 'malformed' or 'missing'")
    if len(self.reasons) < SHOWN_REASONS:
      self.reasons.append(reason)
      logging.warning("llava: skipped %s", reason)

  def summary(self) -> str:
    line = (
      f"{self.records} records: kept {self.kept} ({self.text_only} text-only), "
      f"skipped {self.malformed} malformed and {self.missing_images} whose image is "
      "missing"
    )
    if self.reasons:
      line += "; e.g. " + "; ".join(self.reasons)
    return line


class LlavaAnnotations:
  """The checked records of a LLaVA annotation file: iterate for dicts

      {"key": str, "turns": [{"role": "user" | "assistant", "content": str}, ...],
       "image": the image file's path under the image root, or None}

  `key` is the record's place in the file (9 digits) and its "id", unique even
  where ids repeat. Each pass re-reads the file and refills `report`."""

  def __init__(self, path: str, image_root: str):
    self.path, self.image_root = path, image_root
    self.report = ReadReport()
    self.total: int | None = None  # records in the file, once a pass has begun

  def __iter__(self) -> Iterator[dict]:
    self.report = report = ReadReport()
    there = FileLookup()  # a bucket's image folders listed once each, not asked per image
    for index, place, record in self._entries():
      report.records += 1
      where = place
      if isinstance(record, dict) and isinstance(record.get("id"), (str, int)):
        where += f" (id {record['id']!r})"
      try:
        clean = _clean(record, index)
      except ValueError as e:
        report.skip("malformed", f"{where}: {e}")
        continue
      if clean["image"] is not None:
        path = join(self.image_root, clean["image"])
        if path not in there:
          report.skip(
            "missing", f"{where}: image {clean['image']!r} is not under {self.image_root}"
          )
          continue
        clean["image"] = path
      else:
        report.text_only += 1
      report.kept += 1
      yield clean
    logging.info("llava %s: %s", self.path, report.summary())

  def _entries(self) -> Iterator[tuple[int, str, Any]]:
    """(index, where, parsed record or the ValueError of a line that is not one)."""
    if _is_json_list(self.path):
      try:
        with epath.Path(self.path).open("rb") as f:
          records = json.load(f)  # mix665k: 1 GB, read whole as the reference does
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(
          f"{self.path} is not valid JSON ({e}); give LLaVA's annotation "
          "list (llava_v1_5_mix665k.json) or a JSONL of its records"
        ) from e
      if not isinstance(records, list):
        raise FileFormatError(
          f"{self.path} holds a JSON {type(records).__name__}, not a list "
          "of records; give LLaVA's annotation list or a JSONL of records"
        )
      self.total = len(records)
      for index, record in enumerate(records):
        yield index, f"{self.path} record {index}", record
      return
    with epath.Path(self.path).open("rb") as f:
      index = 0
      for number, raw in enumerate(f, 1):
        if not raw.strip():
          continue
        try:
          record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
          record = ValueError(f"not a JSON object ({e})")
        yield index, f"{self.path} line {number}", record
        index += 1


def _is_json_list(path: str) -> bool:
  """Whether `path` is one JSON document (a .json, or a file opening with '[')
  rather than JSON lines (a .jsonl, or anything else)."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix in (".json", ".jsonl"):
    return suffix == ".json"
  with epath.Path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(4096), b""):
      stripped = chunk.lstrip()
      if stripped:
        return stripped[:1] == b"["
  return False


def _clean(record, index: int) -> dict:
  """The record as {"key", "turns", "image"}; ValueError says what is wrong."""
  if isinstance(record, ValueError):
    raise record
  if not isinstance(record, dict):
    raise ValueError(f"is a JSON {type(record).__name__}, not a record object")
  items = record.get("conversations")
  if not isinstance(items, list) or not items:
    raise ValueError(f"'conversations' is {items!r:.60}, not a non-empty list of turns")
  turns, markers = [], 0
  for k, item in enumerate(items):
    speaker = SPEAKERS[k % 2]
    if not isinstance(item, dict) or not isinstance(item.get("value"), str):
      raise ValueError(f"conversations[{k}] is {item!r:.60}, not {{'from', 'value': str}}")
    if item.get("from") != speaker:
      raise ValueError(
        f"conversations[{k}] is from {item.get('from')!r}, expected "
        f"{speaker!r}: the turns alternate human, gpt, ... starting with human"
      )
    value = item["value"]
    if speaker == "gpt" and IMAGE_MARKER in value:
      raise ValueError(
        f"conversations[{k}] (gpt) holds {IMAGE_MARKER!r}; only a question may place the image"
      )
    markers += value.count(IMAGE_MARKER)
    turns.append({"role": chat.SHAREGPT_ROLES[speaker], "content": value})
  if len(items) % 2:
    raise ValueError(
      f"ends with an unanswered human turn ({len(items)} turns); the last turn must be gpt's"
    )
  image = record.get("image")
  if image is not None and (not isinstance(image, str) or not image.strip()):
    raise ValueError(
      f"'image' is {image!r:.60}; give one path (a str) relative to the "
      "image root (records with several images are not supported)"
    )
  if markers > (image is not None):
    raise ValueError(
      f"holds {markers} {IMAGE_MARKER!r} markers but "
      f"{int(image is not None)} image(s); give one image per marker"
    )
  ident = record.get("id")
  key = f"{index:09d}" + (f":{ident}" if isinstance(ident, (str, int)) else "")
  return {"key": key, "turns": turns, "image": image}


def read_llava(path, image_root) -> LlavaAnnotations:
  """The records of LLaVA's annotations `path` (a JSON list, or JSONL) with
  images under `image_root`, as `LlavaAnnotations` (iterate for the checked
  records; its `report` counts the rest). A malformed record or one whose
  image file is missing is skipped and counted, never fatal; a missing `path`
  or `image_root` raises now, a file that is not JSON when read. Either may be
  on a bucket (`gs://...`)."""
  path, image_root = os.fspath(path), os.fspath(image_root)
  kind = path_kind(path, "--annotations")
  if kind is None:
    raise MissingPathError(
      f"LLaVA annotations {path!r} do not exist; pass "
      "llava_v1_5_mix665k.json (a JSON list) or a JSONL of its records"
    )
  if kind == "folder":
    raise PathError(f"LLaVA annotations {path!r} is a folder; pass the annotation file")
  if path_kind(image_root, "--input_dir") != "folder":
    raise MissingPathError(
      f"LLaVA image root {image_root!r} is not a folder; pass the folder "
      "the records' 'image' paths are relative to (the one holding "
      "coco/, gqa/, ocr_vqa/, textvqa/, vg/)"
    )
  return LlavaAnnotations(path, image_root)


def prepared_records(annotations: LlavaAnnotations) -> Iterator[dict]:
  """The records of the `llava` TFDS kind: `key`, `conversation` (the turns as
  JSON text) and `image`, the image file's bytes as they are (b"": none).

  The bytes are kept, not re-encoded as PNG: mix665k's images are JPEGs, and a
  copy is lossless (no second JPEG compression), several times smaller than a
  PNG of a photo, and as fast as the disk; PIL decodes whatever the format at
  training time, where an undecodable one is skipped and counted (the one
  place images are checked). A file that cannot be read now, or holds no
  bytes (which would be stored as a text-only record's b""), is counted with
  the missing images."""
  for record in annotations:
    data = b""
    if record["image"] is not None:
      try:
        data = read_all(record["image"])  # one request on a bucket
        why = "" if data else "is empty (0 bytes)"
      except OSError as e:
        why = f"cannot be read ({e})"
      if why:
        annotations.report.kept -= 1
        annotations.report.skip(
          "missing", f"record {record['key']}: image {record['image']!r} {why}"
        )
        continue
    yield {"key": record["key"], "conversation": json.dumps(record["turns"]), "image": data}


# --------------------------------------------------------------------- examples


class _MarkedTokenizer:
  """`tokenizer` whose `encode` writes each IMAGE_MARKER as <|im_start|> <image>
  <|im_end|> (the text on either side encoded as it is); everything else is
  the tokenizer's. What lets chat.render_chat place the image."""

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer

  def __getattr__(self, name):
    return getattr(self._tokenizer, name)

  def encode(self, text: str) -> list[int]:
    t = self._tokenizer
    ids: list[int] = []
    for k, piece in enumerate(text.split(IMAGE_MARKER)):
      if k:
        ids += [t.im_start_id, t.image_id, t.im_end_id]
      if piece:
        ids += t.encode(piece)
    return ids


def llava_example(
  turns: Sequence[Mapping[str, str]],
  image,
  tokenizer,
  *,
  template: str = "human_assistant",
  train_on_source: bool = False,
) -> Example:
  """The Example of a conversation (turns {"role", "content"}) about `image`
  (the vision encoder's input, or None for a text-only conversation): the
  turns rendered by chat.render_chat, the image's marker replaced by
  `<|im_start|> <image> <|im_end|>` (with no marker, "<image>\\n" opens the
  first user turn), `read=[True]`, cross-entropy where render_chat's mask says
  (the answers, or with `train_on_source` all but bos) and never on the
  placeholder. Raises ValueError for more markers than images."""
  markers = sum(turn["content"].count(IMAGE_MARKER) for turn in turns)
  if markers > (image is not None):
    raise ValueError(
      f"the conversation holds {markers} {IMAGE_MARKER!r} markers but "
      f"{int(image is not None)} image(s); give one image per marker"
    )
  if image is not None and not markers:
    first = next((k for k, turn in enumerate(turns) if turn["role"] == "user"), None)
    if first is None:
      raise ValueError("a conversation with an image needs a user turn to place it in")
    turns = [dict(turn) for turn in turns]
    turns[first]["content"] = IMAGE_MARKER + "\n" + turns[first]["content"]
  ids, mask = chat.render_chat(turns, _MarkedTokenizer(tokenizer), template, train_on_source)
  mask = [m and i != tokenizer.image_id for i, m in zip(ids, mask)]
  if image is None:
    return Example(ids, (), train_text=True, text_mask=mask)
  return Example(ids, [np.asarray(image, np.float32)], train_text=True, text_mask=mask, read=[True])


class SkippedRecord(Exception):
  """A prepared record that cannot become an example; the stream takes the
  next. `kind` says why, for the counts: "unreadable image" or "image past
  the row"."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


def decode_image(data: bytes, key: str):
  """The PIL image of a record's image bytes, read as the reference reads
  LLaVA's images (vision/images.py, no EXIF orientation); SkippedRecord when
  they are not a readable image."""
  try:
    return load_image(data, orient=False)
  except UnreadableImage as e:
    raise SkippedRecord(
      "unreadable image", f"record {key}: its image is not readable ({e.reason})"
    ) from None


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class LlavaExamples:
  """record -> Example for the prepared `llava` records under `config`: the
  image decoded and made the vision encoder's input, the conversation
  rendered with data.chat_template / data.train_on_source, an example with
  an image cut at the end to fit one row of data.seq_len (`cut` counts
  them). Raises SkippedRecord for a record to skip; ConfigError now for a
  config that cannot read LLaVA's images."""

  def __init__(self, config, tokenizer):
    m, d = config.model, config.data
    encoder = m.vision_encoder
    if not encoder:
      raise ConfigError(
        "data llava reads images, but model.vision_encoder is '' (the model "
        "reads none); set --config.model.vision_encoder=clip with "
        "model.vision from the CLIP folder (model.clip.read_clip_config), "
        "as configs/t2i_llava.py does"
      )
    if encoder == "vae" and not draws_pixels(config):
      raise ConfigError(
        "model.vision_encoder='vae' on a latent model reads SD-VAE latents of "
        "the images, and `prepare llava` stores the image files, not their "
        "latents; use model.vision_encoder='clip' (configs/t2i_llava.py) or a "
        "pixel model"
      )
    read_image_spec(m)  # raises for an unknown encoder
    spec = row_spec(config, tokenizer)
    if spec.max_read_images < 1:
      raise ConfigError(
        f"data.max_read_images_per_row={spec.max_read_images}: a LLaVA "
        "example reads one image; set --config.data.max_read_images_per_row=1"
      )
    # The ids of an example with its image: the placeholder becomes the Q
    # tokens (and the timestep token) of the read image.
    self.max_ids = spec.seq_len - spec.read_tokens - int(spec.cond_token) + 1
    if self.max_ids < 8:
      raise ConfigError(
        f"data.seq_len={spec.seq_len} leaves {self.max_ids} tokens beside one "
        f"read image of {spec.read_tokens} tokens; raise --config.data.seq_len"
      )
    self.config, self.tokenizer = config, tokenizer
    self.template = d.chat_template
    self.train_on_source = bool(d.train_on_source)
    chat.chat_template(self.template)  # raises for an unknown template
    self.cut = 0

  def __call__(self, record) -> Example:
    key = _text(record["key"])
    turns = json.loads(_text(record["conversation"]))
    data = record["image"]
    image = None
    if data:
      image = read_inputs(
        [decode_image(bytes(data), key)], self.config, vae=None, pixels=draws_pixels(self.config)
      )[0]
    example = llava_example(
      turns, image, self.tokenizer, template=self.template, train_on_source=self.train_on_source
    )
    if image is None or len(example.ids) <= self.max_ids:
      return example
    if self.tokenizer.image_id not in example.ids[: self.max_ids]:
      raise SkippedRecord(
        "image past the row",
        f"record {key}: its image comes after the "
        f"first {self.max_ids} tokens, past what one row of data.seq_len "
        "holds with it",
      )
    self.cut += 1
    if self.cut <= SHOWN_REASONS or self.cut % 1000 == 0:
      logging.warning(
        "llava record %s: %d tokens cut to %d to fit one row of data.seq_len "
        "with its image (%d examples cut so far)",
        key,
        len(example.ids),
        self.max_ids,
        self.cut,
      )
    return dataclasses.replace(
      example,
      ids=example.ids[: self.max_ids],
      text_mask=example.text_mask[: self.max_ids],
      cut=len(example.ids) - self.max_ids,
    )


class LlavaStream:
  """example_at(i) of the prepared `llava` records (pipeline.record_stream's
  seeded shuffle, repeated forever): a record that cannot become an example
  is skipped for the next one of the stream, so example i is a pure function
  of (seed, i) still; `skipped` counts the reasons (this process's)."""

  def __init__(
    self,
    records,
    to_example: Callable[[Any], Example],
    seed: int,
    where: str = "the prepared llava dataset",
  ):
    self.where = where
    self.skipped: collections.Counter = collections.Counter()
    self._examples = pipeline.record_stream(records, self._try(to_example), seed)

  def _try(self, to_example):
    def example_or_none(record, rng):
      try:
        return to_example(record)
      except SkippedRecord as e:
        self.skipped[e.kind] += 1
        total = sum(self.skipped.values())
        if total <= SHOWN_REASONS or total % 1000 == 0:
          logging.warning(
            "llava: skipped %s for the next record (%d skipped so far: %s)",
            e,
            total,
            dict(self.skipped),
          )
        return None

    return example_or_none

  def __call__(self, i: int) -> Example:
    for k in range(MAX_CONSECUTIVE_SKIPS):
      example = self._examples(i + k)
      if example is not None:
        return example
    raise FileFormatError(
      f"{self.where}: {MAX_CONSECUTIVE_SKIPS} records in a row from "
      f"example {i} cannot be read ({dict(self.skipped)}); prepare it "
      "again from the image files (python -m monoformer_jax.data.prepare "
      "llava)"
    )
