"""Configs the tests share: the repository's config files and their test-size variant."""

from monoformer_jax.configs import CONFIGS_DIR, config_file

# `python -m monoformer_jax.train` on the test-size model, for runs in a subprocess.
TINY_CONFIG_FLAG = f"--config={CONFIGS_DIR / 'digits.py'}:tiny"


def digits_config(**train):
  """configs/digits.py:tiny (2 layers, 8 rows of 64 tokens, FSDP over the 8
  simulated devices); `train` overrides config.train fields."""
  c = config_file("digits:tiny")
  c.train.update(train)
  return c
