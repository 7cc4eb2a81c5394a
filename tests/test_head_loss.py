"""The LM head applied only to the tokens with cross-entropy: the same loss and
gradients as the logits of every token, on one device and on a mesh."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax.model.layers import dense
from monoformer_jax.parallel import sharding
from monoformer_jax.train.loss import HEAD_CAPACITIES, cross_entropy, head_cross_entropy

B, L, E, V = 8, 24, 16, 40


def _inputs(n_text: int, seed: int = 0):
  """Random hidden states and head; `n_text` CE tokens at random places (a
  few of them with fractional weights), the rest weight 0."""
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(B, L, E)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(E, V)) / 4, jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
  weights = np.zeros(B * L, np.float32)
  where = rng.choice(B * L, n_text, replace=False)
  weights[where] = 1.0
  weights[where[:3]] = 0.5
  return h, head, targets, jnp.asarray(weights.reshape(B, L))


def _numpy_loss(h, head, targets, weights):
  logits = np.asarray(h, np.float64) @ np.asarray(head, np.float64)
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  w = np.asarray(weights, np.float64)
  return (nll * w).sum() / max(w.sum(), 1.0)


def _full(h, head, targets, weights):
  return cross_entropy(jnp.einsum("ble,ev->blv", h, head), targets, weights)[0]


def _compact(h, head, targets, weights):
  return head_cross_entropy(h, lambda x: _logits(x, head), targets, weights)[0]


def _logits(x, head):
  return dense(x, head, out_dtype=jnp.float32)


# Token counts that land in every capacity of the switch (of B * L = 192):
# none, 1, at the 1/8 budget's edge and past it, a third, two thirds, all.
COUNTS = (0, 1, 24, 25, 64, 128, B * L)


@pytest.mark.parametrize("n_text", COUNTS)
def test_loss_and_gradients_equal_the_full_head(n_text):
  h, head, targets, weights = _inputs(n_text)
  loss = jax.jit(_compact)(h, head, targets, weights)
  np.testing.assert_allclose(loss, _numpy_loss(h, head, targets, weights), rtol=1e-5, atol=1e-7)
  grads = jax.jit(jax.grad(_compact, argnums=(0, 1)))(h, head, targets, weights)
  want = jax.jit(jax.grad(_full, argnums=(0, 1)))(h, head, targets, weights)
  for g, w in zip(grads, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  if n_text == 0:
    assert float(loss) == 0.0 and not np.asarray(grads[0]).any()
  # Tokens without CE get no gradient (their logits were never made).
  dead = np.asarray(weights) == 0
  assert not np.asarray(grads[0])[dead].any()


def test_only_the_smallest_budget_that_holds_the_tokens_runs(monkeypatch):
  # The head's matmul reports its token count when it RUNS (a debug callback
  # fires only in the switch branch taken): the first capacity >= the count,
  # and nothing at all without CE tokens; under jax.grad too.
  ran = []

  def spy(x, head):
    jax.debug.callback(lambda: ran.append(x.shape[1]))
    return dense(x, head, out_dtype=jnp.float32)

  monkeypatch.setattr(sys.modules[__name__], "_logits", spy)
  capacities = sorted({int(np.ceil(f * B * L)) for f in HEAD_CAPACITIES})
  assert capacities == [0, 24, 48, 96, 192]
  # Fresh functions: jit's cache would reuse the other tests' traces.
  loss_of = jax.jit(lambda *a: _compact(*a))  # noqa: PLW0108 (a new function, see above)
  grad_of = jax.jit(jax.grad(lambda *a: _compact(*a)))  # noqa: PLW0108 (the same)
  for n_text, want in [(0, []), (1, [24]), (24, [24]), (25, [48]), (49, [96]), (97, [192])]:
    h, head, targets, weights = _inputs(n_text, seed=n_text)
    ran.clear()
    loss = loss_of(h, head, targets, weights)
    jax.effects_barrier()
    assert ran == want, (n_text, ran)
    ran.clear()
    jax.block_until_ready(grad_of(h, head, targets, weights))
    jax.effects_barrier()
    assert ran == want, (n_text, ran)
    np.testing.assert_allclose(loss, _numpy_loss(h, head, targets, weights), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_batches_sort_within_their_shard(shape):
  # Uneven counts per shard: shard 0 has every token, the others a few.
  h, head, targets, weights = _inputs(10, seed=3)
  weights = weights.at[0].set(1.0)
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
  batch_spec = jax.sharding.PartitionSpec(("data", "fsdp"))
  with jax.set_mesh(mesh), sharding.logical_rules(sharding.RULES):
    assert sharding.batch_shards(B) == shape[0] * shape[1]
    put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, batch_spec))
    args = (put(h), head, put(targets), put(weights))
    loss = jax.jit(_compact)(*args)
    grad_fn = jax.jit(jax.grad(_compact, argnums=(0, 1)))
    grads = grad_fn(*args)
    # The ordering and the gathers stay inside each shard: no hidden states
    # move between devices (only the head's gradient and scalars are reduced).
    assert "all-gather" not in grad_fn.lower(*args).compile().as_text()
  np.testing.assert_allclose(loss, _numpy_loss(h, head, targets, weights), rtol=1e-5)
  want = jax.jit(jax.grad(_full, argnums=(0, 1)))(h, head, targets, weights)
  for g, w in zip(grads, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
