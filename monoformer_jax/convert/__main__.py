r"""Weights in and out: `python -m monoformer_jax.convert COMMAND --flags`.

  official         official MonoFormer safetensors (+ ema/) -> a model checkpoint
                   --input=DIR_OR_SAFETENSORS --output=CKPT_DIR [--config=...] [--mesh]
  to-official      a model checkpoint -> official safetensors + config.json (+ ema/)
                   --input=CKPT_DIR --output=DIR [--max_shard_size=5GB]
  llama            an HF Llama (TinyLlama-1.1B) -> a fresh MonoFormer checkpoint
                   --input=HF_DIR --output=CKPT_DIR [--config=...] [--seed=0] [--mesh]
  verify-official  a reference fixture through the converter: errors of every output
                   --fixture=DIR [--tolerance=1e-4]; exits 1 above the tolerance

`--config` (default configs/imagenet256.py) is the base config; the model
fields come from the weights' config.json. `--mesh` builds every parameter
straight into its shards on the mesh of `config.mesh` / `config.sharding_rules`.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from monoformer_jax.checkpoints import quiet_orbax_logs
from monoformer_jax.checkpoints.safetensors_io import parse_size
from monoformer_jax.convert import official
from monoformer_jax.convert.llama import convert_llama
from monoformer_jax.convert.verify import report, verify_official
from monoformer_jax.parallel.sharding import make_mesh

COMMANDS = ("official", "to-official", "llama", "verify-official")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Base config (default: configs/imagenet256.py).", lock_config=False)
_INPUT = flags.DEFINE_string("input", None, "Weights or checkpoint to convert.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the result.")
_MESH = flags.DEFINE_bool("mesh", False, "Build the params sharded over config.mesh.")
_SEED = flags.DEFINE_integer("seed", 0, "llama: seed of the new parameters.")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "5GB",
                                 "to-official: largest safetensors file, e.g. 5GB, 500MB.")
_FIXTURE = flags.DEFINE_string("fixture", None, "verify-official: the fixture folder.")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-4, "verify-official: atol = rtol.")


def _require(*flag_holders):
  missing = [f"--{h.name}" for h in flag_holders if not h.value]
  if missing:
    raise app.UsageError(f"{sys.argv[1] if len(sys.argv) > 1 else ''} needs {', '.join(missing)}")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m monoformer_jax.convert {{{'|'.join(COMMANDS)}}} "
                         f"--flags (got {argv[1:]})")
  command = argv[1]
  logging.set_verbosity(logging.INFO)
  quiet_orbax_logs()
  base = _CONFIG.value

  def mesh():
    if not _MESH.value:
      return None
    return make_mesh((base or official.default_config()).mesh)

  if command == "official":
    _require(_INPUT, _OUTPUT)
    official.convert_official(_INPUT.value, _OUTPUT.value, base, mesh=mesh())
  elif command == "to-official":
    _require(_INPUT, _OUTPUT)
    official.convert_to_official(_INPUT.value, _OUTPUT.value,
                                 max_shard_bytes=parse_size(_MAX_SHARD.value))
  elif command == "llama":
    _require(_INPUT, _OUTPUT)
    convert_llama(_INPUT.value, _OUTPUT.value, base, seed=_SEED.value, mesh=mesh())
  else:
    _require(_FIXTURE)
    results = verify_official(_FIXTURE.value, _TOLERANCE.value, base)
    print(report(results, _TOLERANCE.value))
    if not all(r.ok for r in results):
      sys.exit(1)


if __name__ == "__main__":
  app.run(main)
