r"""Train a MonoFormer: `python -m monoformer_jax.train --config=configs/digits.py --workdir=DIR`.

Run the same command on every host of a pod (JAX multi-controller): launch/
has the scripts (a TPU pod slice, SLURM, N processes on this machine). A
process of a multi-host run joins the others first (`--jax_distributed`, or
the environment: monoformer_jax/parallel/distributed.py).
Config fields are overridden as `--config.train.num_steps=100`. A bad field or
path stops at once with one line naming it and the fix (`--verbose`: with the
traceback); a run whose loss stops being finite stops with a diagnosis and
keeps its last good checkpoint.

Exit status: 0 when the run is done; 75 when a preemption (SIGTERM) stopped it
after saving, so that rerunning resumes it (the launchers' supervisors restart
on it); 2 for a bad config or a diverged run, which a rerun would repeat.
"""

from absl import app, flags
from ml_collections import config_flags

from monoformer_jax import cli
from monoformer_jax.parallel import distributed
from monoformer_jax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if train_and_evaluate(_CONFIG.value, _WORKDIR.value).preempted:
    raise SystemExit(distributed.RESUMABLE)


if __name__ == "__main__":
  cli.run(main)
