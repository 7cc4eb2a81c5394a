"""The jitted, sharded train step: loss, gradients, AdamW, EMA.

`make_train_step` returns `step(state, batch, health) -> (state, metrics,
health)` compiled with `jax.jit(in_shardings, out_shardings, donate_argnums=0)`
(what pjit became).
Randomness (timesteps, noise) is `fold_in(PRNGKey(seed), step)`, so a resumed
run draws exactly what an uninterrupted one would. With
`optim.grad_accum_steps = A` the batch is cut into A micro-batches scanned in
sequence and their gradients averaged before one update.

The step also watches its own numbers, without a host sync: `health` (see
`healthy()`) records the first step whose loss terms or gradient norm are not
finite, and from then on the step returns the state unchanged, so the state
on the devices is always the last good one. The loop reads `health` only when
it logs or saves (both sync anyway) and stops with the diagnosis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from monoformer_jax.train.loss import total_loss


def make_loss_fn(graphdef, diffusion, config):
  def loss_fn(params, batch, key):
    # Params stay float32 masters; the model casts them to config.model.dtype at use.
    model = nnx.merge(graphdef, params)
    return total_loss(model, batch, key, diffusion, config.loss)

  return loss_fn


def accumulated_grads(loss_fn, accum: int):
  """grads_of(params, batch, key) -> (grads, metrics), averaged over `accum`
  micro-batches (micro-batch i draws its randomness from fold_in(key, i))."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def grads_of(params, batch, key):
    if accum == 1:
      (_, metrics), grads = grad_fn(params, batch, key)
      return grads, metrics
    rows = batch["tokens"].shape[0]
    if rows % accum:
      raise ValueError(f"data.batch_size={rows} is not divisible by optim.grad_accum_steps={accum}")
    micro = jax.tree.map(lambda x: x.reshape(accum, rows // accum, *x.shape[1:]), batch)

    def body(acc, inputs):
      i, mb = inputs
      (_, metrics), grads = grad_fn(params, mb, jax.random.fold_in(key, i))
      return jax.tree.map(jnp.add, acc, (grads, metrics)), None

    first = jax.tree.map(lambda x: x[0], micro)
    metrics_shape = jax.eval_shape(lambda: grad_fn(params, first, key)[0][1])
    zeros = (
      jax.tree.map(jnp.zeros_like, params),
      jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape),
    )
    (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    return jax.tree.map(lambda g: g / accum, (grads, metrics))

  return grads_of


# What the step watches, in the order of `health["terms"]`.
WATCHED = ("mse", "vb", "lm", "loss", "grad_norm")


def healthy():
  """The health record of a run with no bad step yet: `bad_step` -1, then the
  first step whose WATCHED metrics are not all finite, their finiteness
  (`terms`, bool) and values (`values`) at that step."""
  return dict(
    bad_step=jnp.full((), -1, jnp.int32),
    terms=jnp.zeros(len(WATCHED), bool),
    values=jnp.zeros(len(WATCHED), jnp.float32),
  )


def make_train_step(graphdef, diffusion, config, tx, schedule, shardings, batch_sharding):
  """`step(state, batch, health) -> (state, metrics, health)`, jitted and sharded;
  `state` is donated."""
  grads_of = accumulated_grads(
    make_loss_fn(graphdef, diffusion, config), config.optim.grad_accum_steps
  )
  ema_decay = config.optim.ema_decay
  nan_step = config.train.debug_nan_step
  base_key = jax.random.PRNGKey(config.seed)

  def step(state, batch, health):
    key = jax.random.fold_in(base_key, state["step"])
    grads, metrics = grads_of(state["params"], batch, key)
    if nan_step:  # tests of the divergence stop: this step's loss and gradients are NaN
      poison = jnp.where(state["step"] + 1 == nan_step, jnp.nan, 0.0)
      grads = jax.tree.map(lambda g: g + poison.astype(g.dtype), grads)
      metrics = dict(metrics, loss=metrics["loss"] + poison)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
    values = jnp.stack([metrics[k].astype(jnp.float32) for k in WATCHED])
    finite = jnp.isfinite(values)
    first_bad = (health["bad_step"] < 0) & ~finite.all()
    keep_new = (health["bad_step"] < 0) & finite.all()

    def update(state):
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state["ema"], params)
      return dict(step=state["step"] + 1, params=params, opt_state=opt_state, ema=ema)

    # A non-finite step (or any after one) leaves the state as it was. A cond,
    # not a select of the new state against the old: the update then runs in
    # place in the donated buffers (the select kept both, 16% of a CPU step).
    new_state = jax.lax.cond(keep_new, update, lambda state: state, state)
    health = dict(
      bad_step=jnp.where(first_bad, state["step"] + 1, health["bad_step"]),
      terms=jnp.where(first_bad, finite, health["terms"]),
      values=jnp.where(first_bad, values, health["values"]),
    )
    return new_state, metrics, health

  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(
    step,
    in_shardings=(shardings, batch_sharding, replicated),
    out_shardings=(shardings, None, replicated),
    donate_argnums=(0,),
  )
