r"""Weights in and out: `python -m monoformer_jax.convert COMMAND --flags`.

  official         official MonoFormer weights (+ ema/) -> a model checkpoint
                   --input=DIR_OR_SAFETENSORS_OR_HUB_ID --output=CKPT_DIR [--config=...]
                   [--mesh] [--clip=CLIP] [--vae=VAE] [--tokenizer=TOKENIZER]
  to-official      a model checkpoint -> official safetensors + config.json (+ ema/)
                   --input=CKPT_DIR --output=DIR [--max_shard_size=5GB] [--clip=CLIP]
  llama            an HF Llama (TinyLlama-1.1B) -> a fresh MonoFormer checkpoint
                   --input=HF_DIR_OR_HUB_ID --output=CKPT_DIR [--config=...] [--seed=0]
                   [--mesh] [--clip=CLIP] [--vae=VAE] [--tokenizer=TOKENIZER]
  verify-official  a reference fixture through the converter: errors of every output
                   --fixture=DIR [--tolerance=1e-4]; exits 1 above the tolerance

Weights are read as safetensors or, where a folder has none, as PyTorch
.bin/.pt/.pth files (shards with pytorch_model.bin.index.json), without torch.
Weights may be named by their Hugging Face hub id (`ORG/NAME[@REVISION]`,
monoformer_jax/hub.py): downloaded once into the hub cache (HF_HOME), read
from it offline (HF_HUB_OFFLINE=1), gated ones with HF_TOKEN. `--vae` and
`--tokenizer` are checked against the model and recorded in the converted
config (vae.path, data.tokenizer), so `sample` and `evaluate` need neither:

  python -m monoformer_jax.convert official --input=MonoFormer/MonoFormer_ImageNet_256 \
      --output=/ckpt/mf256 --vae=stabilityai/sd-vae-ft-mse \
      --tokenizer=TinyLlama/TinyLlama-1.1B-Chat-v1.0

`--config` (default configs/imagenet256.py) is the base config; the model
fields come from the weights' config.json. `--mesh` builds every parameter
straight into its shards on the mesh of `config.mesh` / `config.sharding_rules`.

`--clip` (a model that reads images through CLIP, vision_encoder='clip') is
the Hugging Face CLIP folder of its frozen tower (config.json +
model.safetensors, e.g. openai/clip-vit-large-patch14): `official` takes the
tower's sizes from it (or from the base config's model.vision), `to-official`
copies the tower's last layer and post_layernorm from it (ours stops before
them) and writes it as vision_encoder_path, `llama` copies the whole tower:

  python -m monoformer_jax.convert llama --input=TinyLlama-1.1B --output=/ckpt/start \
      --config=configs/t2i_llava.py --clip=clip-vit-large-patch14
"""

import os
import sys

from absl import app, flags
from etils import epath
from ml_collections import config_flags

from monoformer_jax import cli, hub
from monoformer_jax.config.fields import real
from monoformer_jax.convert import official
from monoformer_jax.convert.llama import convert_llama
from monoformer_jax.convert.verify import report, verify_official
from monoformer_jax.errors import MissingPathError, PathError
from monoformer_jax.parallel.sharding import make_mesh
from monoformer_jax.paths import writable_dir
from monoformer_jax.safetensors_io import parse_size

COMMANDS = ("official", "to-official", "llama", "verify-official")

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Base config (default: configs/imagenet256.py).", lock_config=False
)
_INPUT = flags.DEFINE_string("input", None, "Weights or checkpoint to convert.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the result.")
_MESH = flags.DEFINE_bool("mesh", False, "Build the params sharded over config.mesh.")
_SEED = flags.DEFINE_integer("seed", 0, "llama: seed of the new parameters.")
_MAX_SHARD = flags.DEFINE_string(
  "max_shard_size", "5GB", "to-official: largest safetensors file, e.g. 5GB, 500MB."
)
_CLIP = flags.DEFINE_string(
  "clip",
  None,
  "official / to-official / llama, a model with vision_encoder='clip': the "
  "HF CLIP folder of its tower (e.g. openai/clip-vit-large-patch14); to-official writes "
  "it into config.json as vision_encoder_path.",
)
_VAE = flags.DEFINE_string(
  "vae",
  None,
  "official / llama: the SD-VAE the model samples with (a diffusers folder or a hub id, "
  "e.g. stabilityai/sd-vae-ft-mse), checked and recorded as the converted config's vae.path.",
)
_TOKENIZER = flags.DEFINE_string(
  "tokenizer",
  None,
  "official / llama: the model's tokenizer (tokenizer.model / tokenizer.json, a folder or "
  "hub id holding one, or 'bytes'), checked and recorded as the converted config's "
  "data.tokenizer; llama: default the --input's own when it holds one.",
)
_FIXTURE = flags.DEFINE_string("fixture", None, "verify-official: the fixture folder.")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-4, "verify-official: atol = rtol.")


def _require(*flag_holders):
  missing = [f"--{h.name}" for h in flag_holders if not h.value]
  if missing:
    raise app.UsageError(f"{sys.argv[1] if len(sys.argv) > 1 else ''} needs {', '.join(missing)}")


def _paths(kind: str | None = None):
  """--input (there; a hub id of `kind`, a key of hub.KINDS, downloaded) and
  --output (a new or empty folder), checked before any work."""
  _require(_INPUT, _OUTPUT)
  source = hub.local_path(_INPUT.value, "--input", kind) if kind else _INPUT.value
  if "://" not in source and not os.path.exists(source):
    raise MissingPathError(
      f"--input={source!r} does not exist"
      + ("; pass a folder, or a hub id (ORG/NAME)" if kind else "")
    )
  output = _OUTPUT.value
  out = epath.Path(output)  # on this machine or a bucket (gs://...)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise PathError(
      f"--output={output!r} already exists and is not an empty folder; "
      "pass a new --output (conversions never overwrite)"
    )
  writable_dir(output, "converted weights", "--output")
  return source, output


def _has_tokenizer(folder: str) -> bool:
  return any(epath.Path(folder, name).exists() for name in ("tokenizer.model", "tokenizer.json"))


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(
      f"usage: python -m monoformer_jax.convert {{{'|'.join(COMMANDS)}}} --flags (got {argv[1:]})"
    )
  command = argv[1]
  base = _CONFIG.value

  def mesh():
    if not _MESH.value:
      return None
    return make_mesh((base or official.default_config()).mesh)

  clip = hub.local_path(_CLIP.value, "--clip", "clip") if _CLIP.value else None
  if command not in ("official", "llama"):
    given = [f"--{f.name}" for f in (_VAE, _TOKENIZER) if f.value]
    if given:
      raise app.UsageError(f"{command} takes no {', '.join(given)} (official and llama do)")
  assets = dict(tokenizer=_TOKENIZER.value, vae=_VAE.value)
  if command == "official":
    official.convert_official(*_paths("official"), base, mesh=mesh(), clip=clip, **assets)
  elif command == "to-official":
    max_shard_bytes = parse_size(_MAX_SHARD.value)
    clip_name = _CLIP.value if hub.is_hub_id(_CLIP.value) else None  # not the cache's path
    official.convert_to_official(
      *_paths(), max_shard_bytes=max_shard_bytes, clip=clip, clip_name=clip_name
    )
  elif command == "llama":
    source, output = _paths("llama")
    if not assets["tokenizer"] and not (base and base.data.tokenizer) and _has_tokenizer(source):
      assets["tokenizer"] = _INPUT.value  # the Llama's own, recorded as --input names it
    convert_llama(source, output, base, seed=_SEED.value, mesh=mesh(), clip=clip, **assets)
  else:
    _require(_FIXTURE)
    real("--tolerance", _TOLERANCE.value, low=0, low_open=True)
    results = verify_official(_FIXTURE.value, _TOLERANCE.value, base)
    print(report(results, _TOLERANCE.value))
    if not all(r.ok for r in results):
      sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
