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

A model that reads images (config.json's `vision_encoder`): `vae` keeps the
reference's SD-VAE under `vision_encoder.vision_tower.*`, which is skipped
(ours comes from config.vae.path); `clip` keeps a whole HF CLIPVisionModel
under `vision_encoder.vision_tower.vision_model.*`, of which our tower holds
everything but the last encoder layer and `post_layernorm` (MonoFormer reads
the second-to-last layer). Its sizes are not in the MonoFormer config.json, so
both directions take the HF CLIP folder (`clip=`, the CLI's `--clip=DIR`);
writing copies the two missing parts from it, so the file loads strictly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from etils import epath
from flax import nnx, traverse_util

from monoformer_jax import inference
from monoformer_jax.checkpoints import load_config, load_params, save_model, stored_weights
from monoformer_jax.config import config_file
from monoformer_jax.config.schema import CONDITIONING_MODES
from monoformer_jax.errors import CheckpointError, ConfigError, FileFormatError, MissingPathError
from monoformer_jax.hub import recorded
from monoformer_jax.model.build import abstract_model, param_shardings
from monoformer_jax.model.clip import clip_params_from_tensors, read_clip_config, vision_prefix
from monoformer_jax.paths import folder_of
from monoformer_jax.safetensors_io import (
  find_weights,
  open_weights,
  read_json_object,
  write_safetensors,
)
from monoformer_jax.text.tokenizer import tokenizer_of

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
  Entry(
    (*_DL, "post_attention_norm", "scale"),
    LAYER + "post_attention_layernorm.weight",
    "same",
    ("hidden",),
  ),
  Entry(("decoder", "norm", "scale"), "model.norm.weight", "same", ("hidden",)),
  Entry(("lm_head",), "lm_head.weight", "T", ("vocab", "hidden")),
  Entry(("t_embedder", "fc1", "kernel"), "t_embedder.mlp.0.weight", "T", ("hidden", "freq")),
  Entry(("t_embedder", "fc1", "bias"), "t_embedder.mlp.0.bias", "same", ("hidden",)),
  Entry(("t_embedder", "fc2", "kernel"), "t_embedder.mlp.2.weight", "T", ("hidden", "hidden")),
  Entry(("t_embedder", "fc2", "bias"), "t_embedder.mlp.2.bias", "same", ("hidden",)),
  Entry(("x_embedder", "kernel"), "x_embedder.weight", "T", ("hidden", "patch_in")),
  Entry(("x_embedder", "bias"), "x_embedder.bias", "same", ("hidden",)),
  # conditioning adaln_before_decoder
  Entry(("adaln_module", "kernel"), "adaLN_module.1.weight", "T", ("2hidden", "hidden")),
  Entry(("adaln_module", "bias"), "adaLN_module.1.bias", "same", ("2hidden",)),
  # conditioning add_before_image_tokens: Linear, GELU, Linear
  Entry(("t_projector", "fc1", "kernel"), "t_projector.0.weight", "T", ("hidden", "hidden")),
  Entry(("t_projector", "fc1", "bias"), "t_projector.0.bias", "same", ("hidden",)),
  Entry(("t_projector", "fc2", "kernel"), "t_projector.2.weight", "T", ("hidden", "hidden")),
  Entry(("t_projector", "fc2", "bias"), "t_projector.2.bias", "same", ("hidden",)),
  Entry(
    ("final_layer", "linear", "kernel"), "final_layer.linear.weight", "T", ("patch_out", "hidden")
  ),
  Entry(("final_layer", "linear", "bias"), "final_layer.linear.bias", "same", ("patch_out",)),
  Entry(
    ("final_layer", "adaln", "kernel"),
    "final_layer.adaLN_modulation.1.weight",
    "T",
    ("2hidden", "hidden"),
  ),
  Entry(
    ("final_layer", "adaln", "bias"), "final_layer.adaLN_modulation.1.bias", "same", ("2hidden",)
  ),
  # a model that reads images: the vision features -> hidden (Linear, GELU, Linear)
  Entry(
    ("im_embedder", "fc1", "kernel"), "im_embedder.0.weight", "T", ("hidden", "vision_features")
  ),
  Entry(("im_embedder", "fc1", "bias"), "im_embedder.0.bias", "same", ("hidden",)),
  Entry(("im_embedder", "fc2", "kernel"), "im_embedder.2.weight", "T", ("hidden", "hidden")),
  Entry(("im_embedder", "fc2", "bias"), "im_embedder.2.bias", "same", ("hidden",)),
)
BY_PATH = {e.path: e for e in ENTRIES}
_MODE_MODULES = {"adaln_before_decoder": "adaln_module", "add_before_image_tokens": "t_projector"}
# The reference's frozen vision tower lives under this prefix of its state dict.
VISION_TOWER_PREFIX = "vision_encoder.vision_tower."
# ... and a CLIP tower is an HF CLIPVisionModel, whose keys start with this.
CLIP_TOWER_PREFIX = VISION_TOWER_PREFIX + "vision_model."
VISION_ENCODERS = ("clip", "vae")
# The reference's VAEVisionEncoder defaults (its `vision_encoder_args`).
_VAE_ARGS = {"patch_size": 2, "resolution": 256}


def entries_of(m) -> tuple[Entry, ...]:
  """The entries of a model config: its conditioning mode's module, and
  im_embedder when it reads images."""
  mine = _MODE_MODULES[m.conditioning]
  reads = bool(m.vision_encoder)
  return tuple(
    e
    for e in ENTRIES
    if (e.path[0] not in _MODE_MODULES.values() or e.path[0] == mine)
    and (e.path[0] != "im_embedder" or reads)
  )


BACKBONE = tuple(e for e in ENTRIES if e.key.startswith("model.") or e.key == "lm_head.weight")

# Buffers some PyTorch checkpoints carry; all are recomputed here.
_IGNORED = re.compile(r"(.*rotary_emb\.inv_freq|model\.pos_embed|model\.causal_mask)$")


def _dims(m, vocab_size: int | None = None) -> dict[str, tuple[int, str]]:
  """Size of each named official axis under model config `m`, and its config
  field; `vocab_size` overrides the vocabulary (a Llama before the 4 added tokens)."""
  out_channels = 2 * m.in_channels if m.learn_sigma else m.in_channels
  vocab = (
    (m.vocab_size, "model.vocab_size")
    if vocab_size is None
    else (vocab_size, "model.vocab_size - 4 added tokens")
  )
  return {
    "vocab": vocab,
    "hidden": (m.hidden_size, "model.hidden_size"),
    "2hidden": (2 * m.hidden_size, "2 * model.hidden_size"),
    "q": (m.num_heads * m.head_dim, "model.num_heads * model.head_dim"),
    "kv": (m.num_kv_heads * m.head_dim, "model.num_kv_heads * model.head_dim"),
    "mlp": (m.mlp_dim, "model.mlp_dim"),
    "freq": (m.timestep_freq_dim, "model.timestep_freq_dim"),
    "patch_in": (m.in_channels * m.patch_size**2, "model.in_channels * model.patch_size**2"),
    "patch_out": (
      m.patch_size**2 * out_channels,
      "model.patch_size**2 * model.in_channels * (2 if model.learn_sigma else 1)",
    ),
    "vision_features": (
      (m.vision.hidden_size, "model.vision.hidden_size")
      if m.vision_encoder == "clip"
      else (
        m.in_channels * m.patch_size**2,
        "model.in_channels * model.patch_size**2 (the vae vision encoder)",
      )
    ),
  }


def expected_keys(m, entries=None, vocab_size: int | None = None):
  """{official key: (entry, layer or None, shape)} for model config `m`."""
  entries = entries_of(m) if entries is None else entries
  dims = _dims(m, vocab_size)
  out = {}
  for e in entries:
    shape = tuple(dims[d][0] for d in e.dims)
    for i in range(m.num_layers) if e.layered else [None]:
      out[e.key.format(i=i)] = (e, i, shape)
  return out


def check_source(source, m, where: str, *, entries=None, vocab_size: int | None = None):
  """Raises one error naming every missing, unexpected or misshapen tensor of
  `source` against model config `m`, with the config value to change."""
  wanted = expected_keys(m, entries, vocab_size)
  dims = _dims(m, vocab_size)
  present = set(source.keys())
  problems = []
  layers = {int(k.split(".")[2]) for k in present if re.match(r"model\.layers\.\d+\.", k)}
  depth_differs = bool(layers) and max(layers) + 1 != m.num_layers
  if depth_differs:
    problems.append(
      f"the weights have {max(layers) + 1} decoder layers (model.layers.0.."
      f"{max(layers)}), this config model.num_layers={m.num_layers}: set "
      f"model.num_layers={max(layers) + 1}"
    )
  for key, (e, _, shape) in wanted.items():
    if key not in present:
      if not (e.layered and depth_differs):  # already named above
        problems.append(f"{key}: missing from the weights")
      continue
    found = source.shape(key)
    if found != shape:
      why = [
        f"{dims[d][1]}={want} here, {got} in the weights"
        for d, want, got in zip(e.dims, shape, found)
        if want != got
      ]
      if len(found) != len(shape):
        why = [f"a {len(shape)}-d tensor was expected"]
      problems.append(
        f"{key}: shape {found} in the weights, {shape} for this config ({'; '.join(why)})"
      )
  for key in sorted(present - set(wanted)):
    beyond_depth = (
      re.match(r"model\.layers\.\d+\.", key) is not None and int(key.split(".")[2]) >= m.num_layers
    )
    if _IGNORED.match(key) or beyond_depth or key.startswith(VISION_TOWER_PREFIX):
      continue
    hint = ""
    owner = next(
      (
        mode
        for mode, module in _MODE_MODULES.items()
        if key.startswith(
          BY_PATH[
            (module, "kernel") if module == "adaln_module" else (module, "fc1", "kernel")
          ].key.split(".")[0]
        )
      ),
      None,
    )
    if owner and owner != m.conditioning:
      hint = (
        f" ({key.split('.')[0]}.* belongs to decoder_t_embed={owner!r}; this config has "
        f"model.conditioning={m.conditioning!r}: set it to {owner!r})"
      )
    elif key.startswith("im_embedder."):
      hint = (
        " (the checkpoint reads images: set model.vision_encoder to its vision "
        "encoder, vae or clip)"
      )
    problems.append(f"{key}: in the weights, not a parameter of this model{hint}")
  if problems:
    shown = "\n  ".join(problems[:12])
    more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
    raise CheckpointError(
      f"{where} does not match the model config:\n  {shown}{more}\n"
      "Set the config values named above to the weights' sizes (e.g. "
      "--config.model.num_layers=22), or fix the config.json that came with the weights."
    )


# ------------------------------------------------------------- the CLIP tower

# HF CLIPVisionModel's parameters in its state_dict order (keys after
# CLIP_TOWER_PREFIX), each with our path under `vision_tower` and layout
# ('same'; 'T': Linear [out, in] <-> [in, out]; 'conv': OIHW <-> HWIO).
# `model/clip.py` reads the same names; a round trip through both is tested.
_CLIP_EMBEDDINGS = (
  ("embeddings.class_embedding", ("class_embedding",), "same"),
  ("embeddings.patch_embedding.weight", ("patch_embedding",), "conv"),
  ("embeddings.position_embedding.weight", ("position_embedding",), "same"),
  ("pre_layrnorm.weight", ("pre_layrnorm", "scale"), "same"),
  ("pre_layrnorm.bias", ("pre_layrnorm", "bias"), "same"),
)
_CLIP_LAYER = (  # each encoder layer's, after "encoder.layers.{i}."
  ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), "T"),
  ("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), "same"),
  ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), "T"),
  ("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), "same"),
  ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), "T"),
  ("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), "same"),
  ("self_attn.out_proj.weight", ("self_attn", "out_proj", "kernel"), "T"),
  ("self_attn.out_proj.bias", ("self_attn", "out_proj", "bias"), "same"),
  ("layer_norm1.weight", ("layer_norm1", "scale"), "same"),
  ("layer_norm1.bias", ("layer_norm1", "bias"), "same"),
  ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), "T"),
  ("mlp.fc1.bias", ("mlp", "fc1", "bias"), "same"),
  ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), "T"),
  ("mlp.fc2.bias", ("mlp", "fc2", "bias"), "same"),
  ("layer_norm2.weight", ("layer_norm2", "scale"), "same"),
  ("layer_norm2.bias", ("layer_norm2", "bias"), "same"),
)


@dataclasses.dataclass(frozen=True)
class TowerKey:
  """One tensor of the official CLIP tower: its key after CLIP_TOWER_PREFIX,
  the path of such a tensor under our `vision_tower`, the encoder layer (None:
  not a layer's), its layout, and whether our tower holds it (not the last
  layer nor post_layernorm: those are copied from the CLIP folder)."""

  key: str
  path: tuple[str, ...]
  layer: int | None
  layout: str
  held: bool


def tower_keys(vcfg) -> list[TowerKey]:
  """Every tensor of the official CLIP tower with sizes `vcfg`, in state_dict order."""
  out = [TowerKey(k, p, None, layout, True) for k, p, layout in _CLIP_EMBEDDINGS]
  held = vcfg.num_layers - 1  # our tower stops before the last layer
  for i in range(vcfg.num_layers):
    out += [
      TowerKey(f"encoder.layers.{i}.{k}", ("layers", *p), i, layout, i < held)
      for k, p, layout in _CLIP_LAYER
    ]
  return out + [
    TowerKey(f"post_layernorm.{k}", ("post_layernorm", p), None, "same", False)
    for k, p in (("weight", "scale"), ("bias", "bias"))
  ]


def _tower_to_official(x: np.ndarray, layout: str) -> np.ndarray:
  """One (unstacked) tower parameter of ours in PyTorch's layout."""
  if layout == "T":
    return x.T
  if layout == "conv":  # HWIO -> OIHW
    return x.transpose(3, 2, 0, 1)
  return x


def _official_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  """`_tower_to_official`'s output shape for an input of `shape`."""
  if layout == "T":
    return tuple(reversed(shape))
  if layout == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


class PrefixedSource:
  """The tensors of `source` whose keys start with `prefix`, with it removed:
  the CLIP tower inside an official checkpoint, as the CLIP loader reads it."""

  def __init__(self, source, prefix: str):
    self.source, self.prefix = source, prefix
    self.path = f"{source.path} ({prefix}*)"

  def keys(self) -> list[str]:
    n = len(self.prefix)
    return [k[n:] for k in self.source.keys() if k.startswith(self.prefix)]

  def shape(self, key: str) -> tuple[int, ...]:
    return self.source.shape(self.prefix + key)

  def read(self, key: str, index: tuple = ()) -> np.ndarray:
    return self.source.read(self.prefix + key, index)


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
  flat_sh = (
    traverse_util.flatten_dict(shardings)
    if shardings is not None
    else dict.fromkeys(flat, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  )
  out = {}
  with tqdm.tqdm(total=len(flat), desc=desc, unit="param", leave=False) as bar:
    for path, leaf in flat.items():
      bar.set_postfix_str("/".join(path))
      read = make_reader(path, leaf.shape)
      out[path] = jax.make_array_from_callback(
        leaf.shape,
        flat_sh[path],
        lambda index, read=read, shape=leaf.shape: read(_bounds(index, shape)),
        dtype=jnp.float32,
      )
      bar.update()
  return traverse_util.unflatten_dict(out)


def _read_tower(source, m, vision_from: str) -> dict:
  """{path under vision_tower: host float32 array} of a CLIP model (sizes
  m.vision, named `vision_from` in errors), read and checked from `source`'s
  CLIP_TOWER_PREFIX keys; {} for any other model, whose tower keys (the
  reference's SD-VAE, for `vae`) are skipped with a log line."""
  encoder = m.vision_encoder
  if encoder != "clip":
    skipped = sum(k.startswith(VISION_TOWER_PREFIX) for k in source.keys())
    if skipped:
      why = (
        "the SD-VAE the reference encodes read images with; this model's VAE is config.vae.path's"
        if encoder == "vae"
        else "config.json names no vision_encoder"
      )
      logging.info(
        "%s: skipping the %d tensors under %s* (%s)", source.path, skipped, VISION_TOWER_PREFIX, why
      )
    return {}
  params = clip_params_from_tensors(
    PrefixedSource(source, VISION_TOWER_PREFIX),
    m.vision,
    where=f"the CLIP tower of {source.path} (keys {VISION_TOWER_PREFIX}*)",
    config_source=vision_from,
  )
  return traverse_util.flatten_dict(params)


def read_params(
  source,
  model_cfg,
  shardings=None,
  desc: str = "official -> ours",
  *,
  vision_from: str = "config.model.vision",
):
  """Our params from an official-layout `source` (checked first). A CLIP
  model's tower comes from the CLIP_TOWER_PREFIX keys, with the sizes of
  model_cfg.vision (`vision_from` says where they came from, for errors)."""
  tower = _read_tower(source, model_cfg, vision_from)
  check_source(source, model_cfg, source.path)

  def make_reader(path, shape):
    del shape  # the entry knows its layout
    if path[0] == "vision_tower":
      x = tower[path[1:]]
      return lambda b: x[tuple(slice(*lo_hi) for lo_hi in b)]
    if path not in BY_PATH:
      raise ValueError(
        f"parameter {'/'.join(path)} has no official key: add it to "
        "monoformer_jax/convert/official.py ENTRIES"
      )
    return entry_reader(source, BY_PATH[path], model_cfg.head_dim)

  return build_params(model_cfg, make_reader, shardings, desc)


# ------------------------------------------------------------------ configs


def default_config():
  """This repository's configs/imagenet256.py: the base config of conversions."""
  return config_file("imagenet256")


def read_hf_config(path: str) -> dict:
  """config.json of a weights folder, or of the folder holding a weights file
  (local or on a bucket)."""
  folder = folder_of(path)
  file = os.path.join(folder, "config.json")
  if not epath.Path(file).exists():
    raise MissingPathError(
      f"no config.json in {folder}: the Hugging Face config.json "
      "of the weights is needed to know the model's sizes"
    )
  return read_json_object(file, "the Hugging Face config.json of the weights")


def _get(hf: dict, key: str, where: str):
  if key not in hf:
    raise FileFormatError(f"{where} has no {key!r}; is it a Llama/MonoFormer config.json?")
  return hf[key]


def llama_fields(hf: dict, where: str) -> dict:
  """Our model fields for the Llama backbone that an HF config.json describes."""
  for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
    if hf.get(key, want) != want:
      raise FileFormatError(
        f"{where}: {key}={hf[key]!r} is not supported (this Llama "
        f"implementation has {key}={want!r})"
      )
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
_FIXED_SWITCHES = dict(
  use_pos_embed=True,
  use_bi_attn_img_tokens=True,
  add_pos_embed_each_layer=False,
  use_adaln_final_layer=True,
  use_hybrid_attn_mask=None,
  tie_word_embeddings=False,
)


def monoformer_fields(hf: dict, where: str) -> dict:
  """Our model fields for the image side of an official MonoFormer config.json."""
  mode = hf.get("decoder_t_embed")
  if mode not in CONDITIONING_MODES:
    raise FileFormatError(
      f"{where}: decoder_t_embed={mode!r} is not supported: this model implements "
      f"{CONDITIONING_MODES} (the released ImageNet checkpoint's and every official "
      "training config's). Convert a checkpoint trained in one of those modes."
    )
  for key, want in _FIXED_SWITCHES.items():
    if hf.get(key, want) != want:
      raise FileFormatError(
        f"{where}: {key}={hf[key]!r} is not supported; this model always behaves as {key}={want!r}"
      )
  pixels = int(_get(hf, "image_size", where))
  if pixels % 8:
    raise FileFormatError(
      f"{where}: image_size={pixels} (pixels) is not a multiple of the SD-VAE's factor 8"
    )
  fields = dict(
    image_size=pixels // 8,
    in_channels=int(_get(hf, "in_channels", where)),
    patch_size=int(_get(hf, "patch_size", where)),
    learn_sigma=bool(hf.get("learn_sigma", True)),
    conditioning=mode,
  )
  vocab, image_token = hf.get("vocab_size"), hf.get("image_token_index")
  if image_token is not None and vocab is not None and image_token != vocab - 3:
    logging.warning(
      "%s: image_token_index=%s, but our tokenizers put <image> at "
      "vocab_size - 3 = %s (the 4 added tokens last)",
      where,
      image_token,
      vocab - 3,
    )
  fields["vision_encoder"] = _vision_encoder(hf, fields, pixels, where)
  return fields


def _vision_encoder(hf: dict, fields: dict, pixels: int, where: str) -> str:
  """Our model.vision_encoder from config.json's `vision_encoder` ("" when the
  model reads no image), with its `vision_encoder_args` checked."""
  encoder = hf.get("vision_encoder") or ""
  if encoder and encoder not in VISION_ENCODERS:
    raise FileFormatError(
      f"{where}: vision_encoder={encoder!r} is not supported; this model "
      f"reads images through one of {VISION_ENCODERS}"
    )
  args = hf.get("vision_encoder_args") or {}
  if encoder == "vae":
    if not isinstance(args, dict):
      raise FileFormatError(
        f"{where}: vision_encoder_args={args!r} must be an object "
        '({"patch_size": ..., "resolution": ...})'
      )
    args = {**_VAE_ARGS, **args}
    if args["patch_size"] != fields["patch_size"]:
      raise FileFormatError(
        f"{where}: vision_encoder_args.patch_size={args['patch_size']} but patch_size="
        f"{fields['patch_size']}: this model patchifies read latents with the generation "
        "patch size (model.patch_size), so both must agree; convert a checkpoint where they do"
      )
    if args["resolution"] != pixels:
      logging.warning(
        "%s: the reference resizes read images to vision_encoder_args."
        "resolution=%s pixels; this model reads them at image_size=%s",
        where,
        args["resolution"],
        pixels,
      )
  return encoder


def with_model_fields(base, fields: dict):
  """A copy of config `base` with `fields` set in its `model`."""
  config = copy.deepcopy(base)
  unknown = [k for k in fields if k not in config.model]
  if unknown:
    raise ConfigError(f"base config's model has no fields {unknown}; is it a MonoFormer config?")
  for key, value in fields.items():
    setattr(config.model, key, value)
  return config


def _same_vision(
  ours,
  theirs,
  ours_name: str,
  theirs_name: str,
  fix: str = "pass the CLIP folder of the model the config describes, or drop "
  "model.vision from the base config to take the folder's sizes",
):
  """ConfigError naming the first field where two tower configs differ."""
  for field in theirs:
    a, b = ours.get(field), theirs[field]
    if a != b and not (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b)):
      raise ConfigError(f"{ours_name}.{field}={a!r} but {theirs_name} gives {field}={b!r}: {fix}")


def no_clip_needed(encoder: str, clip: str | None, what: str):
  """ConfigError when a CLIP folder is given for a model (`what`) with no CLIP tower."""
  if clip and encoder != "clip":
    raise ConfigError(
      f"--clip={clip} was given, but {what} has vision_encoder={encoder!r}, "
      "no CLIP tower: drop --clip, or use the CLIP model you meant"
    )


def clip_vision_config(clip: str | None, base_vision, needed_by: str, hint: str = ""):
  """config.model.vision of a CLIP model: from the HF CLIP folder `clip` (its
  config.json; checked against `base_vision` when that is set too), or
  `base_vision`; a ConfigError naming --clip when neither is given.
  `needed_by` names what needs it, `hint` adds where the CLIP may be found."""
  if clip:
    found = read_clip_config(clip)
    if base_vision:
      _same_vision(
        base_vision,
        found,
        "the base config's model.vision",
        f"--clip={clip} ({os.path.join(clip, 'config.json')})",
      )
    return found
  if base_vision:
    return copy.deepcopy(base_vision)
  raise ConfigError(
    f"{needed_by} describes a model that reads images through CLIP (vision_encoder="
    "'clip'), and the CLIP tower's sizes are not in it: pass --clip=DIR (clip=DIR), the "
    "Hugging Face CLIP folder the tower came from, e.g. a download of "
    f"openai/clip-vit-large-patch14{hint}, or a base config whose model.vision is set "
    "(configs/t2i_llava.py)"
  )


def official_config(hf: dict, base, where: str = "config.json", *, clip: str | None = None):
  """The base config with its model fields from an official config.json; a
  CLIP model's tower sizes (model.vision) from the CLIP folder `clip` or the
  base config (see `clip_vision_config`)."""
  fields = {**llama_fields(hf, where), **monoformer_fields(hf, where)}
  no_clip_needed(fields["vision_encoder"], clip, where)
  if fields["vision_encoder"] == "clip":
    path = hf.get("vision_encoder_path")
    fields["vision"] = clip_vision_config(
      clip,
      base.model.vision,
      where,
      f" (the config.json names vision_encoder_path={path!r})" if path else "",
    )
  elif "vision" in base.model:
    fields["vision"] = None  # only a CLIP model has tower sizes
  if not fields["vision_encoder"] and "vision_encoder" not in base.model:
    del fields["vision_encoder"]  # a base config from before models read images
  config = with_model_fields(base, fields)
  # The rows the model was trained on (what samplers may fill): the reference's
  # text limit, kept so that an export writes it back unchanged.
  limit = hf.get("tokenizer_max_length")
  if limit is not None:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 2:
      raise FileFormatError(
        f"{where}: tokenizer_max_length={limit!r} must be a whole number of tokens (>= 2)"
      )
    config.data.seq_len = limit
  return config


def _vision_fields(config, vision_encoder_path: str | None) -> dict:
  """config.json's vision_encoder fields, which the reference's __init__ builds
  the encoder from (`initialize_vision_modules(vision_encoder,
  vision_encoder_path, **vision_encoder_args)`); {} for a model that reads no image."""
  m = config.model
  encoder = m.vision_encoder
  if not encoder:
    return {}
  out = {"vision_encoder": encoder}
  if encoder == "vae":
    out["vision_encoder_args"] = {"patch_size": m.patch_size, "resolution": m.image_size * 8}
    vision_encoder_path = vision_encoder_path or config.vae.path or None
  else:
    out["vision_encoder_args"] = {}  # CLIPVisionEncoder takes none
  if vision_encoder_path:
    out["vision_encoder_path"] = vision_encoder_path
  else:
    logging.warning(
      "the model reads images through %s but that model's folder is not known "
      "(%s), so config.json gets no vision_encoder_path, which the reference "
      "needs to build the model: add it there (e.g. %s)",
      encoder,
      "config.vae.path is empty" if encoder == "vae" else "no CLIP folder given",
      "stabilityai/sd-vae-ft-mse" if encoder == "vae" else "openai/clip-vit-large-patch14",
    )
  return out


def hf_config(config, *, vision_encoder_path: str | None = None) -> dict:
  """An official config.json (HF LlamaConfig + MonoFormer fields) for `config`;
  a model that reads images also gets vision_encoder (+ _args, and _path:
  `vision_encoder_path`, for vae by default config.vae.path)."""
  m = config.model
  if m.head_dim * m.num_heads != m.hidden_size:
    raise ConfigError(
      f"model.head_dim={m.head_dim} * num_heads={m.num_heads} != hidden_size="
      f"{m.hidden_size}: the official code (transformers 4.38) cannot express it"
    )
  return {
    "architectures": ["MonoFormerForCausalLM"],
    "model_type": "llama",
    "vocab_size": m.vocab_size,
    "hidden_size": m.hidden_size,
    "intermediate_size": m.mlp_dim,
    "num_hidden_layers": m.num_layers,
    "num_attention_heads": m.num_heads,
    "num_key_value_heads": m.num_kv_heads,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": m.rms_norm_eps,
    "rope_theta": m.rope_theta,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "use_cache": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "torch_dtype": "float32",
    "transformers_version": "4.38.0",
    "patch_size": m.patch_size,
    "in_channels": m.in_channels,
    "learn_sigma": m.learn_sigma,
    "tokenizer_max_length": config.data.seq_len,
    "tokenizer_padding_side": "right",
    "use_flash_attn": False,
    "image_size": m.image_size * 8,
    "use_pos_embed": True,
    "decoder_t_embed": m.conditioning,
    "use_adaln_final_layer": True,
    "use_bi_attn_img_tokens": True,
    "add_pos_embed_each_layer": False,
    "use_hybrid_attn_mask": None,
    "image_token_index": m.vocab_size - 3,
    **_vision_fields(config, vision_encoder_path),
  }


# --------------------------------------------------------------- public API


def load_official(
  path: str, base_config=None, *, shardings_fn=None, ema: bool = False, clip: str | None = None
):
  """(params, config) from official weights at `path` (a folder, or a .safetensors
  or PyTorch .bin/.pt file with config.json beside it); with `ema`, the `ema/`
  subfolder's weights.

  `shardings_fn(config)`, if given, returns the params' shardings (e.g.
  `lambda c: param_shardings(c, mesh)`) and the arrays are built in them.
  `clip`: the HF CLIP folder whose config.json gives a CLIP model's tower sizes
  (else the base config's model.vision; the weights come from the checkpoint).
  """
  folder = folder_of(path)
  base = default_config() if base_config is None else base_config
  config = official_config(
    read_hf_config(path), base, where=os.path.join(folder, "config.json"), clip=clip
  )
  weights = os.path.join(folder, "ema") if ema else path
  shardings = shardings_fn(config) if shardings_fn else None
  vision_from = (
    f"the CLIP config {os.path.join(clip, 'config.json')} (--clip)"
    if clip
    else "the base config's model.vision"
  )
  with open_weights(weights, hint="pass the official weights (--input)") as source:
    params = read_params(
      source,
      config.model,
      shardings,
      desc="official ema -> ours" if ema else "official -> ours",
      vision_from=vision_from,
    )
  return params, config


def load_official_model(path: str, base_config=None, *, clip: str | None = None):
  """(MonoFormer with official weights, config); see `load_official`."""
  params, config = load_official(path, base_config, clip=clip)
  graphdef, _, _ = abstract_model(config.model)
  return nnx.merge(graphdef, params), config


def has_ema(path: str) -> bool:
  return epath.Path(path).is_dir() and epath.Path(path, "ema").is_dir()


def record_assets(config, *, tokenizer: str | None = None, vae: str | None = None):
  """Records in `config` the tokenizer (data.tokenizer) and SD-VAE (vae.path)
  its model samples with, so that sampling, evaluation and the notebook need
  no flag for them: a hub id or bucket path as given, a local path made
  absolute (hub.recorded). Each is checked against the model first (it loads,
  the tokenizer's ids fit model.vocab_size, the VAE's latents are the model's);
  None keeps the config's own."""
  if tokenizer:
    tokenizer_of(config, tokenizer)
    config.data.tokenizer = recorded(tokenizer)
  if vae:
    inference.load_vae_of(config, vae, flag="--vae")
    config.vae.path = recorded(vae)
  return config


def convert_official(
  path: str,
  output: str,
  base_config=None,
  *,
  mesh=None,
  clip: str | None = None,
  tokenizer: str | None = None,
  vae: str | None = None,
):
  """Official weights (and `ema/` if present) -> a model checkpoint at `output`;
  `clip` as in `load_official`; `tokenizer` and `vae` recorded in its config
  (`record_assets`), checked before the weights are read."""
  shardings_fn = (lambda c: param_shardings(c, mesh)) if mesh is not None else None
  find_weights(path)  # fail on a bad path before any work
  base = default_config() if base_config is None else base_config
  where = os.path.join(folder_of(path), "config.json")
  # the whole config from config.json alone, the assets recorded in it: the
  # base config of the conversion itself
  base = record_assets(
    official_config(read_hf_config(path), base, where=where, clip=clip),
    tokenizer=tokenizer,
    vae=vae,
  )
  params, config = load_official(path, base, shardings_fn=shardings_fn, clip=clip)
  ema = None
  if has_ema(path):
    ema, _ = load_official(path, base, shardings_fn=shardings_fn, ema=True, clip=clip)
  save_model(output, config, params, ema=ema)
  logging.info("wrote %s (%s)", output, "params and ema" if ema is not None else "params")
  return config


# ------------------------------------------------------------------ write


@contextlib.contextmanager
def clip_tensors(m, clip: str | None):
  """The tensors of the HF CLIP folder `clip`, to write model config `m`'s
  whole tower from (its config.json checked against m.vision); None for a
  model without a CLIP tower."""
  no_clip_needed(m.vision_encoder, clip, "the model")
  if m.vision_encoder != "clip":
    yield None
    return
  if not clip:
    raise ConfigError(
      "the model reads images through CLIP: the official file holds the whole HF CLIP "
      "tower, whose last encoder layer and post_layernorm this model does not keep (it "
      "reads the second-to-last layer), so they are copied from the CLIP folder: pass "
      "--clip=DIR (clip=DIR), the folder the model's tower came from, e.g. a download of "
      "openai/clip-vit-large-patch14"
    )
  _same_vision(
    m.vision,
    read_clip_config(clip),
    "config.model.vision",
    f"--clip={clip} ({os.path.join(clip, 'config.json')})",
    fix="pass the CLIP folder the model's tower came from",
  )
  with open_weights(clip, hint="pass the CLIP folder (--clip)") as source:
    yield source


def _tower_tensors(flat, vcfg, clip_source) -> dict:
  """{official key: (shape, produce)} of a CLIP model's whole tower: ours, and
  the last layer and post_layernorm from `clip_source` (checked here)."""
  prefix = vision_prefix(clip_source.keys())
  out, problems = {}, []
  for t in tower_keys(vcfg):
    if t.path[0] == "post_layernorm":
      leaf, shape = None, (vcfg.hidden_size,)
    else:  # the last layer's shapes are those of the layers before it
      leaf = flat[("vision_tower", *t.path)]
      shape = _official_shape(leaf.shape[1:] if t.layer is not None else leaf.shape, t.layout)
    if t.held:

      def produce(leaf=leaf, t=t):
        x = leaf[t.layer] if t.layer is not None else leaf
        return _tower_to_official(np.asarray(x, np.float32), t.layout)
    else:
      key = prefix + t.key
      if key not in clip_source:
        problems.append(f"{key}: missing")
      elif clip_source.shape(key) != shape:
        problems.append(f"{key}: shape {clip_source.shape(key)}, the model's tower needs {shape}")
      produce = lambda key=key: clip_source.read(key)
    out[CLIP_TOWER_PREFIX + t.key] = (shape, produce)
  if problems:
    raise CheckpointError(
      f"CLIP folder {clip_source.path} does not hold the last encoder layer and "
      f"post_layernorm of the model's tower (num_layers={vcfg.num_layers}, hidden_size="
      f"{vcfg.hidden_size}, intermediate_size={vcfg.mlp_dim}):\n  "
      + "\n  ".join(problems)
      + "\npass --clip=DIR, the HF CLIP folder the model's tower came from"
    )
  for t in tower_keys(vcfg)[:3]:  # the embeddings: a cheap test of "the same CLIP"
    if not np.array_equal(out[CLIP_TOWER_PREFIX + t.key][1](), clip_source.read(prefix + t.key)):
      logging.warning(
        "the model's CLIP tower differs from --clip=%s (%s): the last layer and "
        "post_layernorm written come from another CLIP than the rest",
        clip_source.path,
        t.key,
      )
      break
  return out


def official_tensors(params, m, clip_source=None):
  """([(official key, shape)] in state_dict order, produce(key) -> float32 array).

  A CLIP model's tower is written whole, HF CLIPVisionModel keys under
  CLIP_TOWER_PREFIX (where the reference's state_dict has it: after
  final_layer, before im_embedder), the parts we do not hold from
  `clip_source` (see `clip_tensors`)."""
  flat = traverse_util.flatten_dict(params)
  table = expected_keys(m)
  tower = {}
  if m.vision_encoder == "clip":
    if clip_source is None:
      raise ConfigError(
        "a CLIP model's official tensors need the CLIP folder's: pass "
        "clip_source (official.clip_tensors(m, clip))"
      )
    tower = _tower_tensors(flat, m.vision, clip_source)

  def produce(key):
    if key in tower:
      return tower[key][1]()
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
  entries = entries_of(m)
  layered = [e for e in entries if e.layered]
  first_im = next((e for e in entries if e.path[0] == "im_embedder"), None)
  order = []
  for e in entries:
    if e is first_im:
      order += list(tower)
    if not e.layered:
      order.append(e.key)
    elif e is layered[0]:
      order += [x.key.format(i=i) for i in range(m.num_layers) for x in layered]
  shape = lambda k: tower[k][0] if k in tower else table[k][2]
  return [(k, shape(k)) for k in order], produce


def check_exportable(config):
  """The official format holds the paper's IDDPM models only: refuse a flow
  model before anything is read or written."""
  objective = config.diffusion.objective
  if objective != "iddpm":
    raise ConfigError(
      f"diffusion.objective={objective!r}: the official MonoFormer format holds IDDPM "
      "models only (epsilon and learned variance), so a flow model cannot be exported; "
      "sample and evaluate it from its checkpoint here"
    )


def write_official(
  params,
  config,
  folder: str,
  *,
  max_shard_bytes: int,
  desc: str = "ours -> official",
  clip: str | None = None,
  clip_name: str | None = None,
):
  """Writes `params` as official safetensors + config.json into `folder`; a
  CLIP model needs `clip`, the HF CLIP folder its tower came from, which
  config.json names as vision_encoder_path (or as `clip_name`: the hub id
  the folder was downloaded by, which loads on any machine)."""
  check_exportable(config)
  with clip_tensors(config.model, clip) as clip_source:
    shapes, produce = official_tensors(params, config.model, clip_source)
    with tqdm.tqdm(total=len(shapes), desc=desc, unit="tensor", leave=False) as bar:
      names = write_safetensors(
        folder, shapes, produce, max_shard_bytes=max_shard_bytes, on_tensor=lambda key: bar.update()
      )
  epath.Path(folder, "config.json").write_text(
    json.dumps(hf_config(config, vision_encoder_path=clip_name or clip), indent=2)
  )
  return names


def convert_to_official(
  path: str,
  output: str,
  *,
  max_shard_bytes: int = 5 * 10**9,
  clip: str | None = None,
  clip_name: str | None = None,
):
  """A model checkpoint -> official layout at `output` (+ `output/ema/` if it has
  EMA); a CLIP model needs `clip` (and `clip_name`, see `write_official`)."""
  config, _ = load_config(path)
  check_exportable(config)
  with clip_tensors(config.model, clip):
    pass  # a missing or mismatched CLIP folder fails before the model is read
  weights = stored_weights(path)
  params, config, _ = load_params(path, weights="raw")
  names = dict(clip=clip, clip_name=clip_name)
  write_official(params, config, output, max_shard_bytes=max_shard_bytes, **names)
  del params
  if "ema" in weights:
    ema, _, _ = load_params(path, weights="ema", config=config)
    write_official(
      ema,
      config,
      os.path.join(output, "ema"),
      max_shard_bytes=max_shard_bytes,
      desc="ours ema -> official",
      **names,
    )
  logging.info("wrote %s (%s)", output, " and ".join(weights))
  return config
