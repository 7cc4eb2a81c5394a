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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from monoformer_jax.model.build import abstract_model, init_params, shardings_of
from monoformer_jax.train.schedule import lr_schedule

# Top-level modules that are never trained: the frozen CLIP tower (the reference's).
FROZEN = ("vision_tower",)


def make_optimizer(
  optim_cfg, model_cfg=None, num_steps: int | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Grad-norm clipping then AdamW at the rate of `optim.schedule`
  (train/schedule.py) over a run of `num_steps` updates (train.num_steps; only
  `constant` does without it).
  A model with a frozen module (FROZEN) gets no update there and keeps no
  AdamW moments for it."""
  if num_steps is None and optim_cfg.schedule != "constant":
    raise ValueError(f"optim.schedule={optim_cfg.schedule!r} depends on train.num_steps: pass it")
  schedule = lr_schedule(optim_cfg, num_steps or 0)
  adamw = optax.adamw(
    schedule,
    b1=optim_cfg.b1,
    b2=optim_cfg.b2,
    eps=optim_cfg.eps,
    weight_decay=optim_cfg.weight_decay,
  )
  if model_cfg is not None and model_cfg.vision_encoder == "clip":
    labels = lambda params: {k: "frozen" if k in FROZEN else "trained" for k in params}
    adamw = optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()}, labels)
  tx = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw)
  return tx, schedule


def state_shardings(config, mesh, tx):
  """(graphdef, abstract state, NamedShardings of the state) for this mesh."""
  graphdef, abs_params, axes = abstract_model(config.model)
  param_sh = shardings_of(abs_params, axes, config.sharding_rules, mesh)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  replicated = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(
    tx, lambda _, s: s, abs_opt, param_sh, transform_non_params=lambda _: replicated
  )
  shardings = dict(step=replicated, params=param_sh, opt_state=opt_sh, ema=param_sh)
  abstract = dict(
    step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params, opt_state=abs_opt, ema=abs_params
  )
  return graphdef, abstract, shardings


def _first_state(params, tx):
  """Step 0 from `params`: EMA = params, a fresh optimizer state."""
  # A copy, so that params and ema are distinct buffers (the step donates both).
  return dict(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    ema=jax.tree.map(jnp.copy, params),
  )


def create_train_state(config, mesh, tx):
  """(graphdef, state, shardings): the state initialised straight into its shards."""
  graphdef, _, shardings = state_shardings(config, mesh, tx)
  state = jax.jit(
    lambda: _first_state(init_params(config.model, config.seed), tx), out_shardings=shardings
  )()
  return graphdef, state, shardings


def state_from_params(params, tx, shardings):
  """Step 0 of a run started from `params` (e.g. a converted model), in `shardings`."""
  return jax.jit(lambda params: _first_state(params, tx), out_shardings=shardings)(params)
