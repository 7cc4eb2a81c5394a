"""CLIP's ViT image encoder, as MonoFormer reads it, in Flax NNX; its HF config and weights.

    params, vcfg = load_clip_params("path/to/clip-vit-large-patch14")  # HF folder
    tower = tower_from_params(params, vcfg)
    features = tower(pixels)          # [B, P, E]: hidden_states[-2][:, 1:]

`vcfg` (config.model.vision) has the fields hidden_size, mlp_dim, num_layers,
num_heads, image_size, patch_size, num_channels, layer_norm_eps, hidden_act;
`clip_config_from_hf` makes it from an HF config.json. The pixels come from
CLIP's own preprocessing (vision/clip_pixels.py).

MonoFormer reads an image for understanding through the frozen CLIP ViT-L/14
(openai/clip-vit-large-patch14): HF `CLIPVisionModel(pixels,
output_hidden_states=True).hidden_states[-2][:, 1:]`, the output of the
second-to-last encoder layer without the class token. hidden_states[0] is the
embeddings after `pre_layrnorm` and hidden_states[i] the output of layer i, so
that is the output of layer num_layers - 1: the tower builds and runs only the
first num_layers - 1 layers. The last layer and `post_layernorm` change
nothing MonoFormer reads, so they are neither built nor loaded (the loader
accepts and skips them).

The network: a p x p stride-p patch convolution without bias, a class token
prepended, learned positions over the P + 1 tokens, LayerNorm (`pre_layrnorm`),
then pre-norm layers x + attn(ln1(x)), x + fc2(act(fc1(ln2(x)))) with biases
everywhere and attention scaled by head_dim ** -0.5. LayerNorm statistics and
the softmax are float32 whatever the compute dtype.

Shapes: pixels [B, h, w, C] channels-last, already normalised
(vision/clip_pixels.py `preprocess`); L = P + 1 tokens (the class token
first, then the P = (image_size / patch_size) ** 2 patches in row-major
order); features [B, P, E]. E, F, H, D here are the tower's own widths
(config.model.vision), not the decoder's. Kernels are [in, out]; the patch
kernel is [p, p, C, E] (HWIO). The layers are stacked on a leading axis and
applied with `jax.lax.scan`, as the decoder's. Every parameter's logical axes
are clip_* names, which the project's sharding rules replicate
(config/schema.py SHARDING_RULES).
"""

from __future__ import annotations

import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from monoformer_jax.errors import CheckpointError, ConfigError, MissingPathError, PathError
from monoformer_jax.model.layers import Dense, param
from monoformer_jax.safetensors_io import open_weights, read_json_object

CONFIG_NAME = "config.json"

# HF CLIPVisionConfig's defaults, for the fields a config.json leaves out.
_HF_DEFAULTS = {
  "hidden_size": 768,
  "intermediate_size": 3072,
  "num_hidden_layers": 12,
  "num_attention_heads": 12,
  "image_size": 224,
  "patch_size": 32,
  "num_channels": 3,
  "layer_norm_eps": 1e-5,
  "hidden_act": "quick_gelu",
}
# Our field <- HF's name.
_FIELDS = {
  "hidden_size": "hidden_size",
  "mlp_dim": "intermediate_size",
  "num_layers": "num_hidden_layers",
  "num_heads": "num_attention_heads",
  "image_size": "image_size",
  "patch_size": "patch_size",
  "num_channels": "num_channels",
  "layer_norm_eps": "layer_norm_eps",
  "hidden_act": "hidden_act",
}
_MODEL_TYPES = ("clip", "clip_vision_model")

ACTIVATIONS = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP's
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


# ------------------------------------------------------------------ config
def _square(value, name: str, where: str) -> int:
  """An HF size field (an int, or [n, n]) as one int."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ConfigError(
        f"{where}: {name}={list(value)} is not square; the CLIP tower "
        "supports square images and patches only"
      )
    value = value[0]
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"{where}: {name}={value!r} must be a positive int")
  return value


def clip_config_from_hf(config: dict, where: str = "the CLIP config") -> ml_collections.ConfigDict:
  """config.model.vision from an HF CLIPVisionConfig dict, or a CLIPConfig one
  (whose `vision_config`, updated by a legacy `vision_config_dict` as HF does,
  is read). Fields an HF file leaves out take HF's CLIPVisionConfig defaults."""
  model_type = config.get("model_type")
  if model_type is not None and model_type not in _MODEL_TYPES:
    raise ConfigError(
      f"{where} is a {model_type!r} config, not CLIP's ({_MODEL_TYPES}); "
      "pass the folder of a CLIPVisionModel or CLIPModel"
    )
  if "vision_config" in config or "vision_config_dict" in config:
    vision = dict(config.get("vision_config") or {})
    vision.update(config.get("vision_config_dict") or {})
  else:
    vision = config
  hf = {k: vision.get(k, default) for k, default in _HF_DEFAULTS.items()}
  vcfg = ml_collections.ConfigDict({ours: hf[theirs] for ours, theirs in _FIELDS.items()})
  vcfg.image_size = _square(vcfg.image_size, "image_size", where)
  vcfg.patch_size = _square(vcfg.patch_size, "patch_size", where)
  vcfg.layer_norm_eps = float(vcfg.layer_norm_eps)
  check_config(vcfg, where, hf_names=True)
  return vcfg


def check_config(vcfg, where: str = "config.model.vision", hf_names: bool = False) -> None:
  """ConfigError naming the field unless `vcfg` describes a tower we can build.

  Fields are named `where.field`, or with `hf_names` `where: hf_field` (the
  config.json `vcfg` came from)."""

  def field(name):
    return f"{where}: {_FIELDS[name]}" if hf_names else f"{where}.{name}"

  for name in ("hidden_size", "mlp_dim", "num_heads", "image_size", "patch_size", "num_channels"):
    value = vcfg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"{field(name)}={value!r} must be a positive int")
  if vcfg.hidden_size % vcfg.num_heads:
    raise ConfigError(
      f"{field('hidden_size')}={vcfg.hidden_size} is not a multiple of "
      f"{_FIELDS['num_heads'] if hf_names else 'num_heads'}={vcfg.num_heads}"
    )
  if vcfg.image_size % vcfg.patch_size:
    raise ConfigError(
      f"{field('image_size')}={vcfg.image_size} is not a multiple of patch_size={vcfg.patch_size}"
    )
  if (
    isinstance(vcfg.num_layers, bool) or not isinstance(vcfg.num_layers, int) or vcfg.num_layers < 2
  ):
    raise ConfigError(
      f"{field('num_layers')}={vcfg.num_layers!r}: MonoFormer reads the "
      "second-to-last layer's output, so the tower needs >= 2 layers"
    )
  if vcfg.hidden_act not in ACTIVATIONS:
    raise ConfigError(
      f"{field('hidden_act')}={vcfg.hidden_act!r} is not supported; use one "
      f"of {sorted(ACTIVATIONS)}"
    )


def tokens_of(vcfg) -> int:
  """P, the feature tokens per image: (image_size / patch_size) ** 2."""
  return (vcfg.image_size // vcfg.patch_size) ** 2


def feature_dim(vcfg) -> int:
  """E, the width of each feature token."""
  return vcfg.hidden_size


# ------------------------------------------------------------------ model
class LayerNorm(nnx.Module):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32."""

  def __init__(self, dim: int, eps: float):
    self.scale = param(None, (dim,), ("clip_embed",), init="ones")
    self.bias = param(None, (dim,), ("clip_embed",), init="zeros")
    self.eps = eps

  def __call__(self, x_BxLxE):
    x = x_BxLxE.astype(jnp.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.square(x - mean).mean(axis=-1, keepdims=True)  # biased, as torch's
    x = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (x * self.scale[...] + self.bias[...]).astype(x_BxLxE.dtype)


class SelfAttention(nnx.Module):
  """Bidirectional multi-head attention over all L tokens, q/k/v/out with biases."""

  def __init__(self, vcfg, *, rngs: nnx.Rngs):
    e = vcfg.hidden_size
    self.q_proj = Dense(e, e, ("clip_embed", "clip_heads"), rngs=rngs)
    self.k_proj = Dense(e, e, ("clip_embed", "clip_heads"), rngs=rngs)
    self.v_proj = Dense(e, e, ("clip_embed", "clip_heads"), rngs=rngs)
    self.out_proj = Dense(e, e, ("clip_heads", "clip_embed"), rngs=rngs)
    self.num_heads = vcfg.num_heads

  def __call__(self, x_BxLxE):
    b, length, e = x_BxLxE.shape
    h = self.num_heads
    d = e // h
    q_BxLxHxD, k_BxLxHxD, v_BxLxHxD = (
      proj(x_BxLxE).reshape(b, length, h, d) for proj in (self.q_proj, self.k_proj, self.v_proj)
    )
    logits_BxHxLxL = (
      jnp.einsum("bqhd,bkhd->bhqk", q_BxLxHxD, k_BxLxHxD, preferred_element_type=jnp.float32)
      * d**-0.5
    )
    probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL, axis=-1).astype(x_BxLxE.dtype)
    out_BxLxHxD = jnp.einsum("bhqk,bkhd->bqhd", probs_BxHxLxL, v_BxLxHxD)
    return self.out_proj(out_BxLxHxD.reshape(b, length, e))


class MLP(nnx.Module):
  """fc2(act(fc1(x))), `act` the config's hidden_act."""

  def __init__(self, vcfg, *, rngs: nnx.Rngs):
    self.fc1 = Dense(vcfg.hidden_size, vcfg.mlp_dim, ("clip_embed", "clip_mlp"), rngs=rngs)
    self.fc2 = Dense(vcfg.mlp_dim, vcfg.hidden_size, ("clip_mlp", "clip_embed"), rngs=rngs)
    self.hidden_act = vcfg.hidden_act

  def __call__(self, x_BxLxE):
    return self.fc2(ACTIVATIONS[self.hidden_act](self.fc1(x_BxLxE)))


class EncoderLayer(nnx.Module):
  """Pre-norm block: x + attn(layer_norm1(x)), then x + mlp(layer_norm2(x))."""

  def __init__(self, vcfg, *, rngs: nnx.Rngs):
    self.layer_norm1 = LayerNorm(vcfg.hidden_size, vcfg.layer_norm_eps)
    self.self_attn = SelfAttention(vcfg, rngs=rngs)
    self.layer_norm2 = LayerNorm(vcfg.hidden_size, vcfg.layer_norm_eps)
    self.mlp = MLP(vcfg, rngs=rngs)

  def __call__(self, x_BxLxE):
    x_BxLxE = x_BxLxE + self.self_attn(self.layer_norm1(x_BxLxE))
    return x_BxLxE + self.mlp(self.layer_norm2(x_BxLxE))


class CLIPVisionTower(nnx.Module):
  """Normalised pixels [B, h, w, C] -> the second-to-last layer's patch tokens [B, P, E].

  Holds the embeddings, `pre_layrnorm` and the first num_layers - 1 encoder
  layers only (see the module docstring). Parameter names follow HF's so that
  `load_clip_params` maps them one to one.
  """

  def __init__(self, vcfg, *, rngs: nnx.Rngs):
    check_config(vcfg)
    self.vcfg = ml_collections.FrozenConfigDict(vcfg)  # hashable: the graphdef is a jit key
    e, p, c = vcfg.hidden_size, vcfg.patch_size, vcfg.num_channels
    self.patch_embedding = param(
      rngs, (p, p, c, e), ("clip_patch", "clip_patch", "clip_channels", "clip_embed")
    )
    self.class_embedding = param(rngs, (e,), ("clip_embed",))
    self.position_embedding = param(
      rngs, (tokens_of(vcfg) + 1, e), ("clip_positions", "clip_embed")
    )
    self.pre_layrnorm = LayerNorm(e, vcfg.layer_norm_eps)
    built = vcfg.num_layers - 1

    @nnx.split_rngs(splits=built)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=built)
    def make_layers(rngs):
      return EncoderLayer(vcfg, rngs=rngs)

    self.layers = make_layers(rngs)

  def embed(self, pixels_BxhxwxC, dtype):
    """The L = P + 1 token embeddings after pre_layrnorm: hidden_states[0]."""
    v = self.vcfg
    s, p, c = v.image_size, v.patch_size, v.num_channels
    if pixels_BxhxwxC.ndim != 4 or pixels_BxhxwxC.shape[1:] != (s, s, c):
      raise ValueError(
        f"CLIP pixels have shape {pixels_BxhxwxC.shape}; the tower "
        f"(image_size={s}, num_channels={c}) takes [B, {s}, {s}, {c}] "
        "channels-last: resize and crop them with `preprocess`"
      )
    b, g = pixels_BxhxwxC.shape[0], s // p
    x = pixels_BxhxwxC.astype(dtype).reshape(b, g, p, g, p, c)
    patches_BxgxgxE = jnp.einsum("bihjwc,hwce->bije", x, self.patch_embedding[...].astype(dtype))
    patches_BxPxE = patches_BxgxgxE.reshape(b, g * g, -1)
    cls_Bx1xE = jnp.broadcast_to(
      self.class_embedding[...].astype(dtype), (b, 1, patches_BxPxE.shape[-1])
    )
    x_BxLxE = jnp.concatenate([cls_Bx1xE, patches_BxPxE], axis=1)
    x_BxLxE = x_BxLxE + self.position_embedding[...].astype(dtype)
    return self.pre_layrnorm(x_BxLxE)

  def __call__(self, pixels_BxhxwxC, dtype=jnp.float32):
    """Features [B, P, E] in `dtype`: layer num_layers - 1's output, class token dropped."""
    x_BxLxE = self.embed(pixels_BxhxwxC, dtype)
    # A plain lax.scan over the stacked layer state, merged per step, as the
    # decoder's: it works under any outer transform.
    layer_def, layer_state = nnx.split(self.layers)

    def body(x, state):
      return nnx.merge(layer_def, state)(x), None

    x_BxLxE, _ = jax.lax.scan(body, x_BxLxE, layer_state)
    return x_BxLxE[:, 1:]


def abstract_tower(vcfg) -> CLIPVisionTower:
  """The tower's structure with abstract parameters, nothing allocated."""
  return nnx.eval_shape(lambda: CLIPVisionTower(vcfg, rngs=nnx.Rngs(0)))


def tower_from_params(params: dict, vcfg) -> CLIPVisionTower:
  """A CLIPVisionTower holding `params` (a pure dict, as `load_clip_params` returns)."""
  graphdef, state = nnx.split(abstract_tower(vcfg))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


# ------------------------------------------------------------------ loading
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_MAX_LISTED = 8
# Keys of an HF CLIP folder that the tower does not read (after the vision
# prefix is removed): the last layer (checked separately), post_layernorm,
# the position_ids buffer older files saved, and CLIPModel's text side.
_SKIPPED = re.compile(r"post_layernorm\.(weight|bias)|embeddings\.position_ids")
_OTHER_MODEL = re.compile(r"(text_model|text_projection|visual_projection|logit_scale)\b")


def _hf_name(path: tuple) -> tuple[str, bool]:
  """(HF key without prefix, with {i} for the layer, whether it is stacked) of a param path."""
  path = tuple(str(p) for p in path)
  if path[0] == "layers":
    return "encoder.layers.{i}." + ".".join(path[1:-1]) + "." + _LEAF_NAMES[path[-1]], True
  if path[0] == "pre_layrnorm":
    return "pre_layrnorm." + _LEAF_NAMES[path[-1]], False
  return {
    "patch_embedding": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "position_embedding": "embeddings.position_embedding.weight",
  }[path[0]], False


def _hf_shape(path: tuple, shape: tuple) -> tuple:
  """The PyTorch shape of one (unstacked) parameter of ours."""
  if str(path[0]) == "patch_embedding":  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2 and str(path[-1]) == "kernel":  # [in, out] -> [out, in]
    return (shape[1], shape[0])
  return tuple(shape)


def _to_ours(path: tuple, value: np.ndarray) -> np.ndarray:
  if str(path[0]) == "patch_embedding":
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2 and str(path[-1]) == "kernel":
    return value.T
  return value


def _shape_field(hf_key: str, vcfg) -> str:
  """The config fields a parameter's shape follows."""
  if "patch_embedding" in hf_key:
    return (
      f"hidden_size={vcfg.hidden_size}, num_channels={vcfg.num_channels}, "
      f"patch_size={vcfg.patch_size}"
    )
  if "position_embedding" in hf_key:
    return (
      f"hidden_size={vcfg.hidden_size}, image_size={vcfg.image_size}, patch_size={vcfg.patch_size}"
    )
  if ".fc1." in hf_key or ".fc2." in hf_key:
    return f"hidden_size={vcfg.hidden_size}, intermediate_size={vcfg.mlp_dim}"
  return f"hidden_size={vcfg.hidden_size}"


def _listed(keys) -> str:
  keys = sorted(keys)
  more = f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
  return ", ".join(keys[:_MAX_LISTED]) + more


def vision_prefix(keys) -> str:
  """'vision_model.' for a CLIPModel (or a CLIPVisionModel transformers < 5
  saved), '' for a CLIPVisionModel saved by transformers >= 5."""
  return "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""


def clip_params_from_tensors(
  source, vcfg, *, where: str = "CLIP checkpoint", config_source: str = "the config"
) -> dict:
  """Pure dict of the tower's params read from `source` (anything with `keys()`,
  `shape(key)` and `read(key) -> float32 array`: a SafetensorsSource).

  The first vcfg.num_layers - 1 layers are read; the last layer, post_layernorm
  and any CLIPModel text keys are skipped. CheckpointError on a missing key, a
  key the config does not explain, or a shape the config does not give.
  """
  keys = set(source.keys())
  prefix = vision_prefix(keys)
  flat = list(nnx.to_flat_state(nnx.state(abstract_tower(vcfg), nnx.Param)))
  built = vcfg.num_layers - 1
  wanted = {}  # HF key -> (our path, layer index or None, unstacked shape)
  for path, var in flat:
    name, stacked = _hf_name(path)
    shape = tuple(var.shape[1:] if stacked else var.shape)
    for i in range(built) if stacked else [None]:
      wanted[prefix + name.format(i=i)] = (path, i, shape)

  missing = sorted(k for k in wanted if k not in keys)
  last = f"{prefix}encoder.layers.{built}."
  unexplained = sorted(
    k
    for k in keys - set(wanted)
    if not (
      k.startswith(last)
      or _SKIPPED.fullmatch(k[len(prefix) :])
      or (prefix and not k.startswith(prefix) and _OTHER_MODEL.match(k))
    )
  )
  if missing or unexplained:
    parts = []
    if missing:
      parts.append(f"{len(missing)} key(s) the tower needs are missing: {_listed(missing)}")
    if unexplained:
      parts.append(
        f"{len(unexplained)} key(s) are not in a CLIP vision tower of this config: "
        f"{_listed(unexplained)}"
      )
    layers = sorted(
      {
        int(m.group(1))
        for k in keys
        if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))
      }
    )
    found = f"the file holds layers {layers[0]}..{layers[-1]}" if layers else "no layers"
    raise CheckpointError(
      f"{where} does not match {config_source} (num_layers={vcfg.num_layers}; {found}): "
      + "; ".join(parts)
      + ". Load it with the config.json saved with it, or pass the "
      "folder of an HF CLIPVisionModel / CLIPModel (e.g. openai/clip-vit-large-patch14)"
    )

  for key, (path, _, shape) in wanted.items():
    want = _hf_shape(path, shape)
    if source.shape(key) != want:
      raise CheckpointError(
        f"{where}: {key!r} has shape {source.shape(key)} but {config_source} makes it "
        f"{want} (PyTorch layout); the shape follows {_shape_field(key, vcfg)}: use the "
        "config.json saved with these weights, or another folder"
      )

  values = {}
  for key, (path, _, _) in wanted.items():
    values.setdefault(path, []).append(_to_ours(path, source.read(key)))
  leaves = []
  for path, var in flat:
    parts = values[path]
    value = np.stack(parts) if _hf_name(path)[1] else parts[0]
    leaves.append((path, var.replace(value.astype(np.float32))))
  return nnx.to_pure_dict(nnx.from_flat_state(leaves))


def clip_folder(path, what: str) -> epath.Path:
  """`path` as the folder of an HF CLIP model; raises, naming it and `what` it
  should hold, when it is missing or a file."""
  folder = epath.Path(os.fspath(path))
  if not folder.exists():
    raise MissingPathError(
      f"CLIP folder {folder} does not exist; pass the folder of an HF "
      f"CLIPVisionModel or CLIPModel ({what}), e.g. a download of "
      "openai/clip-vit-large-patch14"
    )
  if not folder.is_dir():
    raise PathError(f"CLIP path {folder} is a file; pass the folder that holds it ({what})")
  return folder


def read_clip_config(path) -> ml_collections.ConfigDict:
  """config.model.vision from the config.json of the HF CLIP folder `path`."""
  folder = clip_folder(path, f"{CONFIG_NAME} + model.safetensors")
  config_path = folder / CONFIG_NAME
  if not config_path.exists():
    raise MissingPathError(
      f"CLIP folder {folder} has no {CONFIG_NAME}; pass the whole HF "
      "folder that save_pretrained wrote (config.json + model.safetensors)"
    )
  config = read_json_object(config_path, "an HF CLIPVisionConfig / CLIPConfig config.json")
  return clip_config_from_hf(config, str(config_path))


def load_clip_params(path, vcfg=None) -> tuple[dict, ml_collections.ConfigDict]:
  """(params pure dict of host float32 arrays, config.model.vision) from an HF folder.

  `path`: a CLIPVisionModel or CLIPModel folder (config.json + model.safetensors,
  or shards with model.safetensors.index.json; else PyTorch pytorch_model.bin,
  read without torch: safetensors_io.open_weights); any float dtype is read as
  float32. `vcfg`, when given (the model config's vision field), must agree
  with the folder's config.json field by field. The params match
  `nnx.state(CLIPVisionTower(vcfg), nnx.Param)`: pass them to `tower_from_params`,
  or device_put them with the shardings you want first.
  """
  folder = clip_folder(path, f"{CONFIG_NAME} + model.safetensors")
  found = read_clip_config(folder)
  config_source = str(folder / CONFIG_NAME)
  if vcfg is not None:
    for field in _FIELDS:
      ours, theirs = vcfg[field], found[field]
      if ours != theirs and not (isinstance(ours, float) and math.isclose(ours, theirs)):
        raise CheckpointError(
          f"config.model.vision.{field}={ours!r} but CLIP folder {folder} is a model with "
          f"{_FIELDS[field]}={theirs!r} ({config_source}): use the folder's config "
          "(clip_config_from_hf of its config.json, or load_clip_params(path) without "
          "vcfg) or a folder of the model the config describes"
        )
  with open_weights(str(folder), hint="pass the CLIP folder") as source:
    params = clip_params_from_tensors(
      source, found, where=f"CLIP checkpoint {folder}", config_source=config_source
    )
  return params, found
