"""Flax NNX modules: the Llama decoder and MonoFormer around it; the model as data."""

from monoformer_jax.model.build import (
  abstract_model,
  compiled,
  init_params,
  param_count,
  param_shardings,
  shardings_of,
)
from monoformer_jax.model.monoformer import MonoFormer

__all__ = [
  "MonoFormer",
  "abstract_model",
  "compiled",
  "init_params",
  "param_count",
  "param_shardings",
  "shardings_of",
]
