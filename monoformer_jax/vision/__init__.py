"""Image understanding's encoder: the frozen CLIP ViT tower MonoFormer reads images with.

    params, vcfg = load_clip_params("path/to/clip-vit-large-patch14")  # HF folder
    tower = tower_from_params(params, vcfg)
    size, crop, mean, std = load_preprocessing("path/to/clip-vit-large-patch14")
    pixels = preprocess(images, vcfg, mean, std, size=size, crop=crop)  # [B, S, S, 3]
    features = tower(pixels)          # [B, P, E]: hidden_states[-2][:, 1:]

`vcfg` (config.model.vision) has the fields hidden_size, mlp_dim, num_layers,
num_heads, image_size, patch_size, num_channels, layer_norm_eps, hidden_act;
`clip_config_from_hf` makes it from an HF config.json.
"""

from monoformer_jax.vision.clip import (CLIPVisionTower, clip_config_from_hf,
                                        clip_params_from_tensors, feature_dim,
                                        load_clip_params, load_preprocessing, preprocess,
                                        preprocess_file, read_clip_config, tokens_of,
                                        tower_from_params)

__all__ = ["CLIPVisionTower", "clip_config_from_hf", "clip_params_from_tensors",
           "feature_dim", "load_clip_params", "load_preprocessing", "preprocess",
           "preprocess_file", "read_clip_config", "tokens_of", "tower_from_params"]
