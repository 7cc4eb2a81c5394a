"""monoformer_jax: MonoFormer (one transformer for autoregressive text and
diffusion images) in JAX/Flax NNX, for TPU pods, GPU clusters and laptops."""

__version__ = "0.1.0"
