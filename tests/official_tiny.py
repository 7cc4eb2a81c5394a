"""Loads ../shared/fixtures/official_tiny into our model (a test-only key map).

The full converter (streaming, sharded, both directions) is its own issue; this
is the smallest mapping that lets the tests compare numbers with the reference.
"""

import json

import ml_collections
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from monoformer_jax.model import MonoFormer


def tiny_config(fixture_dir):
  hf = json.loads((fixture_dir / "config.json").read_text())
  return ml_collections.ConfigDict(dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
      num_kv_heads=hf["num_key_value_heads"],
      head_dim=hf["hidden_size"] // hf["num_attention_heads"],
      mlp_dim=hf["intermediate_size"], rms_norm_eps=hf["rms_norm_eps"],
      rope_theta=hf["rope_theta"], image_size=hf["image_size"] // 8,
      in_channels=hf["in_channels"], patch_size=hf["patch_size"],
      learn_sigma=hf["learn_sigma"], timestep_freq_dim=256,
      conditioning=hf["decoder_t_embed"], attention_impl="xla",
      dtype="float32", remat=False))


def official_to_ours(w, cfg):
  """Our parameter arrays, keyed by state path, from the official state dict."""
  e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  layers = range(cfg.num_layers)
  stack = lambda fmt, f: np.stack([f(w[fmt.format(i)]) for i in layers])
  pre = "model.layers.{}."
  return {
      ("embed_tokens",): w["model.embed_tokens.weight"],
      ("lm_head",): w["lm_head.weight"].T,
      ("decoder", "norm", "scale"): w["model.norm.weight"],
      ("decoder", "layers", "input_norm", "scale"):
          stack(pre + "input_layernorm.weight", lambda x: x),
      ("decoder", "layers", "post_attention_norm", "scale"):
          stack(pre + "post_attention_layernorm.weight", lambda x: x),
      ("decoder", "layers", "attn", "wq"):
          stack(pre + "self_attn.q_proj.weight", lambda x: x.T.reshape(e, h, d)),
      ("decoder", "layers", "attn", "wk"):
          stack(pre + "self_attn.k_proj.weight", lambda x: x.T.reshape(e, k, d)),
      ("decoder", "layers", "attn", "wv"):
          stack(pre + "self_attn.v_proj.weight", lambda x: x.T.reshape(e, k, d)),
      ("decoder", "layers", "attn", "wo"):
          stack(pre + "self_attn.o_proj.weight", lambda x: x.T.reshape(h, d, e)),
      ("decoder", "layers", "mlp", "w_gate"): stack(pre + "mlp.gate_proj.weight", np.transpose),
      ("decoder", "layers", "mlp", "w_up"): stack(pre + "mlp.up_proj.weight", np.transpose),
      ("decoder", "layers", "mlp", "w_down"): stack(pre + "mlp.down_proj.weight", np.transpose),
      ("x_embedder", "kernel"): w["x_embedder.weight"].T,
      ("x_embedder", "bias"): w["x_embedder.bias"],
      ("t_embedder", "fc1", "kernel"): w["t_embedder.mlp.0.weight"].T,
      ("t_embedder", "fc1", "bias"): w["t_embedder.mlp.0.bias"],
      ("t_embedder", "fc2", "kernel"): w["t_embedder.mlp.2.weight"].T,
      ("t_embedder", "fc2", "bias"): w["t_embedder.mlp.2.bias"],
      ("adaln_module", "kernel"): w["adaLN_module.1.weight"].T,
      ("adaln_module", "bias"): w["adaLN_module.1.bias"],
      ("final_layer", "adaln", "kernel"): w["final_layer.adaLN_modulation.1.weight"].T,
      ("final_layer", "adaln", "bias"): w["final_layer.adaLN_modulation.1.bias"],
      ("final_layer", "linear", "kernel"): w["final_layer.linear.weight"].T,
      ("final_layer", "linear", "bias"): w["final_layer.linear.bias"],
  }


def load_official_tiny(fixture_dir):
  """(model, cfg) with the fixture's weights; every parameter must be covered."""
  cfg = tiny_config(fixture_dir)
  model = MonoFormer(cfg, rngs=nnx.Rngs(0))
  ours = official_to_ours(load_file(str(fixture_dir / "weights.safetensors")), cfg)
  state = nnx.state(model, nnx.Param)
  paths = {tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(state)}
  assert paths == set(ours), (paths ^ set(ours))
  for path, value in ours.items():
    var = state
    for p in path:
      var = var[p]
    assert var.shape == value.shape, (path, var.shape, value.shape)
    var.set_value(np.asarray(value, np.float32))
  nnx.update(model, state)
  return model, cfg
