r"""Weights in and out: `python -m monoformer_jax.convert COMMAND --flags`.

  official         official MonoFormer safetensors (+ ema/) -> a model checkpoint
                   --input=DIR_OR_SAFETENSORS --output=CKPT_DIR [--config=...] [--mesh]
                   [--clip=CLIP_DIR]
  to-official      a model checkpoint -> official safetensors + config.json (+ ema/)
                   --input=CKPT_DIR --output=DIR [--max_shard_size=5GB] [--clip=CLIP_DIR]
  llama            an HF Llama (TinyLlama-1.1B) -> a fresh MonoFormer checkpoint
                   --input=HF_DIR --output=CKPT_DIR [--config=...] [--seed=0] [--mesh]
                   [--clip=CLIP_DIR]
  verify-official  a reference fixture through the converter: errors of every output
                   --fixture=DIR [--tolerance=1e-4]; exits 1 above the tolerance

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

from monoformer_jax import cli
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
_FIXTURE = flags.DEFINE_string("fixture", None, "verify-official: the fixture folder.")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-4, "verify-official: atol = rtol.")


def _require(*flag_holders):
  missing = [f"--{h.name}" for h in flag_holders if not h.value]
  if missing:
    raise app.UsageError(f"{sys.argv[1] if len(sys.argv) > 1 else ''} needs {', '.join(missing)}")


def _paths():
  """--input (there) and --output (a new or empty folder), checked before any work."""
  _require(_INPUT, _OUTPUT)
  if "://" not in _INPUT.value and not os.path.exists(_INPUT.value):
    raise MissingPathError(f"--input={_INPUT.value!r} does not exist")
  output = _OUTPUT.value
  out = epath.Path(output)  # on this machine or a bucket (gs://...)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise PathError(
      f"--output={output!r} already exists and is not an empty folder; "
      "pass a new --output (conversions never overwrite)"
    )
  writable_dir(output, "converted weights", "--output")
  return _INPUT.value, output


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

  if command == "official":
    official.convert_official(*_paths(), base, mesh=mesh(), clip=_CLIP.value)
  elif command == "to-official":
    max_shard_bytes = parse_size(_MAX_SHARD.value)
    official.convert_to_official(*_paths(), max_shard_bytes=max_shard_bytes, clip=_CLIP.value)
  elif command == "llama":
    convert_llama(*_paths(), base, seed=_SEED.value, mesh=mesh(), clip=_CLIP.value)
  else:
    _require(_FIXTURE)
    real("--tolerance", _TOLERANCE.value, low=0, low_open=True)
    results = verify_official(_FIXTURE.value, _TOLERANCE.value, base)
    print(report(results, _TOLERANCE.value))
    if not all(r.ok for r in results):
      sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
