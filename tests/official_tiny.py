"""Loads tests/fixtures/official_tiny into our model through the converter.

The key map lives in monoformer_jax/convert/official.py only; the tests get
the fixture's model in float32 with XLA attention (verify.fixture_config).
"""

from monoformer_jax.convert import official, verify


def load_official_tiny(fixture_dir):
  """(model, model config) with the fixture's weights."""
  model, config = official.load_official_model(str(fixture_dir), verify.fixture_config())
  return model, config.model
