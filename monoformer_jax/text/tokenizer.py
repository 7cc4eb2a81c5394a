"""Tokenizers. The byte-level one backs the embedded digits default.

Ids follow Llama's SentencePiece layout so that the two tokenizers agree on
every id they share: 0 <unk>, 1 <s> (bos), 2 </s> (eos), and byte b at 3 + b
(Llama's byte-fallback pieces <0x00>..<0xFF> sit exactly there, so "\n" is 13
in both). The four tokens MonoFormer adds follow the base vocabulary, in the
reference's order: <PAD>, <image>, <|im_start|>, <|im_end|>.
"""

from __future__ import annotations

from typing import Iterable

_BYTE_OFFSET = 3
_BASE_VOCAB = _BYTE_OFFSET + 256  # 259
SPECIAL_TOKENS = ("<PAD>", "<image>", "<|im_start|>", "<|im_end|>")


class ByteTokenizer:
  """UTF-8 bytes as tokens, plus bos/eos and MonoFormer's four added tokens."""

  unk_id = 0
  bos_id = 1
  eos_id = 2
  pad_id = _BASE_VOCAB          # 259
  image_id = _BASE_VOCAB + 1    # 260
  im_start_id = _BASE_VOCAB + 2  # 261
  im_end_id = _BASE_VOCAB + 3   # 262
  vocab_size = _BASE_VOCAB + len(SPECIAL_TOKENS)  # 263

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""
    return [_BYTE_OFFSET + b for b in text.encode("utf-8")]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special tokens and ids outside the vocabulary are dropped."""
    data = bytes(int(i) - _BYTE_OFFSET for i in ids
                 if _BYTE_OFFSET <= int(i) < _BASE_VOCAB)
    return data.decode("utf-8", errors="replace")
