"""Tokenizers: Llama's SentencePiece (TinyLlama's) and a byte-level one, one interface.

Both follow Llama's id layout, so they agree on every id they share: 0 <unk>,
1 <s> (bos), 2 </s> (eos), and byte b's fallback piece <0xBB> at 3 + b ("\\n"
is 13 in both). MonoFormer's four added tokens follow the base vocabulary in
the reference's order: <PAD>, <image>, <|im_start|>, <|im_end|> (32000..32003
for Llama, 259..262 for bytes). `encode` adds no bos/eos and does not parse
those token strings: the data code places special ids itself.

    load_tokenizer("bytes")                      # the embedded digits default
    load_tokenizer("/models/TinyLlama-1.1B")     # its tokenizer.model (or tokenizer.json)
    load_tokenizer("gs://bucket/TinyLlama-1.1B") # the same, read from a bucket
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from etils import epath

from monoformer_jax import hub
from monoformer_jax.errors import ConfigError, FileFormatError, MissingPathError
from monoformer_jax.paths import is_local

SPECIAL_TOKENS = ("<PAD>", "<image>", "<|im_start|>", "<|im_end|>")


class Tokenizer:
  """The shared interface; subclasses set `base_vocab` and encode/decode."""

  unk_id = 0
  bos_id = 1
  eos_id = 2
  base_vocab: int  # ids below it belong to the base tokenizer; the 4 added follow

  @property
  def pad_id(self) -> int:
    return self.base_vocab

  @property
  def image_id(self) -> int:
    return self.base_vocab + 1

  @property
  def im_start_id(self) -> int:
    return self.base_vocab + 2

  @property
  def im_end_id(self) -> int:
    return self.base_vocab + 3

  @property
  def vocab_size(self) -> int:
    return self.base_vocab + len(SPECIAL_TOKENS)

  @property
  def special_ids(self) -> dict[str, int]:
    """{token string: id} of the four added tokens."""
    return dict(zip(SPECIAL_TOKENS, range(self.base_vocab, self.vocab_size)))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; bos/eos/unk, the added tokens and ids outside the
    vocabulary are dropped."""
    raise NotImplementedError

  def _text_ids(self, ids: Iterable[int]) -> list[int]:
    return [int(i) for i in ids if 2 < int(i) < self.base_vocab]


_BYTE_OFFSET = 3


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as tokens, plus bos/eos and MonoFormer's four added tokens."""

  base_vocab = _BYTE_OFFSET + 256  # 259: pad 259, image 260, im_start 261, im_end 262

  def encode(self, text: str) -> list[int]:
    return [_BYTE_OFFSET + b for b in text.encode("utf-8")]

  def decode(self, ids: Iterable[int]) -> str:
    data = bytes(i - _BYTE_OFFSET for i in self._text_ids(ids))
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
  """Llama's tokenizer from its SentencePiece `tokenizer.model`.

  `encode` is SentencePiece's own (a "▁" is prepended to the text, as the
  reference's TinyLlama tokenizer does); bytes outside the vocabulary fall back
  to their <0xBB> pieces.
  """

  def __init__(self, model_file: str):
    import sentencepiece as spm

    self.path = os.fspath(model_file)
    try:
      if is_local(self.path):
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
      else:  # SentencePiece opens only local files; it takes the model's bytes too
        self.sp = spm.SentencePieceProcessor(model_proto=epath.Path(self.path).read_bytes())
    except RuntimeError as e:  # what SentencePiece raises for a file it cannot parse
      raise FileFormatError(
        f"{self.path} is not a SentencePiece model ({str(e).strip()}); pass Llama's "
        "tokenizer.model, a tokenizer.json, or 'bytes'"
      ) from e
    self.base_vocab = self.sp.get_piece_size()
    for name, want in (("unk", self.unk_id), ("bos", self.bos_id), ("eos", self.eos_id)):
      got = getattr(self.sp, f"{name}_id")()
      if got != want:
        raise FileFormatError(
          f"{self.path}: {name} id is {got}, but MonoFormer uses Llama's "
          f"layout with {name}={want}; use a Llama SentencePiece model"
        )

  def encode(self, text: str) -> list[int]:
    return list(self.sp.encode(text))

  def decode(self, ids: Iterable[int]) -> str:
    return self.sp.decode(self._text_ids(ids))


class HFJsonTokenizer(Tokenizer):
  """Llama's tokenizer from a Hugging Face `tokenizer.json`.

  If the file already holds the four added tokens (saved after the reference's
  setup_tokenizer) they must be the last four ids; otherwise they are appended.
  """

  def __init__(self, json_file: str):
    from tokenizers import Tokenizer as HFTokenizer

    self.path = os.fspath(json_file)
    text = None if is_local(self.path) else epath.Path(self.path).read_text()
    try:  # `tokenizers` opens only local files; it takes the JSON text too
      self.tok = HFTokenizer.from_file(self.path) if text is None else HFTokenizer.from_str(text)
    except Exception as e:  # `tokenizers` raises a bare Exception for a file it cannot parse
      raise FileFormatError(
        f"{self.path} is not a Hugging Face tokenizer.json ({e}); pass the model's "
        "tokenizer.json, a tokenizer.model, or 'bytes'"
      ) from e
    size = self.tok.get_vocab_size(with_added_tokens=True)
    present = [self.tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if all(i is None for i in present):
      self.base_vocab = size
    elif present == list(range(size - 4, size)):
      self.base_vocab = size - 4
    else:
      raise FileFormatError(
        f"{self.path} has the added tokens {dict(zip(SPECIAL_TOKENS, present))}"
        f"; MonoFormer expects them absent or as the last 4 ids "
        f"{list(range(size - 4, size))}"
      )
    for name, token, want in (("bos", "<s>", self.bos_id), ("eos", "</s>", self.eos_id)):
      if self.tok.token_to_id(token) != want:
        raise FileFormatError(
          f"{self.path}: {token} has id {self.tok.token_to_id(token)}, but "
          f"MonoFormer uses Llama's layout with {name}={want}"
        )

  def encode(self, text: str) -> list[int]:
    return list(self.tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Iterable[int]) -> str:
    return self.tok.decode(self._text_ids(ids), skip_special_tokens=True)


def load_tokenizer(spec: str) -> Tokenizer:
  """'bytes', a `tokenizer.model` / `tokenizer.json`, a folder holding one
  (tokenizer.model preferred: it needs no extra package), or a hub id
  (`TinyLlama/TinyLlama-1.1B-Chat-v1.0`: its tokenizer files, see hub.py)."""
  spec = os.fspath(spec)
  if spec == "bytes":
    return ByteTokenizer()
  given, spec = spec, hub.local_path(spec, "tokenizer", "tokenizer")  # a hub id: its snapshot
  where = epath.Path(spec)
  if where.is_dir():
    for name in ("tokenizer.model", "tokenizer.json"):
      if (where / name).exists():
        return load_tokenizer(os.path.join(spec, name))
    named = spec if given == spec else f"the hub repo {given} ({spec})"
    raise MissingPathError(f"no tokenizer.model or tokenizer.json in {named}")
  if not where.exists():
    raise MissingPathError(
      f"tokenizer {spec!r} does not exist; pass 'bytes', a "
      "tokenizer.model, a tokenizer.json or a folder holding one"
    )
  if spec.endswith(".json"):
    return HFJsonTokenizer(spec)
  return SentencePieceTokenizer(spec)


def tokenizer_of(config, override: str | None = None) -> Tokenizer:
  """The tokenizer of a config's model: `override`, else `config.data.tokenizer`
  ('bytes', a tokenizer.model, a tokenizer.json or a folder holding one)."""
  spec = override or config.data.tokenizer
  if not spec:
    raise ConfigError(
      "config.data.tokenizer is empty: set it (or pass --tokenizer) to the "
      "model's tokenizer.model / tokenizer.json, e.g. TinyLlama's"
    )
  tokenizer = load_tokenizer(spec)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(
      f"tokenizer {spec!r} has {tokenizer.vocab_size} ids but "
      f"config.model.vocab_size={config.model.vocab_size}; use the model's "
      "own tokenizer"
    )
  return tokenizer
