"""monoformer_jax: MonoFormer (one transformer for autoregressive text and
diffusion images) in JAX/Flax NNX, for TPU pods, GPU clusters and laptops.

Shape letters. Arrays are named with their shapes (`x_BxLxE`, `latents_BxMxhxwxC`),
and each letter means one thing everywhere in the package:

    B   rows of a batch (or images of a flat batch of images)
    L   tokens of a row; Lq the queries of one call (Lq <= L), Lp a prompt's columns
    E   hidden width (model.hidden_size)
    H   query heads, K key/value heads, G = H / K query heads per kv head
    D   head dim
    F   MLP width (model.mlp_dim)
    V   vocabulary
    N   decoder layers
    M   image slots of a row
    P   tokens (patches) of one image, (image_size / patch_size)^2
    Z   features of one patch token (C * p * p in, p * p * 2C out; p the patch size)
    h, w, C   height, width and channels of an image or latent (lowercase h, w:
              H is heads)
    T   diffusion timesteps of a schedule
    I, J    query blocks and key blocks of the attention kernels

A product of two letters is written together (`img_BMxPxE`: B*M images of P
tokens); `x2C` is twice C.
"""

__version__ = "0.1.0"
