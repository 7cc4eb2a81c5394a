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
  (adaLN_modulation.1 and linear) N(0, 0.02^2) with zero biases;
- add_before_image_tokens' t_projector (Linear, GELU, Linear): fc1 N(0, 0.02^2)
  and fc2 zero, biases zero. The reference zeroes BOTH Linears, which leaves
  it a constant for good: fc2's kernel sees GELU(0) = 0 inputs and fc1 gets
  its gradient through fc2's zero kernel, so only fc2's bias ever trains.
  Zeroing only fc2 keeps the start (the timestep token is 0) and lets it learn.
A model that reads images (model.vision_encoder vae or clip) also gets:
- im_embedder (Linear, GELU, Linear): N(0, 0.02^2) kernels and zero biases,
  the rule of the other new Linears here. The reference keeps PyTorch's
  default Linear init there (weights and biases U(+-1/sqrt(fan_in))), because
  its train.py builds the module (`initialize_vision_modules`) after
  `initialize_weights` has run;
- clip: the frozen CLIP tower (`vision_tower`) from an HF CLIP folder
  (`clip=`, `--clip=DIR`, e.g. openai/clip-vit-large-patch14); model.vision
  (the tower's sizes) from its config.json, or checked against the base
  config's when that sets it.
The image-side fields (image_size, patch_size, in_channels, vision_encoder,
...) come from the base config (configs/imagenet256.py by default).
"""

from __future__ import annotations

import os
import zlib

import numpy as np
from absl import logging
from flax import traverse_util

from monoformer_jax.checkpoints import save_model
from monoformer_jax.convert import official
from monoformer_jax.errors import ConfigError, FileFormatError
from monoformer_jax.model.build import param_shardings
from monoformer_jax.model.clip import load_clip_params
from monoformer_jax.safetensors_io import open_weights

ADDED_TOKENS = 4
_INIT_STD = 0.02  # initialize_weights() hard-codes it, whatever initializer_range says

# Our image-side parameters and how the reference initialises them.
_IMAGE_INIT = {
  ("x_embedder", "kernel"): "zeros",
  ("x_embedder", "bias"): "zeros",
  ("adaln_module", "kernel"): "zeros",
  ("adaln_module", "bias"): "zeros",
  ("t_embedder", "fc1", "kernel"): "normal",
  ("t_embedder", "fc1", "bias"): "zeros",
  ("t_embedder", "fc2", "kernel"): "normal",
  ("t_embedder", "fc2", "bias"): "zeros",
  ("final_layer", "adaln", "kernel"): "normal",
  ("final_layer", "adaln", "bias"): "zeros",
  ("final_layer", "linear", "kernel"): "normal",
  ("final_layer", "linear", "bias"): "zeros",
  # add_before_image_tokens (the reference zeroes fc1's kernel too; see above)
  ("t_projector", "fc1", "kernel"): "normal",
  ("t_projector", "fc1", "bias"): "zeros",
  ("t_projector", "fc2", "kernel"): "zeros",
  ("t_projector", "fc2", "bias"): "zeros",
  # a model that reads images (the reference: PyTorch's default Linear init; see above)
  ("im_embedder", "fc1", "kernel"): "normal",
  ("im_embedder", "fc1", "bias"): "zeros",
  ("im_embedder", "fc2", "kernel"): "normal",
  ("im_embedder", "fc2", "bias"): "zeros",
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


def _clip_tower(m, clip: str | None) -> dict:
  """{path under vision_tower: host array} for model config `m` (whose
  model.vision it sets from the CLIP folder when unset); {} without CLIP."""
  encoder = m.vision_encoder
  official.no_clip_needed(encoder, clip, "the base config (model.vision_encoder)")
  if encoder != "clip":
    return {}
  if not clip:
    raise ConfigError(
      "the base config has model.vision_encoder='clip': the new model's frozen CLIP tower "
      "is copied from a Hugging Face CLIP folder: pass --clip=DIR (clip=DIR), e.g. a "
      "download of openai/clip-vit-large-patch14"
    )
  params, vcfg = load_clip_params(clip, m.vision or None)
  m.vision = vcfg
  return traverse_util.flatten_dict(params)


def llama_config(path: str, base_config=None):
  """(the HF config.json's dict, our config) of a MonoFormer started from the
  HF Llama at `path`: read from config.json alone, before any weight."""
  hf = official.read_hf_config(path)
  where = os.path.join(path, "config.json")
  if "decoder_t_embed" in hf:
    raise FileFormatError(
      f"{where} is an official MonoFormer config (it has decoder_t_embed); "
      "convert it with `python -m monoformer_jax.convert official`"
    )
  fields = official.llama_fields(hf, where)
  fields["vocab_size"] += ADDED_TOKENS
  base = official.default_config() if base_config is None else base_config
  return hf, official.with_model_fields(base, fields)


def load_llama(
  path: str, base_config=None, *, seed: int = 0, shardings_fn=None, clip: str | None = None
):
  """(params, config) of a MonoFormer started from the HF Llama at `path`; a
  base config with model.vision_encoder='clip' needs `clip`, the HF CLIP
  folder of its tower."""
  path = os.fspath(path)
  hf, config = llama_config(path, base_config)
  old_vocab = config.model.vocab_size - ADDED_TOKENS
  m = config.model
  tower = _clip_tower(m, clip)
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

  with open_weights(path, hint="pass the Llama weights (--input)") as source:
    backbone = [e for e in official.BACKBONE if not (tied and e.key == "lm_head.weight")]
    official.check_source(source, m, path, entries=backbone, vocab_size=old_vocab)

    def make_reader(p, shape):
      if p[0] == "vision_tower":
        x = tower[p[1:]]
        return lambda b: x[tuple(slice(*lo_hi) for lo_hi in b)]
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


def convert_llama(
  path: str,
  output: str,
  base_config=None,
  *,
  seed: int = 0,
  mesh=None,
  clip: str | None = None,
  tokenizer: str | None = None,
  vae: str | None = None,
):
  """HF Llama at `path` -> a fresh MonoFormer model checkpoint (raw params
  only); `clip` as in `load_llama`; `tokenizer` and `vae` recorded in its
  config (official.record_assets), checked before the weights are read."""
  shardings_fn = (lambda c: param_shardings(c, mesh)) if mesh is not None else None
  _, base = llama_config(os.fspath(path), base_config)
  base = official.record_assets(base, tokenizer=tokenizer, vae=vae)
  params, config = load_llama(path, base, seed=seed, shardings_fn=shardings_fn, clip=clip)
  save_model(output, config, params)
  logging.info(
    "wrote %s: %d-layer MonoFormer, vocabulary %d (+%d added tokens)",
    output,
    config.model.num_layers,
    config.model.vocab_size,
    ADDED_TOKENS,
  )
  return config
