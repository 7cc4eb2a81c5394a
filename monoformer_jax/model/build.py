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
      abstract, axes, is_leaf=lambda x: isinstance(x, tuple))


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
