"""Flax NNX modules: the Llama decoder and MonoFormer around it."""

from monoformer_jax.model.monoformer import MonoFormer

__all__ = ["MonoFormer"]
