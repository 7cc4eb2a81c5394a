"""Tokenizers: special ids, round trips, and the Llama id layout the byte tokenizer shares."""

import io
import pathlib

import numpy as np
import pytest
import sentencepiece as spm

from monoformer_jax.text.tokenizer import (
  ByteTokenizer,
  HFJsonTokenizer,
  SentencePieceTokenizer,
  load_tokenizer,
)

TINY_LLAMA = pathlib.Path(__file__).resolve().parent / "fixtures" / "tiny_llama"
TEXTS = ["the cat sat on a mat.", "Hello, World!\n", "caf\u00e9 \u20ac5 \u4e16\u754c", "a  b", ""]


def _fixture_ids(name):
  arrays = np.load(TINY_LLAMA / "io.npz")
  return [list(row[row >= 0]) for row in arrays[name]], [str(t) for t in arrays["texts"]]


def _train_llama_like(path, **overrides):
  """A tiny SentencePiece BPE with TinyLlama's settings (byte fallback, split
  digits, dummy prefix, unk/bos/eos = 0/1/2, no normalisation)."""
  lines = [
    f"the {w} sat on the mat with {n} friends."
    for w in ("cat", "dog", "bird", "fox")
    for n in range(50)
  ]
  model = io.BytesIO()
  options = dict(
    vocab_size=300,
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    add_dummy_prefix=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    character_coverage=1.0,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    minloglevel=2,
  )
  options.update(overrides)
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **options)
  path.write_bytes(model.getvalue())
  return path


def test_byte_tokenizer_ids_and_round_trip():
  tok = ByteTokenizer()
  assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert (tok.pad_id, tok.image_id, tok.im_start_id, tok.im_end_id) == (259, 260, 261, 262)
  assert tok.vocab_size == 263
  assert tok.special_ids == {"<PAD>": 259, "<image>": 260, "<|im_start|>": 261, "<|im_end|>": 262}
  for text in TEXTS:
    assert tok.decode(tok.encode(text)) == text
  ids = tok.encode("hi")
  assert tok.decode([tok.bos_id, *ids, tok.image_id, tok.pad_id, tok.eos_id, 999]) == "hi"


def test_byte_tokenizer_ids_are_llamas_byte_fallback_ids(tmp_path):
  # Documented in text/tokenizer.py: byte b is 3 + b in both, so "\n" is 13.
  llama = SentencePieceTokenizer(str(_train_llama_like(tmp_path / "t.model")))
  byte = ByteTokenizer()
  assert [llama.sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)] == list(range(3, 259))
  assert byte.encode("\n\u00e9") == [3 + b for b in "\n\u00e9".encode()]
  assert llama.sp.piece_to_id("<0x0A>") == 13 == byte.encode("\n")[0]
  # Characters the vocabulary lacks fall back to exactly the byte tokenizer's ids
  # (after SentencePiece's dummy-prefix piece).
  for text in ("\u4e16\u754c", "\u20ac", "Z"):
    ids = llama.encode(text)
    assert llama.sp.id_to_piece(ids[0]) == "\u2581" and ids[1:] == byte.encode(text)


def test_llama_tokenizer_special_ids_match_the_reference_setup():
  tok = load_tokenizer(str(TINY_LLAMA))
  assert isinstance(tok, SentencePieceTokenizer)  # tokenizer.model preferred over .json
  assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
  # transformers' ids after the reference's setup_tokenizer added the 4 tokens
  added = list(np.load(TINY_LLAMA / "io.npz")["added_ids"])
  assert [tok.pad_id, tok.image_id, tok.im_start_id, tok.im_end_id] == added == [320, 321, 322, 323]
  assert tok.vocab_size == 324


def test_llama_tokenizer_encodes_like_sentencepiece_and_transformers():
  tok = load_tokenizer(str(TINY_LLAMA / "tokenizer.model"))
  sp_ids, texts = _fixture_ids("sp_ids")
  hf_ids, _ = _fixture_ids("hf_ids")
  for text, want, hf in zip(texts, sp_ids, hf_ids):
    assert tok.encode(text) == want == hf, text
    assert tok.decode(tok.encode(text)) == text
  ids = tok.encode("the cat")
  assert tok.decode([tok.bos_id, *ids, tok.im_start_id, tok.image_id, tok.eos_id]) == "the cat"


def test_hf_tokenizer_json_agrees_with_tokenizer_model():
  tok = load_tokenizer(str(TINY_LLAMA / "tokenizer.json"))
  assert isinstance(tok, HFJsonTokenizer)
  assert tok.special_ids == load_tokenizer(str(TINY_LLAMA)).special_ids
  hf_ids, texts = _fixture_ids("hf_ids")
  for text, want in zip(texts, hf_ids):
    assert tok.encode(text) == want, text
    assert tok.decode(tok.encode(text)) == text


def test_factory_and_errors(tmp_path):
  assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
  with pytest.raises(FileNotFoundError, match="'bytes', a tokenizer.model"):
    load_tokenizer(str(tmp_path / "nope.model"))
  with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
    load_tokenizer(str(tmp_path))
  not_llama = _train_llama_like(tmp_path / "x.model", unk_id=2, bos_id=0, eos_id=1)
  with pytest.raises(
    ValueError, match="unk id is 2, but MonoFormer uses Llama.s layout with unk=0"
  ):
    load_tokenizer(str(not_llama))
