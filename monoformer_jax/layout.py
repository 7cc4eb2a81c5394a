"""The packed row: how an example is laid out in a row's columns, the ONE
contract the model, data, the loss and the samplers share.

An `Example` is token ids in which each image is ONE `<image>` placeholder
(exactly the reference's input_ids), its images ([h, w, C] float32, channels
last, one per placeholder, in order) and whether its text may train
cross-entropy. A row expands each placeholder into P = tokens_per_image
contiguous slots (Q = the vision encoder's tokens for a read image; one more,
before them, for the timestep token of `add_before_image_tokens`) and holds,
in L columns, one or more examples with at most M generated and R read
images. Which examples share a row is data/packing.py's choice; `Rows` writes
them. A batch of B rows is a dict of numpy arrays:

    tokens        int32 [B, L]    text ids; image slots hold <image>; padding <PAD>
    segment_ids   int32 [B, L]    0 = padding, 1, 2, ... = the example within the row
    image_ids     int32 [B, L]    0 = text, k >= 1 = the k-th image of the ROW
                                  (numbered across all the examples of the row)
    positions     int32 [B, L]    RoPE position, restarting at 0 for each example
    image_columns int32 [B, M, P] the column of each token of the image in slot m
                                  (image m + 1), in order; L (past the row) for an empty slot
    image_valid   bool  [B, M]    slot m holds an image
    cond_columns  int32 [B, M]    the column of slot m's timestep token (the
                                  `add_before_image_tokens` mode); L when none
    read_columns  int32 [B, R, Q] the columns of the Q tokens of READ image r
    read_valid    bool  [B, R]    read slot r holds an image
    read_cond_columns int32 [B, R] the timestep token before read image r; L when none
    targets       int32 [B, L]    tokens[l + 1] when l + 1 is in the same example, else 0
    text_weights  float32 [B, L]  1.0 where cross-entropy trains (see below)
    latents       float32 [B, M, h, w, C]  the k-th GENERATED image of a row in slot k - 1
    read_images   float32 [B, R, ...]      the r-th READ image (the vision encoder's input)
    examples_cut  int32 [B]       the row's examples whose text was cut to fit
                                  (`Example.cut`); host-side only (`HOST_KEYS`)

Each image of an example is either GENERATED (noised, trained by the
diffusion loss, bidirectional inside itself: `image_ids` k >= 1) or READ
(`Example.read`: clean, through the vision encoder and `im_embedder`, no
diffusion loss). A read image's tokens are causal, like text (`image_ids` 0,
the reference), or with `RowSpec.read_bidirectional` one block of their own
(`image_ids` -r - 1, what Transfusion does). With the `add_before_image_tokens`
conditioning (`RowSpec.cond_token`) every image, of either kind, is preceded
by one timestep token, outside the image's block (`image_ids` 0), which the
model fills with t_projector(t_embedder(t)) (t = 0 for a read image).

All but the last five are what the model reads (`Row`); the model places
image tokens at the columns named here and reads them back from there, and
the loss counts the slots `image_valid` names, so no other module re-derives
the layout.

`text_weights[l]` is 1 iff the example trains text, l + 1 is in the same
example, tokens[l + 1] is a text token (never an image slot or a timestep
token) and the example's `text_mask` (one bool per id, None: all True) is True
at that target token. An example trains text iff its `train_text` is set and
it generates no image, is `interleaved`, or `text_on_image_examples` is on:
off reproduces the reference (CE on examples without a generated image, so on
the answers about read images too); on adds the Transfusion-style CE on
prompts and captions. The mask picks targets within an example, e.g. only the
assistant's answers of a chat (data/chat.py); a placeholder's entry is False.

Generation uses a second layout, `prompt_rows`: one prompt per row, LEFT-
padded so every prompt ends at the same column, followed by the slots being
generated (new text tokens, or the P tokens of one image). All rows then write
and read the same columns at every step, which is what a KV cache with one
offset per batch needs; positions still restart at 0 where each prompt starts.
`PromptLayout` says which columns are which. A prompt and what a sampler
writes after it must fit the rows the model was trained on
(`check_trained_length`, every sampler's one rule).

Nothing is dropped, reordered or cut silently. An example with images that
cannot fit one row (too long, too many images, an image of the wrong shape)
raises (`pieces_of`); one whose maker cut its text to fit (a long caption,
data/prompts.py `image_example`) says how much in `Example.cut`, and the rows
count such examples in `examples_cut`, which the training loop adds up and
logs and never sends to the devices. A text-only example longer than L is split into
consecutive pieces of at most L tokens, each laid out as its own example
(positions restart in each piece, and no target crosses a cut); since it
holds no image, no cut falls inside one; its `text_mask` is cut with it.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from monoformer_jax.config.schema import CONDITIONING_TOKEN_MODE, VISION_ENCODERS
from monoformer_jax.errors import ConfigError


def tokens_per_image(model_cfg) -> int:
  """P: the patch tokens of one image, (image_size / patch_size)^2."""
  size, patch = model_cfg.image_size, model_cfg.patch_size
  if patch < 1 or size % patch:
    raise ConfigError(f"model.image_size={size} is not a multiple of model.patch_size={patch}")
  return (size // patch) ** 2


def read_image_spec(model_cfg) -> tuple[tuple[int, int, int], int] | None:
  """(shape of a read image as the vision encoder takes it, Q its tokens), or
  None for a model without a vision encoder. `vae`: the image in the model's
  latent space (the SD-VAE latent, or the pixels of a pixel model), patchified
  as generated images are; `clip`: CLIP-preprocessed pixels [S, S, 3]."""
  encoder = model_cfg.vision_encoder
  if encoder == "vae":
    return (
      (model_cfg.image_size, model_cfg.image_size, model_cfg.in_channels),
      tokens_per_image(model_cfg),
    )
  if encoder == "clip":
    v = model_cfg.vision
    return (v.image_size, v.image_size, 3), (v.image_size // v.patch_size) ** 2
  if encoder:
    raise ConfigError(f"model.vision_encoder={encoder!r}: choose one of {VISION_ENCODERS}")
  return None


@dataclasses.dataclass
class Example:
  """One training (or prompting) sequence before packing.

  `ids`: 1-D token ids, each image as ONE `<image>` placeholder.
  `images`: one [h, w, C] float32 array per placeholder, in order.
  `train_text`: whether this example's text may train cross-entropy.
  `text_mask`: None, or one bool per id of `ids`: True where that token may be
  a cross-entropy target (False on placeholders); None: every text token.
  `read`: None (every image generated), or one bool per image: True where the
  image is READ (clean, the vision encoder's input shape, no diffusion loss).
  `interleaved`: its text trains cross-entropy although it generates images
  (text and images written together: the model learns where to draw),
  whatever `text_on_image_examples` says.
  `cut`: how many ids its maker cut from its text so that it fits a row (0:
  none); counted per row in the batch's `examples_cut`.
  """

  ids: Sequence[int]
  images: Sequence[np.ndarray] = ()
  train_text: bool = True
  text_mask: Sequence[bool] | None = None
  read: Sequence[bool] | None = None
  interleaved: bool = False
  cut: int = 0

  def read_flags(self) -> list[bool]:
    return [False] * len(self.images) if self.read is None else [bool(r) for r in self.read]


@dataclasses.dataclass(frozen=True)
class RowSpec:
  """Everything packing needs to know about rows and images."""

  seq_len: int  # L
  max_images: int  # M, images per row
  image_shape: tuple[int, int, int]  # (h, w, C)
  tokens_per_image: int  # P
  image_id: int
  pad_id: int
  text_on_image_examples: bool = False
  cond_token: bool = False  # a timestep token before every image
  max_read_images: int = 0  # R, read images per row
  read_shape: tuple[int, ...] = ()  # a read image as the vision encoder takes it
  read_tokens: int = 0  # Q
  read_bidirectional: bool = False  # read images attend inside themselves both ways

  def __post_init__(self):
    object.__setattr__(self, "image_shape", tuple(int(d) for d in self.image_shape))
    object.__setattr__(self, "read_shape", tuple(int(d) for d in self.read_shape))
    if self.seq_len < 1 or self.max_images < 0 or self.tokens_per_image < 1:
      raise ValueError(
        f"bad row spec: seq_len={self.seq_len} (>= 1), max_images="
        f"{self.max_images} (>= 0), tokens_per_image="
        f"{self.tokens_per_image} (>= 1)"
      )
    if len(self.image_shape) != 3:
      raise ValueError(f"image_shape={self.image_shape} must be (h, w, C)")


def row_spec(config, tokenizer) -> RowSpec:
  """The RowSpec of a config (data.seq_len, data.max_images_per_row,
  data.max_read_images_per_row, model.*)."""
  m = config.model
  read = read_image_spec(m)
  read_shape, read_tokens = read if read else ((), 0)
  return RowSpec(
    seq_len=config.data.seq_len,
    max_images=config.data.max_images_per_row,
    image_shape=(m.image_size, m.image_size, m.in_channels),
    tokens_per_image=tokens_per_image(m),
    image_id=tokenizer.image_id,
    pad_id=tokenizer.pad_id,
    text_on_image_examples=bool(config.loss.text_on_image_examples),
    cond_token=m.conditioning == CONDITIONING_TOKEN_MODE,
    max_read_images=config.data.max_read_images_per_row if read else 0,
    read_shape=read_shape,
    read_tokens=read_tokens,
    read_bidirectional=bool(m.read_bidirectional),
  )


# Arrays of a packed batch that are for the host's log, not the model: the
# training loop takes them out before the batch goes to the devices.
HOST_KEYS = ("examples_cut",)


def batch_shapes(config, rows: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """(shape, dtype) of each array of a batch of `rows` (default data.batch_size)
  packed rows of `config`, with no tokenizer and no data: what an ahead-of-time
  compile traces the train step with. Read off the row writer's own empty
  batch, so it is what packing makes."""
  rows = config.data.batch_size if rows is None else rows
  ids = types.SimpleNamespace(image_id=0, pad_id=0)  # token ids change no shape
  empty = Rows(0, row_spec(config, ids)).batch()
  return {
    name: ((rows,) + x.shape[1:], x.dtype) for name, x in empty.items() if name not in HOST_KEYS
  }


class Row(NamedTuple):
  """Rows as the model reads them (numpy or jax arrays; a pytree): see the
  module docstring for each field."""

  tokens: Any  # int32 [B, L]
  segment_ids: Any  # int32 [B, L]
  image_ids: Any  # int32 [B, L]
  positions: Any  # int32 [B, L]
  image_columns: Any  # int32 [B, M, P]
  image_valid: Any  # bool [B, M]
  cond_columns: Any = None  # int32 [B, M]; None: no timestep tokens
  read_columns: Any = None  # int32 [B, R, Q]; None: no read images
  read_valid: Any = None  # bool [B, R]
  read_cond_columns: Any = None  # int32 [B, R]

  @classmethod
  def of(cls, batch: Mapping[str, Any]) -> Row:
    """The Row fields of a packed batch (a dict from `pack_examples`)."""
    return cls(*(batch.get(name) for name in cls._fields))


def image_slots(image_ids_BxL, max_images: int, tokens_per_image: int):
  """(image_columns int32 [B, M, P], image_valid bool [B, M]) of rows given
  by their image ids: slot m holds image m + 1, whose P tokens must be
  contiguous. Raises, naming the row, for ids that no packed row can hold."""
  ids_BxL = np.asarray(image_ids_BxL)
  b, length = ids_BxL.shape
  m, p = max_images, tokens_per_image
  if ids_BxL.size and ids_BxL.max() > m:
    raise ValueError(
      f"rows hold image {int(ids_BxL.max())} but a row holds at most "
      f"{m} images (data.max_images_per_row)"
    )
  columns_BxMxP = np.full((b, m, p), length, np.int32)
  valid_BxM = np.zeros((b, m), bool)
  for slot in range(m):
    is_image_BxL = ids_BxL == slot + 1
    count_B = is_image_BxL.sum(axis=1)
    first_B = is_image_BxL.argmax(axis=1)
    cols_BxP = first_B[:, None] + np.arange(p)
    inside_BxP = np.take_along_axis(is_image_BxL, np.minimum(cols_BxP, length - 1), axis=1)
    whole_B = (count_B == p) & inside_BxP.all(axis=1) & (first_B + p <= length)
    bad = np.flatnonzero((count_B != 0) & ~whole_B)
    if bad.size:
      r = int(bad[0])
      raise ValueError(
        f"row {r} holds {int(count_B[r])} tokens of image {slot + 1}, not "
        f"one contiguous run of tokens_per_image={p} (model.image_size / "
        "model.patch_size, squared); build rows with monoformer_jax.layout"
      )
    columns_BxMxP[:, slot] = np.where(whole_B[:, None], cols_BxP, length)
    valid_BxM[:, slot] = whole_B
  return columns_BxMxP, valid_BxM


def cond_columns_of(columns_BxMxP, valid_BxM, cond_token: bool, length: int):
  """int32 [B, M]: the column of each image slot's timestep token, the one
  before the image's first token (`add_before_image_tokens`); `length` (past
  the row) for an empty slot or without the token."""
  if not cond_token:
    return np.full(np.shape(valid_BxM), length, np.int32)
  return np.where(valid_BxM, np.asarray(columns_BxMxP)[:, :, 0] - 1, length).astype(np.int32)


def check_one_image_per_row(row: Row, tokens_per_image: int):
  """Raises unless every row holds exactly one image of `tokens_per_image`
  slots (what an image sampler generates into)."""
  images_B = (np.asarray(row.image_ids) > 0).sum(axis=1)
  m, p = np.asarray(row.image_columns).shape[1:]
  if m != 1 or p != tokens_per_image or not np.asarray(row.image_valid).all():
    raise ValueError(
      f"each row must hold exactly one image of {tokens_per_image} slots; "
      f"rows hold {sorted(set(images_B.tolist()))} image tokens"
    )


def _image_tokens(read: bool, spec: RowSpec) -> int:
  """Columns one placeholder expands to: the image's tokens (and its timestep token)."""
  return (spec.read_tokens if read else spec.tokens_per_image) + int(spec.cond_token)


def expanded_length(example: Example, spec: RowSpec) -> int:
  """The columns `example` takes in a row: its ids with every placeholder expanded."""
  return len(example.ids) + sum(_image_tokens(r, spec) - 1 for r in example.read_flags())


def pieces_of(example: Example, spec: RowSpec, index: int) -> list[Example]:
  """The pieces `example` is laid out as (itself, or a long text cut into
  pieces of <= L tokens), each fitting one row of `spec`; raises, naming
  example `index` and the fix, if it cannot be laid out at all."""
  ids = np.asarray(example.ids)
  if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(
      f"example {index}: ids must be a non-empty 1-D sequence of ints, "
      f"got shape {ids.shape} dtype {ids.dtype}"
    )
  ids = ids.astype(np.int32)
  n_placeholders = int((ids == spec.image_id).sum())
  n_images = len(example.images)
  if n_placeholders != n_images:
    raise ValueError(
      f"example {index} has {n_placeholders} <image> placeholders "
      f"(id {spec.image_id}) but {n_images} images; give one image "
      "per placeholder"
    )
  mask = _checked_mask(example.text_mask, ids == spec.image_id, index)
  if not n_images:
    return [
      Example(
        ids[i : i + spec.seq_len],
        (),
        example.train_text,
        None if mask is None else mask[i : i + spec.seq_len],
        cut=example.cut if i == 0 else 0,  # counted once
      )
      for i in range(0, len(ids), spec.seq_len)
    ]
  read = _checked_read(example, index)
  images = [np.asarray(im, np.float32) for im in example.images]
  n_read = sum(read)
  if n_read and not spec.read_tokens:
    raise ConfigError(
      f"example {index} reads {n_read} image(s) but the model has no vision encoder "
      "(model.vision_encoder is ''); set --config.model.vision_encoder=vae (or clip, "
      "with model.vision from the CLIP folder) to train image understanding"
    )
  for k, (image, is_read) in enumerate(zip(images, read)):
    want = spec.read_shape if is_read else spec.image_shape
    if image.shape != want:
      what = (
        "read images of shape {} (the vision encoder's input: model.vision_encoder)"
        if is_read
        else "generated images of shape {} (model.image_size, model.image_size, model.in_channels)"
      ).format(want)
      raise ConfigError(
        f"example {index}: image {k} has shape {image.shape} but rows hold "
        f"{what}; resize the images or change the config"
      )
  if n_images - n_read > spec.max_images:
    raise ConfigError(
      f"example {index} has {n_images - n_read} images but a row holds at most "
      f"data.max_images_per_row={spec.max_images}; raise "
      f"--config.data.max_images_per_row to at least {n_images - n_read}"
    )
  if n_read > spec.max_read_images:
    raise ConfigError(
      f"example {index} reads {n_read} images but a row holds at most "
      f"data.max_read_images_per_row={spec.max_read_images}; raise "
      f"--config.data.max_read_images_per_row to at least {n_read}"
    )
  need = expanded_length(example, spec)
  if need > spec.seq_len:
    raise ConfigError(
      f"example {index} needs {need} tokens (text {len(ids) - n_images} + "
      f"{n_images - n_read} image(s) of {_image_tokens(False, spec)}"
      + (f" + {n_read} read image(s) of {_image_tokens(True, spec)}" if n_read else "")
      + f") but data.seq_len is {spec.seq_len}; raise --config.data.seq_len to at "
      f"least {need}"
    )
  return [Example(ids, images, example.train_text, mask, read, example.interleaved, example.cut)]


def _checked_read(example: Example, index: int) -> list[bool]:
  if example.read is not None and len(example.read) != len(example.images):
    raise ValueError(
      f"example {index}: read has {len(example.read)} flags for "
      f"{len(example.images)} images; give one bool per image (True: read)"
    )
  return example.read_flags()


def _checked_mask(text_mask, is_placeholder_N, index: int) -> np.ndarray | None:
  """`text_mask` as bool [N] (None stays None); raises, naming example
  `index`, unless it is one 0/1 entry per id, False on every placeholder."""
  if text_mask is None:
    return None
  mask_N = np.asarray(text_mask)
  n = len(is_placeholder_N)
  if mask_N.shape != (n,):
    raise ValueError(
      f"example {index}: text_mask has shape {mask_N.shape} but the example "
      f"has {n} ids; give one bool per id (placeholders included) or None"
    )
  if mask_N.size and (mask_N.dtype.kind not in "biu" or not np.isin(mask_N, (0, 1)).all()):
    raise ValueError(
      f"example {index}: text_mask must hold bools (or 0/1), got dtype {mask_N.dtype}"
    )
  mask_N = mask_N.astype(bool)
  if (mask_N & is_placeholder_N).any():
    at = int(np.flatnonzero(mask_N & is_placeholder_N)[0])
    raise ValueError(
      f"example {index}: text_mask is True at id {at}, an <image> "
      "placeholder; an image is never a text target, set it False"
    )
  return mask_N


class Rows:
  """R empty rows being filled, and how full each one is: the row writer.

  `put` appends a piece from `pieces_of` to a row (the caller chose the row
  and checked that the piece fits it); `batch` is the rows as a packed batch.
  """

  def __init__(self, rows: int, spec: RowSpec):
    length = spec.seq_len
    self.spec = spec
    self.tokens = np.full((rows, length), spec.pad_id, np.int32)
    self.segment_ids = np.zeros((rows, length), np.int32)
    self.image_ids = np.zeros((rows, length), np.int32)
    self.positions = np.zeros((rows, length), np.int32)
    self.targets = np.zeros((rows, length), np.int32)
    self.text_weights = np.zeros((rows, length), np.float32)
    self.latents = np.zeros((rows, spec.max_images) + spec.image_shape, np.float32)
    r, q = spec.max_read_images, spec.read_tokens
    self.read_columns = np.full((rows, r, q), length, np.int32)
    self.read_valid = np.zeros((rows, r), bool)
    self.read_cond_columns = np.full((rows, r), length, np.int32)
    self.read_images = np.zeros((rows, r) + spec.read_shape, np.float32)
    self.used = np.zeros(rows, np.int64)
    self.n_examples = np.zeros(rows, np.int64)
    self.n_images = np.zeros(rows, np.int64)
    self.n_read = np.zeros(rows, np.int64)
    self.examples_cut = np.zeros(rows, np.int32)

  def put(self, r: int, example: Example):
    """Appends a validated piece to row r (the caller checked that it fits)."""
    spec = self.spec
    ids = np.asarray(example.ids, np.int32)
    is_placeholder = ids == spec.image_id
    read = np.zeros(len(ids), bool)
    read[is_placeholder] = example.read_flags()
    generated = is_placeholder & ~read
    counts = np.where(
      is_placeholder,
      np.where(read, spec.read_tokens, spec.tokens_per_image) + int(spec.cond_token),
      1,
    )
    tokens_L = np.repeat(ids, counts)
    is_image_L = np.repeat(is_placeholder, counts)  # image and timestep-token columns
    first, first_read = int(self.n_images[r]), int(self.n_read[r])
    # Per id: the image id its columns carry (a timestep token's is fixed below).
    block_N = np.where(generated, first + np.cumsum(generated), 0)
    if spec.read_bidirectional:
      block_N = np.where(read, -(first_read + np.cumsum(read)), block_N)
    image_ids_L = np.repeat(block_N, counts)
    n = len(tokens_L)
    start = int(self.used[r])
    end = start + n
    starts_N = start + np.concatenate([[0], np.cumsum(counts)[:-1]])  # column of each id
    if spec.cond_token:
      image_ids_L[starts_N[is_placeholder] - start] = 0  # the timestep token: causal
    for j, col in enumerate(starts_N[read]):
      slot = first_read + j
      first_col = col + int(spec.cond_token)
      self.read_columns[r, slot] = first_col + np.arange(spec.read_tokens)
      self.read_valid[r, slot] = True
      if spec.cond_token:
        self.read_cond_columns[r, slot] = col
    self.tokens[r, start:end] = tokens_L
    self.segment_ids[r, start:end] = self.n_examples[r] + 1
    self.image_ids[r, start:end] = image_ids_L
    self.positions[r, start:end] = np.arange(n)
    self.targets[r, start : end - 1] = tokens_L[1:]
    trains = example.train_text and (
      not generated.any() or spec.text_on_image_examples or example.interleaved
    )
    if trains:
      target_L = ~is_image_L
      if example.text_mask is not None:
        target_L &= np.repeat(np.asarray(example.text_mask, bool), counts)
      self.text_weights[r, start : end - 1] = target_L[1:]
    n_gen = 0
    for image, is_read in zip(example.images, example.read_flags()):
      if is_read:
        self.read_images[r, first_read] = image
        first_read += 1
      else:
        self.latents[r, first + n_gen] = image
        n_gen += 1
    self.used[r] = end
    self.n_examples[r] += 1
    self.examples_cut[r] += example.cut > 0
    self.n_images[r] = first + n_gen
    self.n_read[r] = first_read

  def batch(self) -> dict[str, np.ndarray]:
    spec = self.spec
    columns, valid = image_slots(self.image_ids, spec.max_images, spec.tokens_per_image)
    cond = cond_columns_of(columns, valid, spec.cond_token, self.tokens.shape[1])
    return dict(
      tokens=self.tokens,
      segment_ids=self.segment_ids,
      image_ids=self.image_ids,
      positions=self.positions,
      image_columns=columns,
      image_valid=valid,
      cond_columns=cond,
      read_columns=self.read_columns,
      read_valid=self.read_valid,
      read_cond_columns=self.read_cond_columns,
      targets=self.targets,
      text_weights=self.text_weights,
      latents=self.latents,
      read_images=self.read_images,
      examples_cut=self.examples_cut,
    )


def useful_work(segment_ids_BxL) -> tuple[int, int]:
  """(tokens, attended) of packed rows: the columns that hold an example (not
  padding) and the query-key pairs inside the examples, the sum over examples
  of their length squared. With model.build.train_flops_counter, the model
  FLOPs of the useful work, which MFU counts (a row's padding and the pairs
  across examples are computed or skipped, but are not the model's work)."""
  seg_BxL = np.asarray(segment_ids_BxL, np.int64)
  b, s = seg_BxL.shape[0], int(seg_BxL.max(initial=0)) + 1
  # One count per (row, segment id): a pass over the columns, whatever the segments.
  counts_BxS = np.bincount((np.arange(b)[:, None] * s + seg_BxL).ravel(), minlength=b * s)
  lengths = counts_BxS.reshape(b, s)[:, 1:]  # id 0 is padding
  return int(lengths.sum()), int((lengths**2).sum())


@dataclasses.dataclass(frozen=True)
class PromptLayout:
  """Which columns of `prompt_rows` rows are which (hashable, so compiled
  samplers can be specialised on it): prompts end at column prompt_len - 1 and
  the `new_tokens` slots being generated follow."""

  prompt_len: int  # Lp
  new_tokens: int

  @property
  def length(self) -> int:
    return self.prompt_len + self.new_tokens

  def new_column(self, i):
    """The column of new slot i (an int or a traced integer)."""
    return self.prompt_len + i

  def prompt(self, x_BxL):
    """The prompt columns [B, Lp] of a per-token array."""
    return x_BxL[:, : self.prompt_len]

  def new(self, x_BxL):
    """The new slots' columns [B, new_tokens] of a per-token array."""
    return x_BxL[:, self.prompt_len :]


@dataclasses.dataclass(frozen=True)
class PromptRows:
  """Rows from `prompt_rows`: the arrays (numpy) and their layout; `read_images`
  [B, R, ...] the images the prompts read (None when they read none)."""

  row: Row
  layout: PromptLayout
  read_images: Any = None


def prompt_rows(
  prompts: Sequence[Sequence[int] | Example],
  *,
  pad_id: int,
  new_tokens: int = 0,
  new_token_id: int | None = None,
  image: bool = False,
  cond_token: bool = False,
  spec: RowSpec | None = None,
  multiple: int = 8,
) -> PromptRows:
  """Rows [B, L] of left-padded prompts and the slots being generated after them.

  A prompt is token ids, or an `Example` whose images are all READ (its
  placeholders expand as packing expands them, so `spec` is needed). The
  prompts end at column Lp - 1 (Lp = the longest expanded prompt rounded up to
  `multiple`). segment_ids are 0 on the left padding and 1 on the prompt and
  the slots; positions are 0 at each prompt's first token, counting on through
  the slots. Without `image` the slots are `new_tokens` text slots holding
  `new_token_id` (default `pad_id`). With `image` they are one generated image
  of `new_tokens` tokens (image id 1, slot 0 of the row), preceded by its
  timestep token when `cond_token` (then the layout has new_tokens + 1 slots).
  """
  if not prompts or any(len(p.ids if isinstance(p, Example) else p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (e.g. bos)")
  if spec is None:
    if any(isinstance(p, Example) and len(p.images) for p in prompts):
      raise ValueError("prompts that read images need the RowSpec (spec=) to lay them out")
    spec = RowSpec(
      seq_len=1, max_images=0, image_shape=(1, 1, 1), tokens_per_image=1, image_id=-1, pad_id=pad_id
    )
  expanded = [_prompt_columns(p, spec, i) for i, p in enumerate(prompts)]
  rows = len(prompts)
  lp = -(-max(e.used[0] for e in expanded) // multiple) * multiple
  slots = new_tokens + int(image and cond_token)
  layout = PromptLayout(lp, slots)
  length = layout.length
  tokens = np.full((rows, length), pad_id, np.int32)
  tokens[:, lp:] = pad_id if new_token_id is None else new_token_id
  segment_ids = np.zeros((rows, length), np.int32)
  positions = np.zeros((rows, length), np.int32)
  image_ids = np.zeros((rows, length), np.int32)
  r_max = max(e.read_valid.shape[1] for e in expanded)
  read_columns = np.full((rows, r_max, spec.read_tokens), length, np.int32)
  read_valid = np.zeros((rows, r_max), bool)
  read_cond = np.full((rows, r_max), length, np.int32)
  read_images = np.zeros((rows, r_max) + spec.read_shape, np.float32)
  for r, e in enumerate(expanded):
    n = int(e.used[0])
    start = lp - n
    tokens[r, start:lp] = e.tokens[0, :n]
    image_ids[r, start:lp] = e.image_ids[0, :n]
    segment_ids[r, start:] = 1
    positions[r, start:] = np.arange(length - start)
    k = e.read_valid.shape[1]
    read_valid[r, :k] = e.read_valid[0]
    read_columns[r, :k] = np.where(e.read_valid[0, :, None], e.read_columns[0] + start, length)
    read_cond[r, :k] = np.where(
      e.read_valid[0] & (e.read_cond_columns[0] < n), e.read_cond_columns[0] + start, length
    )
    read_images[r, :k] = e.read_images[0]
  if image:
    image_ids[:, lp + int(cond_token) :] = 1
  columns, valid = image_slots(image_ids, 1 if image else 0, new_tokens if image else 0)
  cond = np.full((rows, int(image)), lp if cond_token else length, np.int32)
  row = Row(
    tokens,
    segment_ids,
    image_ids,
    positions,
    columns,
    valid,
    cond,
    read_columns,
    read_valid,
    read_cond,
  )
  return PromptRows(row, layout, read_images if r_max else None)


def prompt_lengths(prompts: Sequence[Sequence[int] | Example], spec: RowSpec | None = None):
  """The positions each prompt of `prompt_rows` takes: its ids, each read
  image expanded to its tokens (which needs `spec`)."""
  return [
    expanded_length(p, spec)
    if isinstance(p, Example) and len(p.images)
    else len(getattr(p, "ids", p))
    for p in prompts
  ]


def check_trained_length(
  lengths: Sequence[int],
  new: int,
  seq_len: int,
  *,
  new_what: str,
  budget: str | None = None,
  label: str = "prompt {}",
):
  """Refuses prompts whose rows would pass the positions the model was trained
  on, before anything is compiled: prompt i takes `lengths[i]` positions (its
  read images expanded) and the sampler writes `new` more after it (`new_what`
  says what they are); all must fit `seq_len`, the config's data.seq_len.
  RoPE has no position table (model/llama.py), so nothing else stops a longer
  row: past data.seq_len are positions the model never saw, and the answers
  there are noise. `budget` names the argument that sets `new` (e.g.
  '--max_new_tokens'), for the fix; None when it is fixed (an image's tokens).
  `label` names prompt i (formatted with i)."""
  i = max(range(len(lengths)), key=lambda k: lengths[k])
  n = int(lengths[i])
  if n + new <= seq_len:
    return
  fixes = []
  if new < seq_len:
    cut = n + new - seq_len
    fixes.append(f"shorten it by {cut:,} token{'s' if cut > 1 else ''}")
  if budget and n < seq_len:
    fixes.append(f"lower {budget} to {seq_len - n:,}")
  if budget and not fixes:
    fixes.append(f"shorten it and lower {budget}: the two may take {seq_len:,} together")
  raise ConfigError(
    f"{label.format(i)} takes {n:,} positions and {new_what} {new:,}: {n + new:,} in all, past "
    f"the {seq_len:,} of the rows the model was trained on (data.seq_len); "
    + (" or ".join(fixes) or "use a model trained on longer rows")
  )


def _prompt_columns(prompt, spec: RowSpec, index: int) -> Rows:
  """One prompt laid out alone in a row of exactly its expanded length."""
  example = prompt if isinstance(prompt, Example) else Example(prompt, train_text=False)
  if not all(example.read_flags()):
    raise ValueError(
      f"prompt {index} holds an image to generate; a prompt may only read "
      "images (Example.read all True), the generated image follows it"
    )
  length = expanded_length(example, spec)
  row_spec = dataclasses.replace(
    spec, seq_len=length, max_images=0, max_read_images=len(example.images)
  )
  (piece,) = pieces_of(example, row_spec, index)
  out = Rows(1, row_spec)
  out.put(0, piece)
  return out
