"""Weights and states on disk.

    orbax_io.py        the project's own format (Orbax): training checkpoints
                       (TrainCheckpointer) and model checkpoints (save_model,
                       load_model, load_params, load_config)
    safetensors_io.py  other people's weights (official MonoFormer, HF Llama,
                       diffusers VAE): streamed, sliced reading and sharded writing
"""

from monoformer_jax.checkpoints.orbax_io import (TrainCheckpointer, beside, check_params,
                                                 load_config,
                                                 load_model, load_params, model_differences,
                                                 nonfinite_params, resolve, save_model,
                                                 stored_weights)

__all__ = ["TrainCheckpointer", "beside", "check_params", "load_config", "load_model", "load_params",
           "model_differences", "nonfinite_params", "resolve", "save_model", "stored_weights"]
