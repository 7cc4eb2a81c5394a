r"""Plan a TPU job from any host: the real train step compiled for a slice you do not have.

    python -m monoformer_jax.compile --config=configs/imagenet256.py --topology=v5p-32
    python -m monoformer_jax.compile --config=configs/imagenet256.py:7b --topology=v5p-128 \
        --config.mesh.tensor=4 --output=/tmp/plan.json
    python -m monoformer_jax.compile --config=configs/imagenet256.py --topology=v5p-32 \
        --num_slices=2 --config.mesh.dcn_data=2

Needs libtpu (`pip install -e ".[tpu]"`), not a TPU. The step is lowered from
abstract inputs for the topology's compile-only devices and compiled by the
TPU compiler, Pallas (Mosaic) attention kernels included; nothing runs and no
data is read. Prints memory per chip against its HBM, the step's model FLOPs,
an estimated step time and MFU (monoformer_jax/train/aot.py says how each is
made); `--output` writes the same figures as JSON (a local file, or one on a
bucket: `--output=gs://bucket/plans/v5p-32.json`, written in one upload). A step that does not fit
stops with the compiler's out-of-memory message and the settings to change.
`--topology` takes Cloud TPU names (v4-8, v5p-32, v5e-16, v6e-8, ...) or a
torus (v5p:2x2x4). GPUs: `h100-N` (8 per host) works with JAX's CUDA plugin
installed (`pip install jax-cuda12-plugin==<jax version>`, no CUDA libraries
needed; see parallel/topology.py) and gives the memory, not a cost estimate;
for other GPUs compile on a GPU host.
"""

import os

# A plan needs no accelerator of this host's (and must not claim a TPU that a
# training job on this VM is using): the CPU backend, unless told otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The imports below come after it: jax reads JAX_PLATFORMS when it is imported.
# ruff: noqa: E402
import monoformer_jax

monoformer_jax.import_jax_without_cuda_noise()  # the package did not: JAX_PLATFORMS was unset

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from monoformer_jax import cli
from monoformer_jax.errors import PathError
from monoformer_jax.eval import finite_json
from monoformer_jax.parallel.topology import topology_of
from monoformer_jax.paths import is_local, writable_dir
from monoformer_jax.train.aot import plan

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
  "topology",
  None,
  "TPU slice: v4-8, v5p-32, v5e-16, v6e-8, ... or v5p:2x2x4; h100-N with JAX's CUDA plugin.",
)
_NUM_SLICES = flags.DEFINE_integer(
  "num_slices",
  1,
  "Slices joined by DCN (multi-slice); set --config.mesh.dcn_data to the same number.",
)
_OUTPUT = flags.DEFINE_string("output", None, "Write the figures to this JSON file.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  topology = topology_of(_TOPOLOGY.value, _NUM_SLICES.value)
  if _OUTPUT.value:  # checked before minutes of compiling
    _check_output(_OUTPUT.value)
  logging.info("compiling the train step for %s ...", topology)
  result, _ = plan(_CONFIG.value, topology)
  print(result.report(), flush=True)
  if _OUTPUT.value:
    epath.Path(_OUTPUT.value).write_text(finite_json(result.as_json()) + "\n")


def _check_output(path: str) -> None:
  """--output names a file that can be written: a local one in a writable folder,
  or one on a bucket that exists and where no folder has that name."""
  if is_local(path):
    writable_dir(os.path.dirname(os.path.abspath(path)), "the --output file", "--output")
    return
  out = epath.Path(path)
  scheme, rest = path.split("://", 1)
  root = epath.Path(f"{scheme}://{rest.split('/', 1)[0]}")
  if not root.exists():
    raise PathError(
      f"--output={path!r}: the bucket {str(root)!r} does not exist (or these credentials "
      "cannot see it); create it or pass another --output"
    )
  if out.is_dir():
    raise PathError(f"--output={path!r} is a folder; pass the path of a file for the figures")


if __name__ == "__main__":
  cli.run(main)
