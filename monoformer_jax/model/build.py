"""The model as data: its abstract structure, initial parameters and their
shardings, and compiled calls of it.

Parameters travel as nnx pure dicts (nested dicts of arrays: what Orbax saves
and the converters build); the structure (the nnx GraphDef) is static and is
recovered from the model config without allocating anything.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from flax import nnx
from jax.sharding import NamedSharding

from monoformer_jax.model.layers import logical_axes_of
from monoformer_jax.model.monoformer import MonoFormer
from monoformer_jax.parallel.sharding import logical_to_spec


def abstract_model(model_cfg):
  """(graphdef, abstract params pure dict, logical axes pure dict), no allocation."""
  model = nnx.eval_shape(lambda: MonoFormer(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  axes = jax.tree.map(logical_axes_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(axes)


def init_params(model_cfg, seed: int):
  """Freshly initialised params (pure dict); call under jit for sharded init."""
  return nnx.to_pure_dict(nnx.state(MonoFormer(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param))


def shardings_of(abstract, axes, rules, mesh):
  """NamedShardings of a pure dict of arrays whose logical axes are `axes`."""
  return jax.tree.map(
    lambda a, ax: NamedSharding(mesh, logical_to_spec(ax, rules, a.shape, mesh)),
    abstract,
    axes,
    is_leaf=lambda x: isinstance(x, tuple),
  )


def param_shardings(config, mesh):
  """NamedShardings of the params (pure dict) under the config's rules."""
  _, abstract, axes = abstract_model(config.model)
  return shardings_of(abstract, axes, config.sharding_rules, mesh)


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def compiled(fn: Callable) -> Callable:
  """`fn(model, static, *arrays)` as a compiled call with the same signature.

  The model's structure (its graphdef) and `static` (hashable settings) are
  static arguments and its parameters and `arrays` are traced, so calls with
  the same model structure, settings and shapes reuse one program whatever the
  weights. What the samplers run. `call.bind(model)` splits the model once and
  returns `(static, *arrays) -> result`, for a loop that calls it every step.
  """

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def run(graphdef, static, state, *arrays):
    return fn(nnx.merge(graphdef, state), static, *arrays)

  def bind(model):
    graphdef, state = nnx.split(model)
    return lambda static, *arrays: run(graphdef, static, state, *arrays)

  @functools.wraps(fn)
  def call(model, static, *arrays):
    return bind(model)(static, *arrays)

  call.bind = bind
  return call


# Not matmuls per token: the embedding is a lookup, the timestep MLP, the adaLN
# projections and t_projector run once per image (0.3% of the 1.1B step), and
# the reading side (im_embedder, the frozen CLIP tower) only on read images' tokens;
# none of them is counted (MFU is the decoder's and its heads').
PER_ROW = (
  "embed_tokens",
  "t_embedder",
  "adaln_module",
  "final_layer/adaln",
  "t_projector",
  "im_embedder",
  "vision_tower",
)


def train_flops_counter(model_config) -> Callable[[float, float], float]:
  """`flops(tokens, attended)`: model FLOPs of the train step (forward +
  backward) over `tokens` tokens whose examples hold `attended` query-key
  pairs (the sum over examples of their length squared), counted as MFU usually
  is (PaLM's appendix B, MaxText): 6 FLOPs per weight per token for the matmuls
  (forward 2, backward 4; the token embedding is a lookup) plus 12 * layers *
  heads * head_dim per pair for the attention's scores and values. Only
  matrices applied to every token count (norm scales and biases are
  elementwise; PER_ROW lists the rest); rematerialisation is not counted: MFU
  measures the model's FLOPs. Counting only the non-padding tokens and the
  pairs inside each example gives the useful work of a packed batch
  (layout.useful_work); a whole row of L columns is L tokens and L^2 pairs
  (`train_flops_per_row`).

  XLA's own count (`compiled.cost_analysis()["flops"]`) is no substitute: it
  counts a scan's body once, and the layers are scanned. For a model of one
  layer the two agree (tests/test_perf.py), which checks this count."""
  _, abstract, _ = abstract_model(model_config)
  weights = sum(
    x.size
    for path, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
    if x.ndim >= 2 and not any("/".join(str(k.key) for k in path).startswith(p) for p in PER_ROW)
  )
  per_pair = 12 * model_config.num_layers * model_config.num_heads * model_config.head_dim

  def flops(tokens: float, attended: float) -> float:
    return float(6 * weights * tokens + per_pair * attended)

  return flops


def train_flops_per_row(model_config, seq_len: int) -> float:
  """Model FLOPs of one whole `seq_len`-column row, padding included: every
  column a token attending over the whole row, as the kernels compute it
  (`train_flops_counter`)."""
  return train_flops_counter(model_config)(seq_len, seq_len**2)
