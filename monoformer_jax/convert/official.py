"""The official MonoFormer key layout <-> our parameter tree: the project's one key map.

`ENTRIES` pairs every parameter of our model with its key in the reference's
state dict (PyTorch `nn.Linear` weights are [out, in], ours [in, out] with
heads split out: wq [E, H, D], wo [H, D, E]); decoder parameters are stacked
on a leading `layers` axis built from `model.layers.{i}.*`. Each of our arrays
is made by `jax.make_array_from_callback`, whose callback reads only the slice
of the safetensors that the shard needs, so conversion writes straight into
the shards of a mesh and never holds two full copies of the model.

The official `config.json` gives `image_size` in PIXELS (SD-VAE, f=8); ours is
the latent side, pixels // 8. Not stored in the checkpoints: the 2-D sin-cos
position table (recomputed; the reference adds it to `[start, min(end, L-1))`
of an image span, so an image ending on the row's last position loses it on
its last token; we add it to every image token and do not copy that bug), the
causal mask and RoPE's inv_freq.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from flax import nnx, traverse_util

from monoformer_jax.checkpoints import load_params, save_model, stored_weights
from monoformer_jax.checkpoints.safetensors_io import (SafetensorsSource, find_files,
                                                       read_json_object, write_safetensors)
from monoformer_jax.configs import config_file
from monoformer_jax.errors import CheckpointError, ConfigError, FileFormatError, MissingPathError
from monoformer_jax.model.build import abstract_model, param_shardings
from monoformer_jax.model.monoformer import CONDITIONING_MODES

LAYER = "model.layers.{i}."


@dataclasses.dataclass(frozen=True)
class Entry:
  """One parameter: our path, the official key ('{i}': layer), how they relate."""
  path: tuple[str, ...]
  key: str
  # 'same': identical; 'T': transposed; 'heads': [N*D, E] -> [E, N, D] (q, k, v);
  # 'o': [E, H*D] -> [H, D, E].
  layout: str
  # What each axis of the OFFICIAL tensor measures (keys of `_dims`), for errors.
  dims: tuple[str, ...]

  @property
  def layered(self) -> bool:
    return "{i}" in self.key


# In the reference's state_dict order (the order the safetensors are written in).
_DL = ("decoder", "layers")
ENTRIES = (
    Entry(("embed_tokens",), "model.embed_tokens.weight", "same", ("vocab", "hidden")),
    Entry((*_DL, "attn", "wq"), LAYER + "self_attn.q_proj.weight", "heads", ("q", "hidden")),
    Entry((*_DL, "attn", "wk"), LAYER + "self_attn.k_proj.weight", "heads", ("kv", "hidden")),
    Entry((*_DL, "attn", "wv"), LAYER + "self_attn.v_proj.weight", "heads", ("kv", "hidden")),
    Entry((*_DL, "attn", "wo"), LAYER + "self_attn.o_proj.weight", "o", ("hidden", "q")),
    Entry((*_DL, "mlp", "w_gate"), LAYER + "mlp.gate_proj.weight", "T", ("mlp", "hidden")),
    Entry((*_DL, "mlp", "w_up"), LAYER + "mlp.up_proj.weight", "T", ("mlp", "hidden")),
    Entry((*_DL, "mlp", "w_down"), LAYER + "mlp.down_proj.weight", "T", ("hidden", "mlp")),
    Entry((*_DL, "input_norm", "scale"), LAYER + "input_layernorm.weight", "same", ("hidden",)),
    Entry((*_DL, "post_attention_norm", "scale"), LAYER + "post_attention_layernorm.weight",
          "same", ("hidden",)),
    Entry(("decoder", "norm", "scale"), "model.norm.weight", "same", ("hidden",)),
    Entry(("lm_head",), "lm_head.weight", "T", ("vocab", "hidden")),
    Entry(("t_embedder", "fc1", "kernel"), "t_embedder.mlp.0.weight", "T", ("hidden", "freq")),
    Entry(("t_embedder", "fc1", "bias"), "t_embedder.mlp.0.bias", "same", ("hidden",)),
    Entry(("t_embedder", "fc2", "kernel"), "t_embedder.mlp.2.weight", "T", ("hidden", "hidden")),
    Entry(("t_embedder", "fc2", "bias"), "t_embedder.mlp.2.bias", "same", ("hidden",)),
    Entry(("x_embedder", "kernel"), "x_embedder.weight", "T", ("hidden", "patch_in")),
    Entry(("x_embedder", "bias"), "x_embedder.bias", "same", ("hidden",)),
    Entry(("adaln_module", "kernel"), "adaLN_module.1.weight", "T", ("2hidden", "hidden")),
    Entry(("adaln_module", "bias"), "adaLN_module.1.bias", "same", ("2hidden",)),
    Entry(("final_layer", "linear", "kernel"), "final_layer.linear.weight", "T",
          ("patch_out", "hidden")),
    Entry(("final_layer", "linear", "bias"), "final_layer.linear.bias", "same", ("patch_out",)),
    Entry(("final_layer", "adaln", "kernel"), "final_layer.adaLN_modulation.1.weight", "T",
          ("2hidden", "hidden")),
    Entry(("final_layer", "adaln", "bias"), "final_layer.adaLN_modulation.1.bias", "same",
          ("2hidden",)),
)
BY_PATH = {e.path: e for e in ENTRIES}
BACKBONE = tuple(e for e in ENTRIES if e.key.startswith("model.") or e.key == "lm_head.weight")

# Buffers some PyTorch checkpoints carry; all are recomputed here.
_IGNORED = re.compile(r"(.*rotary_emb\.inv_freq|model\.pos_embed|model\.causal_mask)$")


def _dims(m, vocab_size: int | None = None) -> dict[str, tuple[int, str]]:
  """Size of each named official axis under model config `m`, and its config
  field; `vocab_size` overrides the vocabulary (a Llama before the 4 added tokens)."""
  out_channels = 2 * m.in_channels if m.learn_sigma else m.in_channels
  vocab = ((m.vocab_size, "model.vocab_size") if vocab_size is None else
           (vocab_size, "model.vocab_size - 4 added tokens"))
  return {
      "vocab": vocab,
      "hidden": (m.hidden_size, "model.hidden_size"),
      "2hidden": (2 * m.hidden_size, "2 * model.hidden_size"),
      "q": (m.num_heads * m.head_dim, "model.num_heads * model.head_dim"),
      "kv": (m.num_kv_heads * m.head_dim, "model.num_kv_heads * model.head_dim"),
      "mlp": (m.mlp_dim, "model.mlp_dim"),
      "freq": (m.timestep_freq_dim, "model.timestep_freq_dim"),
      "patch_in": (m.in_channels * m.patch_size ** 2, "model.in_channels * model.patch_size**2"),
      "patch_out": (m.patch_size ** 2 * out_channels,
                    "model.patch_size**2 * model.in_channels * (2 if model.learn_sigma else 1)"),
  }


def expected_keys(m, entries=ENTRIES, vocab_size: int | None = None):
  """{official key: (entry, layer or None, shape)} for model config `m`."""
  dims = _dims(m, vocab_size)
  out = {}
  for e in entries:
    shape = tuple(dims[d][0] for d in e.dims)
    for i in (range(m.num_layers) if e.layered else [None]):
      out[e.key.format(i=i)] = (e, i, shape)
  return out


def check_source(source, m, where: str, *, entries=ENTRIES, vocab_size: int | None = None):
  """Raises one error naming every missing, unexpected or misshapen tensor of
  `source` against model config `m`, with the config value to change."""
  wanted = expected_keys(m, entries, vocab_size)
  dims = _dims(m, vocab_size)
  present = set(source.keys())
  problems = []
  layers = {int(k.split(".")[2]) for k in present if re.match(r"model\.layers\.\d+\.", k)}
  depth_differs = bool(layers) and max(layers) + 1 != m.num_layers
  if depth_differs:
    problems.append(f"the weights have {max(layers) + 1} decoder layers (model.layers.0.."
                    f"{max(layers)}), this config model.num_layers={m.num_layers}: set "
                    f"model.num_layers={max(layers) + 1}")
  for key, (e, _, shape) in wanted.items():
    if key not in present:
      if not (e.layered and depth_differs):  # already named above
        problems.append(f"{key}: missing from the weights")
      continue
    found = source.shape(key)
    if found != shape:
      why = [f"{dims[d][1]}={want} here, {got} in the weights"
             for d, want, got in zip(e.dims, shape, found) if want != got]
      if len(found) != len(shape):
        why = [f"a {len(shape)}-d tensor was expected"]
      problems.append(f"{key}: shape {found} in the weights, {shape} for this config "
                      f"({'; '.join(why)})")
  for key in sorted(present - set(wanted)):
    beyond_depth = (re.match(r"model\.layers\.\d+\.", key) is not None
                    and int(key.split(".")[2]) >= m.num_layers)
    if _IGNORED.match(key) or beyond_depth:
      continue
    hint = ""
    if key.startswith("t_projector."):
      hint = (" (t_projector.* belongs to another decoder_t_embed mode; this model implements "
              f"{CONDITIONING_MODES})")
    problems.append(f"{key}: in the weights, not a parameter of this model{hint}")
  if problems:
    shown = "\n  ".join(problems[:12])
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise CheckpointError(
        f"{where} does not match the model config:\n  {shown}{more}\n"
        "Set the config values named above to the weights' sizes (e.g. "
        "--config.model.num_layers=22), or fix the config.json that came with the weights.")


# --------------------------------------------------------------------------- read

def _bounds(index, shape) -> list[tuple[int, int]]:
  """[(start, stop)] per axis from a shard's index (a tuple of unit-step slices)."""
  index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"shard index {index} has a step; only contiguous shards are supported")
    out.append((start, stop))
  return out


def _read_layout(source, key: str, layout: str, b, head_dim: int) -> np.ndarray:
  """Our per-layer array restricted to bounds `b`, reading only what it needs."""
  s = lambda lo_hi: slice(*lo_hi)
  d = head_dim
  if layout == "same":
    return source.read(key, tuple(s(x) for x in b))
  if layout == "T":
    return source.read(key, (s(b[1]), s(b[0]))).T
  if layout == "heads":  # ours [E, N, D] <- [N*D, E]
    (e0, e1), (n0, n1), (d0, d1) = b
    x = source.read(key, (slice(n0 * d, n1 * d), slice(e0, e1)))
    return x.T.reshape(e1 - e0, n1 - n0, d)[:, :, d0:d1]
  if layout == "o":  # ours [H, D, E] <- [E, H*D]
    (h0, h1), (d0, d1), (e0, e1) = b
    x = source.read(key, (slice(e0, e1), slice(h0 * d, h1 * d)))
    return x.T.reshape(h1 - h0, d, e1 - e0)[:, d0:d1, :]
  raise ValueError(f"unknown layout {layout!r}")


def entry_reader(source, e: Entry, head_dim: int) -> Callable[[list], np.ndarray]:
  """bounds over our (stacked) parameter -> that block, read from `source`."""
  if not e.layered:
    return lambda b: _read_layout(source, e.key, e.layout, b, head_dim)

  def read(b):
    (l0, l1), rest = b[0], b[1:]
    first = _read_layout(source, e.key.format(i=l0), e.layout, rest, head_dim)
    out = np.empty((l1 - l0,) + first.shape, np.float32)
    out[0] = first
    for i in range(l0 + 1, l1):
      out[i - l0] = _read_layout(source, e.key.format(i=i), e.layout, rest, head_dim)
    return out
  return read


def build_params(model_cfg, make_reader, shardings=None, desc: str = "converting"):
  """Our params pure dict, each array made from `make_reader(path, shape)(bounds)`
  directly into its sharding (default: the first device)."""
  _, abstract, _ = abstract_model(model_cfg)
  flat = traverse_util.flatten_dict(abstract)
  flat_sh = (traverse_util.flatten_dict(shardings) if shardings is not None else
             dict.fromkeys(flat, jax.sharding.SingleDeviceSharding(jax.local_devices()[0])))
  out = {}
  with tqdm.tqdm(total=len(flat), desc=desc, unit="param", leave=False) as bar:
    for path, leaf in flat.items():
      bar.set_postfix_str("/".join(path))
      read = make_reader(path, leaf.shape)
      out[path] = jax.make_array_from_callback(
          leaf.shape, flat_sh[path],
          lambda index, read=read, shape=leaf.shape: read(_bounds(index, shape)),
          dtype=jnp.float32)
      bar.update()
  return traverse_util.unflatten_dict(out)


def read_params(source, model_cfg, shardings=None, desc: str = "official -> ours"):
  """Our params from an official-layout `source` (checked first)."""
  check_source(source, model_cfg, source.path)

  def make_reader(path, shape):
    del shape  # the entry knows its layout
    if path not in BY_PATH:
      raise ValueError(f"parameter {'/'.join(path)} has no official key: add it to "
                       "monoformer_jax/convert/official.py ENTRIES")
    return entry_reader(source, BY_PATH[path], model_cfg.head_dim)
  return build_params(model_cfg, make_reader, shardings, desc)


# ------------------------------------------------------------------ configs

def default_config():
  """This repository's configs/imagenet256.py: the base config of conversions."""
  return config_file("imagenet256")


def read_hf_config(path: str) -> dict:
  """config.json of a weights folder, or of the folder holding a weights file."""
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  file = os.path.join(folder, "config.json")
  if not os.path.exists(file):
    raise MissingPathError(f"no config.json in {folder}: the Hugging Face config.json "
                           "of the weights is needed to know the model's sizes")
  return read_json_object(file, "the Hugging Face config.json of the weights")


def _get(hf: dict, key: str, where: str):
  if key not in hf:
    raise FileFormatError(f"{where} has no {key!r}; is it a Llama/MonoFormer config.json?")
  return hf[key]


def llama_fields(hf: dict, where: str) -> dict:
  """Our model fields for the Llama backbone that an HF config.json describes."""
  for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
    if hf.get(key, want) != want:
      raise FileFormatError(f"{where}: {key}={hf[key]!r} is not supported (this Llama "
                            f"implementation has {key}={want!r})")
  # transformers < 5 writes rope_theta (+ rope_scaling); 5.x writes rope_parameters.
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise FileFormatError(f"{where}: RoPE scaling {rope} is not supported (plain RoPE only)")
  rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  hidden, heads = int(_get(hf, "hidden_size", where)), int(_get(hf, "num_attention_heads", where))
  return dict(
      vocab_size=int(_get(hf, "vocab_size", where)),
      hidden_size=hidden,
      num_layers=int(_get(hf, "num_hidden_layers", where)),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hidden // heads),
      mlp_dim=int(_get(hf, "intermediate_size", where)),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=float(rope_theta),
  )


# The reference's switches, and the one value of each that this model implements.
_FIXED_SWITCHES = dict(use_pos_embed=True, use_bi_attn_img_tokens=True,
                       add_pos_embed_each_layer=False, use_adaln_final_layer=True,
                       use_hybrid_attn_mask=None, tie_word_embeddings=False)


def monoformer_fields(hf: dict, where: str) -> dict:
  """Our model fields for the image side of an official MonoFormer config.json."""
  mode = hf.get("decoder_t_embed")
  if mode not in CONDITIONING_MODES:
    raise FileFormatError(
        f"{where}: decoder_t_embed={mode!r} is not supported: this model implements "
        f"{CONDITIONING_MODES} (the mode of the released MonoFormer_ImageNet_256 "
        "checkpoint). Convert a checkpoint trained in that mode.")
  for key, want in _FIXED_SWITCHES.items():
    if hf.get(key, want) != want:
      raise FileFormatError(f"{where}: {key}={hf[key]!r} is not supported; this model "
                            f"always behaves as {key}={want!r}")
  pixels = int(_get(hf, "image_size", where))
  if pixels % 8:
    raise FileFormatError(f"{where}: image_size={pixels} (pixels) is not a multiple of the "
                          "SD-VAE's factor 8")
  fields = dict(image_size=pixels // 8, in_channels=int(_get(hf, "in_channels", where)),
                patch_size=int(_get(hf, "patch_size", where)),
                learn_sigma=bool(hf.get("learn_sigma", True)), conditioning=mode)
  vocab, image_token = hf.get("vocab_size"), hf.get("image_token_index")
  if image_token is not None and vocab is not None and image_token != vocab - 3:
    logging.warning("%s: image_token_index=%s, but our tokenizers put <image> at "
                    "vocab_size - 3 = %s (the 4 added tokens last)", where, image_token,
                    vocab - 3)
  return fields


def with_model_fields(base, fields: dict):
  """A copy of config `base` with `fields` set in its `model`."""
  config = copy.deepcopy(base)
  unknown = [k for k in fields if k not in config.model]
  if unknown:
    raise ConfigError(f"base config's model has no fields {unknown}; is it a MonoFormer config?")
  for key, value in fields.items():
    setattr(config.model, key, value)
  return config


def official_config(hf: dict, base, where: str = "config.json"):
  """The base config with its model fields from an official config.json."""
  return with_model_fields(base, {**llama_fields(hf, where), **monoformer_fields(hf, where)})


def hf_config(config) -> dict:
  """An official config.json (HF LlamaConfig + MonoFormer fields) for `config`."""
  m = config.model
  if m.head_dim * m.num_heads != m.hidden_size:
    raise ConfigError(f"model.head_dim={m.head_dim} * num_heads={m.num_heads} != hidden_size="
                      f"{m.hidden_size}: the official code (transformers 4.38) cannot express it")
  return {
      "architectures": ["MonoFormerForCausalLM"], "model_type": "llama",
      "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
      "intermediate_size": m.mlp_dim, "num_hidden_layers": m.num_layers,
      "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
      "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
      "rms_norm_eps": m.rms_norm_eps, "rope_theta": m.rope_theta, "rope_scaling": None,
      "attention_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
      "tie_word_embeddings": False, "use_cache": True,
      "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
      "torch_dtype": "float32", "transformers_version": "4.38.0",
      "patch_size": m.patch_size, "in_channels": m.in_channels, "learn_sigma": m.learn_sigma,
      "tokenizer_max_length": int(config.get("data", {}).get("seq_len", 512)),
      "tokenizer_padding_side": "right", "use_flash_attn": False,
      "image_size": m.image_size * 8, "use_pos_embed": True, "decoder_t_embed": m.conditioning,
      "use_adaln_final_layer": True, "use_bi_attn_img_tokens": True,
      "add_pos_embed_each_layer": False, "use_hybrid_attn_mask": None,
      "image_token_index": m.vocab_size - 3,
  }


# --------------------------------------------------------------- public API

def load_official(path: str, base_config=None, *, shardings_fn=None, ema: bool = False):
  """(params, config) from official weights at `path` (a folder or a .safetensors
  with config.json beside it); with `ema`, the `ema/` subfolder's weights.

  `shardings_fn(config)`, if given, returns the params' shardings (e.g.
  `lambda c: param_shardings(c, mesh)`) and the arrays are built in them.
  """
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  config = official_config(read_hf_config(path), default_config() if base_config is None
                           else base_config, where=os.path.join(folder, "config.json"))
  weights = os.path.join(folder, "ema") if ema else path
  shardings = shardings_fn(config) if shardings_fn else None
  with SafetensorsSource(weights) as source:
    params = read_params(source, config.model, shardings,
                         desc="official ema -> ours" if ema else "official -> ours")
  return params, config


def load_official_model(path: str, base_config=None):
  """(MonoFormer with official weights, config); see `load_official`."""
  params, config = load_official(path, base_config)
  graphdef, _, _ = abstract_model(config.model)
  return nnx.merge(graphdef, params), config


def has_ema(path: str) -> bool:
  return os.path.isdir(path) and os.path.isdir(os.path.join(path, "ema"))


def convert_official(path: str, output: str, base_config=None, *, mesh=None):
  """Official weights (and `ema/` if present) -> a model checkpoint at `output`."""
  shardings_fn = (lambda c: param_shardings(c, mesh)) if mesh is not None else None
  find_files(path)  # fail on a bad path before any work
  params, config = load_official(path, base_config, shardings_fn=shardings_fn)
  ema = None
  if has_ema(path):
    ema, _ = load_official(path, base_config, shardings_fn=shardings_fn, ema=True)
  save_model(output, config, params, ema=ema)
  logging.info("wrote %s (%s)", output, "params and ema" if ema is not None else "params")
  return config


# ------------------------------------------------------------------ write

def official_tensors(params, m):
  """([(official key, shape)] in state_dict order, produce(key) -> float32 array)."""
  flat = traverse_util.flatten_dict(params)
  table = expected_keys(m)

  def produce(key):
    e, layer, _ = table[key]
    leaf = flat[e.path]
    x = np.asarray(leaf[layer] if layer is not None else leaf, np.float32)
    if e.layout == "same":
      return x
    if e.layout == "T":
      return x.T
    if e.layout == "heads":  # [E, N, D] -> [N*D, E]
      return x.reshape(x.shape[0], -1).T
    if e.layout == "o":  # [H, D, E] -> [E, H*D]
      return x.reshape(-1, x.shape[-1]).T
    raise ValueError(f"unknown layout {e.layout!r}")

  # Layer keys layer by layer, as PyTorch's state_dict lists them.
  layered = [e for e in ENTRIES if e.layered]
  order = []
  for e in ENTRIES:
    if not e.layered:
      order.append(e.key)
    elif e is layered[0]:
      order += [x.key.format(i=i) for i in range(m.num_layers) for x in layered]
  return [(k, table[k][2]) for k in order], produce


def write_official(params, config, folder: str, *, max_shard_bytes: int,
                   desc: str = "ours -> official"):
  """Writes `params` as official safetensors + config.json into `folder`."""
  shapes, produce = official_tensors(params, config.model)
  with tqdm.tqdm(total=len(shapes), desc=desc, unit="tensor", leave=False) as bar:
    names = write_safetensors(folder, shapes, produce, max_shard_bytes=max_shard_bytes,
                              on_tensor=lambda key: bar.update())
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config(config), f, indent=2)
  return names


def convert_to_official(path: str, output: str, *, max_shard_bytes: int = 5 * 10**9):
  """A model checkpoint -> official layout at `output` (+ `output/ema/` if it has EMA)."""
  weights = stored_weights(path)
  params, config, _ = load_params(path, weights="raw")
  write_official(params, config, output, max_shard_bytes=max_shard_bytes)
  del params
  if "ema" in weights:
    ema, _, _ = load_params(path, weights="ema", config=config)
    write_official(ema, config, os.path.join(output, "ema"), max_shard_bytes=max_shard_bytes,
                   desc="ours ema -> official")
  logging.info("wrote %s (%s)", output, " and ".join(weights))
  return config
