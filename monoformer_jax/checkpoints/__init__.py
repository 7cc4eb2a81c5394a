"""The project's own checkpoints (Orbax), in orbax_io.py: training checkpoints
(TrainCheckpointer) and model checkpoints (save_model, load_model, model_on_mesh, load_params,
load_config), and the fingerprint of a save. Other people's weights files are monoformer_jax/safetensors_io.py's.
"""

from monoformer_jax.checkpoints.orbax_io import (
  TrainCheckpointer,
  beside,
  check_params,
  fingerprint,
  load_config,
  load_model,
  load_params,
  model_differences,
  model_on_mesh,
  nonfinite_params,
  resolve,
  resolve_steps,
  save_model,
  stored_weights,
)

__all__ = [
  "TrainCheckpointer",
  "beside",
  "check_params",
  "fingerprint",
  "load_config",
  "load_model",
  "load_params",
  "model_differences",
  "model_on_mesh",
  "nonfinite_params",
  "resolve",
  "resolve_steps",
  "save_model",
  "stored_weights",
]
