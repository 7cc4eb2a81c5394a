"""Configs the tests share: the repository's config files, and a tiny digits run."""

from monoformer_jax.configs import config_file


def digits_config(**train):
  """The digits default shrunk for tests: 2 layers, 8 rows of 64 tokens, FSDP
  over the 8 simulated devices; `train` overrides config.train fields."""
  c = config_file("digits")
  c.model.num_layers = 2
  c.data.batch_size = 8
  c.data.seq_len = 64
  c.data.max_images_per_row = 1
  c.optim.warmup_steps = 0
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.train.update(dict(dict(log_every=1, checkpoint_every=10, keep_checkpoints=3), **train))
  return c


# The same shrinking as command-line flags, for runs in a subprocess.
DIGITS_FLAGS = [f"--config.{k}={v}" for k, v in (
    ("model.num_layers", 2), ("data.batch_size", 8), ("data.seq_len", 64),
    ("data.max_images_per_row", 1), ("optim.warmup_steps", 0), ("mesh.data", 1),
    ("mesh.fsdp", -1), ("train.log_every", 1))]
