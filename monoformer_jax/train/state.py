"""Train state, the optimizer, and sharded initialisation.

The state is a plain dict pytree (what Orbax saves and restores):
    step      int32 scalar
    params    nested dict of float32 arrays (nnx pure dict of the Params)
    opt_state optax state (AdamW moments mirror params)
    ema       exponential moving average of params
The model's structure (nnx GraphDef) is static and lives outside the state.
Every array is created directly in its shards: init runs under `jax.jit` with
the state's `out_shardings`, so no host ever holds the full model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from monoformer_jax.model import MonoFormer
from monoformer_jax.model.llama import logical_axes_of
from monoformer_jax.parallel.sharding import logical_to_spec


def make_optimizer(optim_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Grad-norm clipping then AdamW; constant lr after an optional linear warmup."""
  if optim_cfg.warmup_steps > 0:
    schedule = optax.linear_schedule(0.0, optim_cfg.lr, optim_cfg.warmup_steps)
    schedule = optax.join_schedules(
        [schedule, optax.constant_schedule(optim_cfg.lr)], [optim_cfg.warmup_steps])
  else:
    schedule = optax.constant_schedule(optim_cfg.lr)
  tx = optax.chain(
      optax.clip_by_global_norm(optim_cfg.grad_clip),
      optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                  weight_decay=optim_cfg.weight_decay))
  return tx, schedule


def abstract_model(model_cfg):
  """(graphdef, abstract params pure dict, logical axes pure dict), no allocation."""
  model = nnx.eval_shape(lambda: MonoFormer(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  axes = jax.tree.map(logical_axes_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(axes)


def init_params(model_cfg, seed: int):
  """Freshly initialised params (pure dict); call under jit for sharded init."""
  return nnx.to_pure_dict(nnx.state(MonoFormer(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param))


def _named_shardings(abs_params, axes, config, mesh):
  return jax.tree.map(
      lambda a, ax: NamedSharding(mesh, logical_to_spec(ax, config.sharding_rules,
                                                        a.shape, mesh)),
      abs_params, axes, is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(config, mesh):
  """NamedShardings of the params (pure dict) under the config's rules."""
  _, abs_params, axes = abstract_model(config.model)
  return _named_shardings(abs_params, axes, config, mesh)


def state_shardings(config, mesh, tx):
  """(graphdef, abstract state, NamedShardings of the state) for this mesh."""
  graphdef, abs_params, axes = abstract_model(config.model)
  param_sh = _named_shardings(abs_params, axes, config, mesh)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  replicated = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, param_sh,
                                 transform_non_params=lambda _: replicated)
  shardings = dict(step=replicated, params=param_sh, opt_state=opt_sh, ema=param_sh)
  abstract = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params,
                  opt_state=abs_opt, ema=abs_params)
  return graphdef, abstract, shardings


def create_train_state(config, mesh, tx):
  """(graphdef, state, shardings): the state initialised straight into its shards."""
  graphdef, abstract, shardings = state_shardings(config, mesh, tx)

  def init():
    params = init_params(config.model, config.seed)
    return dict(step=jnp.zeros((), jnp.int32), params=params,
                opt_state=tx.init(params), ema=params)

  state = jax.jit(init, out_shardings=shardings)()
  return graphdef, state, shardings


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
