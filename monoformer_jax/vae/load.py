"""Loading diffusers AutoencoderKL checkpoints into our AutoencoderKL.

Accepted layouts: a diffusers folder (`config.json` +
`diffusion_pytorch_model.safetensors`, e.g. stabilityai/sd-vae-ft-mse, or
only its PyTorch `diffusion_pytorch_model.bin`, read without torch), a
pipeline folder holding one as `vae/`, or a single weights file (.safetensors,
or a PyTorch .bin/.pt/.pth) with its config beside it or passed in.
Checkpoint keys are our parameter paths (see autoencoder_kl.py) with `weight`
for `kernel`/`scale`; PyTorch conv weights OIHW become HWIO, and the attention
projections, Linear [out, in] or 1x1 conv [out, in, 1, 1] in older files,
become [in, out]. Older files' attention names
(query/key/value/proj_attn) are renamed to to_q/to_k/to_v/to_out.0.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from monoformer_jax import hub
from monoformer_jax.errors import CheckpointError, FileFormatError, MissingPathError
from monoformer_jax.safetensors_io import open_weights, read_json_object
from monoformer_jax.vae.autoencoder_kl import AutoencoderKL, VAEConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TORCH_WEIGHTS_NAME = "diffusion_pytorch_model.bin"  # read when the folder has no safetensors
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_MAX_LISTED = 8


def resolve_vae_files(path, config=None) -> tuple[epath.Path, dict, str]:
  """(weights file, config dict, where the config came from) for `path`.

  `config` (a dict or a config.json path) overrides the one found beside the weights.
  Paths may be local, on a bucket (`gs://...`) or a hub id
  (`stabilityai/sd-vae-ft-mse`, see hub.py).
  """
  path = epath.Path(hub.local_path(path, "VAE", "vae"))  # a hub id: its snapshot folder
  if path.is_dir():

    def weights_in(folder):  # safetensors first: SD-VAE's repo holds both
      return next(
        (folder / n for n in (WEIGHTS_NAME, TORCH_WEIGHTS_NAME) if (folder / n).exists()), None
      )

    folder = (
      path / "vae"
      if (not (path / CONFIG_NAME).exists() and weights_in(path / "vae") is not None)
      else path
    )
    weights = weights_in(folder)
    if weights is None:
      found = sorted(p.name for p in folder.iterdir())
      raise MissingPathError(
        f"VAE folder {folder} has no {WEIGHTS_NAME} or {TORCH_WEIGHTS_NAME} (found "
        f"{found[:_MAX_LISTED]}); pass the weights file itself with config=... to load "
        "another name"
      )
  elif path.is_file():
    if path.suffix not in WEIGHTS_SUFFIXES:
      raise FileFormatError(
        f"VAE weights {path} are not a weights file: expected "
        f"{' or '.join(WEIGHTS_SUFFIXES)} (safetensors, or a PyTorch state dict)"
      )
    weights, folder = path, path.parent
  else:
    raise MissingPathError(
      f"VAE path {path} does not exist; expected a diffusers folder "
      f"({CONFIG_NAME} + {WEIGHTS_NAME} or {TORCH_WEIGHTS_NAME}) or a weights file"
    )

  if isinstance(config, dict):
    return weights, config, "the config passed in"
  config_path = epath.Path(config) if config is not None else folder / CONFIG_NAME
  if not config_path.exists():
    raise MissingPathError(
      f"VAE config {config_path} not found for weights {weights}; "
      "pass config= (a diffusers config.json path or dict)"
    )
  return (
    weights,
    read_json_object(config_path, "a diffusers AutoencoderKL config.json"),
    str(config_path),
  )


def read_tensors(path) -> dict[str, np.ndarray]:
  """Every tensor of a weights file in its stored dtype (bfloat16 via ml_dtypes):
  read-only views of one memory map (local safetensors), read-only arrays (a
  bucket's), or arrays read out of a PyTorch file."""
  with open_weights(str(path), hint="pass the VAE's weights") as source:
    return {key: source.view(key) for key in source.keys()}


def rename_legacy_keys(tensors: dict) -> dict:
  """query/key/value/proj_attn attention names -> to_q/to_k/to_v/to_out.0."""
  renamed = {}
  for key, value in tensors.items():
    new = key
    match = re.fullmatch(r"(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)", key)
    if match:
      prefix, name, leaf = match.groups()
      new = f"{prefix}.{LEGACY_ATTENTION_NAMES[name]}.{leaf}"
      if new in tensors:
        raise FileFormatError(f"VAE checkpoint has both {key!r} and {new!r}; keep one of them")
    renamed[new] = value
  return renamed


def checkpoint_key(path: tuple) -> str:
  """Our parameter path -> its diffusers key ('encoder', 'conv_in', 'kernel' -> ...weight)."""
  return ".".join(str(p) for p in path[:-1]) + "." + _LEAF_NAMES[path[-1]]


def _checkpoint_shape(shape: tuple) -> tuple:
  """The PyTorch shape of one of our parameters."""
  if len(shape) == 4:  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:  # [in, out] -> [out, in]
    return (shape[1], shape[0])
  return tuple(shape)


def _to_our_layout(value: np.ndarray, ndim: int) -> np.ndarray:
  if ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if ndim == 2:
    return value.reshape(value.shape[:2]).T  # [out, in] or [out, in, 1, 1]
  return value


def _shape_fields(key: str, cfg: VAEConfig) -> str:
  """The config values a parameter's shape follows."""
  blocks = f"block_out_channels={list(cfg.block_out_channels)}"
  if key.startswith("encoder.conv_in."):
    return f"in_channels={cfg.in_channels} or {blocks}"
  if key.startswith("decoder.conv_out."):
    return f"out_channels={cfg.out_channels} or {blocks}"
  if key.startswith(("quant_conv.", "post_quant_conv.")):
    return f"latent_channels={cfg.latent_channels}"
  if key.startswith(("encoder.conv_out.", "decoder.conv_in.")):
    return f"latent_channels={cfg.latent_channels} or {blocks}"
  return blocks


def _structure_hints(keys, cfg: VAEConfig) -> list[str]:
  """Which config values would add or remove these parameters ('x=1 (why)')."""
  if any(re.match(r"(first_stage_model\.)?(en|de)coder\.(down|up|mid)\.", k) for k in keys):
    # No config describes these names: the file needs converting.
    return [
      "convert the file: its keys are the original LDM/CompVis names "
      "(encoder.down.0.block.0...), not diffusers' (diffusers' AutoencoderKL."
      "from_single_file(...).save_pretrained(folder) converts it)"
    ]
  hints = []
  for key in keys:
    if (
      re.match(r"(encoder\.down|decoder\.up)_blocks\.\d+\.(down|up)samplers", key)
      or re.match(r"(encoder\.down|decoder\.up)_blocks\.\d+\.", key)
      and int(key.split(".")[2]) >= len(cfg.block_out_channels)
    ):
      hint = (
        f"block_out_channels={list(cfg.block_out_channels)} (one block, and a "
        "down/upsampler between blocks, per entry)"
      )
    elif ".attentions." in key:
      hint = f"mid_block_add_attention={cfg.mid_block_add_attention}"
    elif key.startswith("quant_conv."):
      hint = f"use_quant_conv={cfg.use_quant_conv}"
    elif key.startswith("post_quant_conv."):
      hint = f"use_post_quant_conv={cfg.use_post_quant_conv}"
    elif ".conv_shortcut." in key:
      hint = (
        f"block_out_channels={list(cfg.block_out_channels)} (a resnet whose "
        "channels change has a conv_shortcut)"
      )
    elif re.search(r"_blocks\.\d+\.resnets\.\d+\.", key):
      hint = (
        f"layers_per_block={cfg.layers_per_block} (resnets per encoder block; "
        "the decoder has one more)"
      )
    else:
      continue
    if hint not in hints:
      hints.append(hint)
  return hints


def _listed(keys) -> str:
  keys = sorted(keys)
  more = f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
  return ", ".join(keys[:_MAX_LISTED]) + more


def vae_from_tensors(
  tensors: dict,
  cfg: VAEConfig,
  *,
  dtype=jnp.float32,
  source: str = "VAE checkpoint",
  config_source: str = "the config",
) -> AutoencoderKL:
  """An AutoencoderKL holding `tensors` (diffusers key -> PyTorch-layout array)."""
  tensors = rename_legacy_keys(tensors)
  abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(abstract_state))
  expected = {checkpoint_key(path): var for path, var in flat}

  missing = [k for k in expected if k not in tensors]
  unexpected = [k for k in tensors if k not in expected]
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(
        f"{len(missing)} key(s) the config needs are missing from it: {_listed(missing)}"
      )
    if unexpected:
      parts.append(f"{len(unexpected)} key(s) in it are not in the model: {_listed(unexpected)}")
    hints = _structure_hints(missing + unexpected, cfg)
    if hints and hints[0].startswith("convert"):
      fix = "To fix: " + hints[0]
    elif hints:
      fix = f"To fix, change in {config_source}: " + "; ".join(hints)
    else:
      fix = f"Load it with the config.json saved with it, not {config_source}"
    raise CheckpointError(
      f"{source} does not match {config_source}: " + "; ".join(parts) + ". " + fix + "."
    )

  leaves = []
  for path, var in flat:
    key = checkpoint_key(path)
    value = np.asarray(tensors[key])
    want = _checkpoint_shape(var.shape)
    found = tuple(value.shape)
    # A [out, in, 1, 1] conv is also accepted for a Linear (older attention weights).
    if found != want and not (len(want) == 2 and found == want + (1, 1)):
      raise CheckpointError(
        f"{source}: {key!r} has shape {found} but {config_source} makes it {want} "
        f"(PyTorch layout); the shape follows {_shape_fields(key, cfg)}: change that "
        "to match the checkpoint, or use the config.json saved with it"
      )
    leaves.append((path, var.replace(jnp.asarray(_to_our_layout(value, len(want)), dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def load_vae(path, *, config=None, dtype=jnp.float32) -> AutoencoderKL:
  """The AutoencoderKL saved at `path` (see the module docstring), params in `dtype`.

  `config`: a diffusers config dict or config.json path, when it is not beside
  the weights. The VAE computes in `dtype` (GroupNorm and softmax in float32).
  """
  weights, config_dict, config_source = resolve_vae_files(path, config)
  cfg = VAEConfig.from_diffusers(config_dict)
  return vae_from_tensors(
    read_tensors(weights),
    cfg,
    dtype=dtype,
    source=f"VAE checkpoint {weights}",
    config_source=config_source,
  )
