"""A fresh MonoFormer from a Hugging Face Llama (TinyLlama-1.1B), as the reference starts.

The backbone is copied through the official key map (HF Llama's keys are the
`model.*` / `lm_head` subset of it). The rest is initialised as the reference
does, seeded:
- vocabulary + 4 added tokens (<PAD>, <image>, <|im_start|>, <|im_end|>, ids
  V..V+3): the reference calls `resize_token_embeddings` under transformers
  4.38, which builds new embedding and lm_head matrices, initialises them whole
  with the model's `_init_weights` (normal, std = config.json's
  `initializer_range`, 0.02 for TinyLlama) and copies the old rows back, so
  the new rows are N(0, 0.02^2); mean-of-old-rows resizing came only in 4.46;
- its `initialize_weights()`: x_embedder and adaLN_module weights and biases
  zero (image tokens start as the 2-D position table alone, unmodulated);
  t_embedder's two Linears and the final layer's two Linears
  (adaLN_modulation.1 and linear) N(0, 0.02^2) with zero biases.
The image-side fields (image_size, patch_size, in_channels, ...) come from the
base config (configs/imagenet256.py by default).
"""

from __future__ import annotations

import os
import zlib

import numpy as np
from absl import logging

from monoformer_jax.errors import FileFormatError
from monoformer_jax.convert import official
from monoformer_jax.checkpoints import save_model
from monoformer_jax.checkpoints.safetensors_io import SafetensorsSource
from monoformer_jax.model.build import param_shardings

ADDED_TOKENS = 4
_INIT_STD = 0.02  # initialize_weights() hard-codes it, whatever initializer_range says

# Our image-side parameters and how the reference initialises them.
_IMAGE_INIT = {
    ("x_embedder", "kernel"): "zeros", ("x_embedder", "bias"): "zeros",
    ("adaln_module", "kernel"): "zeros", ("adaln_module", "bias"): "zeros",
    ("t_embedder", "fc1", "kernel"): "normal", ("t_embedder", "fc1", "bias"): "zeros",
    ("t_embedder", "fc2", "kernel"): "normal", ("t_embedder", "fc2", "bias"): "zeros",
    ("final_layer", "adaln", "kernel"): "normal", ("final_layer", "adaln", "bias"): "zeros",
    ("final_layer", "linear", "kernel"): "normal", ("final_layer", "linear", "bias"): "zeros",
}


def _rng(seed: int, path: tuple[str, ...]) -> np.random.Generator:
  """An independent stream per parameter: the values do not depend on the order
  in which parameters (or shards) are built."""
  return np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])


def _grow_vocab(read_old, new_rows, axis: int, old_vocab: int):
  """A reader of a vocabulary-sized parameter: rows < old_vocab from the
  checkpoint, the rest from `new_rows` (our layout, `axis` = vocabulary)."""
  def read(b):
    lo, hi = b[axis]
    parts = []
    if lo < old_vocab:
      old_b = list(b)
      old_b[axis] = (lo, min(hi, old_vocab))
      parts.append(read_old(old_b))
    if hi > old_vocab:
      index = [slice(*x) for x in b]
      index[axis] = slice(max(lo, old_vocab) - old_vocab, hi - old_vocab)
      parts.append(new_rows[tuple(index)])
    return np.concatenate(parts, axis=axis)
  return read


def load_llama(path: str, base_config=None, *, seed: int = 0, shardings_fn=None):
  """(params, config) of a MonoFormer started from the HF Llama at `path`."""
  path = os.fspath(path)
  hf = official.read_hf_config(path)
  where = os.path.join(path, "config.json")
  if "decoder_t_embed" in hf:
    raise FileFormatError(f"{where} is an official MonoFormer config (it has decoder_t_embed); "
                          "convert it with `python -m monoformer_jax.convert official`")
  if os.path.isdir(path) and not any(f.endswith(".safetensors") for f in os.listdir(path)) \
      and any(f.endswith(".bin") for f in os.listdir(path)):
    raise FileFormatError(f"{path} holds PyTorch .bin weights only; save them as safetensors "
                          "first (model.save_pretrained(dir, safe_serialization=True))")
  fields = official.llama_fields(hf, where)
  old_vocab = fields["vocab_size"]
  fields["vocab_size"] = old_vocab + ADDED_TOKENS
  base = official.default_config() if base_config is None else base_config
  config = official.with_model_fields(base, fields)
  m = config.model
  tied = bool(hf.get("tie_word_embeddings", False))
  std = float(hf.get("initializer_range", 0.02))
  shardings = shardings_fn(config) if shardings_fn else None

  def initial(p, shape, b):
    if _IMAGE_INIT[p] == "zeros":
      full = np.zeros(shape, np.float32)
    else:
      full = (_INIT_STD * _rng(seed, p).standard_normal(shape)).astype(np.float32)
    return full[tuple(slice(*x) for x in b)]

  def added_rows(p):
    return (std * _rng(seed, p).standard_normal((ADDED_TOKENS, m.hidden_size))).astype(np.float32)

  with SafetensorsSource(path) as source:
    backbone = [e for e in official.BACKBONE if not (tied and e.key == "lm_head.weight")]
    official.check_source(source, m, path, entries=backbone, vocab_size=old_vocab)

    def make_reader(p, shape):
      e = official.BY_PATH[p]
      if p == ("embed_tokens",):
        read_old = official.entry_reader(source, e, m.head_dim)
        return _grow_vocab(read_old, added_rows(p), 0, old_vocab)
      if p == ("lm_head",):
        if tied:  # lm_head = embed_tokens, added rows included
          e = official.Entry(p, "model.embed_tokens.weight", "T", e.dims)
        read_old = official.entry_reader(source, e, m.head_dim)
        new = added_rows(("embed_tokens",) if tied else p)
        return _grow_vocab(read_old, new.T, 1, old_vocab)
      if e in official.BACKBONE:
        return official.entry_reader(source, e, m.head_dim)
      return lambda b: initial(p, shape, b)

    params = official.build_params(m, make_reader, shardings, desc="llama -> ours")
  return params, config


def convert_llama(path: str, output: str, base_config=None, *, seed: int = 0, mesh=None):
  """HF Llama at `path` -> a fresh MonoFormer model checkpoint (raw params only)."""
  shardings_fn = (lambda c: param_shardings(c, mesh)) if mesh is not None else None
  params, config = load_llama(path, base_config, seed=seed, shardings_fn=shardings_fn)
  save_model(output, config, params)
  logging.info("wrote %s: %d-layer MonoFormer, vocabulary %d (+%d added tokens)", output,
               config.model.num_layers, config.model.vocab_size, ADDED_TOKENS)
  return config
