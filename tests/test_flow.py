"""Flow matching (diffusion.objective='flow') against closed forms and numpy.

For data x_0 ~ N(MU, S^2) (each coordinate), x_t = (1 - t) x_0 + t eps is
Gaussian and the optimal velocity E[eps - x_0 | x_t] is affine in x_t, so:
the loss at it is the conditional variance (its minimum), its gradient there
is zero, and an Euler or Heun step with it is an affine map whose law after
N steps is exact in float64 (`_chain_moments`); the exact ODE carries N(0, 1)
at t = 1 to the data's law at t = 0. The loss path (`loss_terms`) is checked
against numpy on a tiny model's outputs, and the samplers, the prompt cache,
guidance, checkpoints and entry points on the digits architecture.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import digits_config, random_checkpoint, random_model

from monoformer_jax import inference
from monoformer_jax.checkpoints import load_model, load_params
from monoformer_jax.config import complete
from monoformer_jax.convert.official import convert_to_official
from monoformer_jax.data.packing import pack_examples
from monoformer_jax.data.prompts import image_rows
from monoformer_jax.diffusion import FlowMatching, apply_guidance, from_config, sample_loop
from monoformer_jax.diffusion.sample_images import sample_images
from monoformer_jax.errors import ConfigError
from monoformer_jax.eval.sampling import run_settings
from monoformer_jax.layout import Example, row_spec
from monoformer_jax.model.build import abstract_model, init_params
from monoformer_jax.text.tokenizer import ByteTokenizer, tokenizer_of
from monoformer_jax.train.loss import loss_terms

MU, S = 0.5, 0.5
TOK = ByteTokenizer()
TOL = dict(rtol=1e-4, atol=1e-4)


def _flow(config):
  config.diffusion.objective = "flow"
  config.model.learn_sigma = False
  return config


# ------------------------------------------------------------ closed forms


def _optimal(t):
  """(a, b) of the optimal velocity v*(x, t) = a x + b for N(MU, S^2) data, float64."""
  var = (1 - t) ** 2 * S**2 + t**2  # Var x_t
  a = (t - (1 - t) * S**2) / var  # Cov(eps - x_0, x_t) / Var x_t
  return a, -MU - a * (1 - t) * MU


def _optimal_velocity(x, t_model, scale=1000.0):
  t = (t_model / scale).reshape((-1,) + (1,) * (x.ndim - 1))
  var = (1 - t) ** 2 * S**2 + t**2
  a = (t - (1 - t) * S**2) / var
  return a * x - MU - a * (1 - t) * MU


def test_the_optimal_velocity_minimises_the_loss():
  flow = FlowMatching(1)
  n = 200_000
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x0 = MU + S * jax.random.normal(k1, (n, 1))
  eps = jax.random.normal(k2, (n, 1))
  for t in (0.1, 0.5, 0.9):
    tt = jnp.full((n,), t)
    x_t = flow.q_sample(x0, tt, eps)

    def loss(ab, x_t=x_t, tt=tt):
      return flow.training_losses(ab[0] * x_t + ab[1], x0, x_t, tt, eps)["loss"].mean()

    a, b = _optimal(t)
    # The minimum is the conditional variance of eps - x_0 given x_t.
    var = (1 - t) ** 2 * S**2 + t**2
    minimum = 1 + S**2 - (t - (1 - t) * S**2) ** 2 / var
    value, grad = jax.value_and_grad(loss)(jnp.array([a, b]))
    assert abs(float(value) - minimum) < 0.01 * minimum  # Monte Carlo: ~0.3% SE
    assert np.abs(np.asarray(grad)).max() < 0.01  # ~0.003 SE at the optimum
    # 0.2 off in the slope: the gradient points back, far beyond the noise.
    assert float(jax.grad(loss)(jnp.array([a + 0.2, b]))[0]) > 0.05


def _chain_moments(flow, sampler):
  """Exact (mean, std) of x_0 from N(0, 1) through `flow`'s steps with the
  optimal velocity: each step x <- A x + B, float64."""
  m, var = 0.0, 1.0
  for t, t_next in zip(flow.times[:-1], flow.times[1:]):
    dt = t_next - t
    a, b = _optimal(t)
    if sampler == "euler":
      A, B = 1 + dt * a, dt * b
    else:  # v_next at the Euler point x + dt (a x + b)
      a2, b2 = _optimal(t_next)
      A = 1 + dt / 2 * (a + a2 * (1 + dt * a))
      B = dt / 2 * (b + a2 * dt * b + b2)
    m, var = A * m + B, A * A * var
  return m, np.sqrt(var)


@pytest.mark.parametrize(
  "sampler, steps, shift, tol, order", [("euler", 100, 1.0, 0.01, 1), ("heun", 50, 3.0, 5e-4, 2)]
)
def test_euler_and_heun_carry_noise_to_the_gaussian_data(sampler, steps, shift, tol, order):
  config = complete(_flow(digits_config()))
  config.unlock()
  config.diffusion.shift = shift
  flow = from_config(config.diffusion, str(steps))
  assert flow.times[0] == 1.0 and flow.times[-1] == 0.0 and len(flow.times) == steps + 1
  u = 1 - np.arange(steps + 1) / steps  # the shifted grid, written out
  np.testing.assert_allclose(flow.times, shift * u / (1 + (shift - 1) * u), rtol=1e-12)
  mean, std = _chain_moments(flow, sampler)
  # Enough steps: the discretised chain's law is the data's, and its error
  # falls as the method's order (Euler 1, Heun 2): 2^order less at twice the steps.
  assert abs(mean - MU) < tol and abs(std - S) < tol
  err = lambda n: abs(_chain_moments(FlowMatching(n, shift=shift), sampler)[1] - S)
  assert 2**order * 0.75 < err(steps) / err(2 * steps) < 2**order * 1.35
  x_T = jax.random.normal(jax.random.PRNGKey(1), (4096, 2, 2, 1))
  calls = []
  sample = jax.jit(
    lambda x: sample_loop(
      _optimal_velocity, x, jax.random.PRNGKey(2), flow, sampler=sampler, progress=calls.append
    )
  )
  x_0 = np.asarray(sample(x_T)).ravel()
  jax.effects_barrier()
  assert sorted(int(c) for c in calls) == list(range(steps))
  # The chain is deterministic: the samples are x_T's affine image, exactly.
  A = std  # x_T ~ N(0, 1) -> N(mean, std^2) with positive slope
  np.testing.assert_allclose(x_0, A * np.asarray(x_T).ravel() + mean, rtol=1e-4, atol=1e-4)


def test_euler_and_heun_on_a_one_step_grid():
  # One step from t = 1 to 0 with v(x, t) = c t: Euler uses v(1) = c, Heun
  # the mean of v(1) and v(0) = 0.
  flow = FlowMatching(1)
  x = jnp.ones((2, 1, 1, 1))
  v = lambda x_t, tm: jnp.broadcast_to(3.0 * (tm / 1000.0)[:, None, None, None], x_t.shape)
  key = jax.random.PRNGKey(0)
  assert float(flow.sample_step(v, x, 0, key, sampler="euler")[0, 0, 0, 0]) == pytest.approx(-2.0)
  assert float(flow.sample_step(v, x, 0, key, sampler="heun")[0, 0, 0, 0]) == pytest.approx(-0.5)


@pytest.mark.parametrize("distribution", ["logit_normal", "uniform"])
def test_training_times_follow_the_configured_distribution(distribution):
  flow = FlowMatching(1, time_distribution=distribution, logit_mean=0.5, logit_scale=0.7)
  if distribution == "uniform":
    flow = FlowMatching(1, time_distribution="uniform")
  t = np.asarray(flow.draw_timesteps(jax.random.PRNGKey(0), (40_000,)), np.float64)
  assert t.dtype == np.float64 and ((t > 0) & (t < 1)).all()
  if distribution == "uniform":
    np.testing.assert_allclose(np.quantile(t, [0.1, 0.5, 0.9]), [0.1, 0.5, 0.9], atol=0.01)
  else:
    logit = np.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.7) < 0.02


# ------------------------------------------------------ the loss on a model


class _Tap:
  """The tiny model, with `delta` added to its diffusion output (what the
  gradient is taken against) and what it was given and gave recorded."""

  def __init__(self, model, delta, seen):
    self.model, self.delta, self.seen = model, delta, seen
    self.logits = model.logits

  def hidden(self, row, x_t, t, read_images=None):
    h, out = self.model.hidden(row, x_t, t, read_images)
    self.seen.update(x_t=x_t, t=t, out=out)
    return h, out + self.delta


def test_the_loss_and_its_gradient_equal_numpy():
  weighting = "cosmap"  # (its weight 1 is the default's: the mse checked alone below)
  config = _flow(digits_config())
  config.data.update(max_images_per_row=2)
  config.diffusion.loss_weighting = weighting
  config = complete(config)
  model = random_model(config)
  flow = from_config(config.diffusion)
  tok = tokenizer_of(config)
  t_ = tok
  draws = lambda n: [t_.im_start_id, t_.image_id, t_.im_end_id] * n
  digit = np.zeros((8, 8, 1), np.float32)
  examples = [  # two drawn images in row 0, one in row 1 (its second slot empty)
    Example([t_.bos_id] + t_.encode("two") + draws(2) + [t_.eos_id], [digit, digit]),
    Example([t_.bos_id] + t_.encode("seven") + draws(1) + [t_.eos_id], [digit]),
  ]
  batch = pack_examples(examples, row_spec(config, tok), one_per_row=True)
  valid = np.asarray(batch["image_valid"])
  assert valid.tolist() == [[True, True], [True, False]]
  rng = np.random.default_rng(0)
  batch["latents"] = latents = rng.standard_normal((2, 2, 8, 8, 1)).astype(np.float32)
  noise = rng.standard_normal((2, 2, 8, 8, 1)).astype(np.float32)
  t = np.array([[0.1, 0.7], [0.45, 0.95]], np.float32)
  batch["text_weights"] = np.zeros_like(batch["text_weights"])  # the diffusion term alone

  def terms_of(delta):
    seen = {}
    terms = loss_terms(_Tap(model, delta, seen), batch, jnp.asarray(t), noise, flow)
    return terms["diff"], (terms, seen)

  zero = jnp.zeros_like(latents)
  grad, (terms, seen) = jax.jit(jax.grad(terms_of, has_aux=True))(zero)
  grad = np.asarray(grad)
  # numpy: x_t, the network's time, the loss and its gradient in the output.
  x_t = (1 - t[..., None, None, None]) * latents + t[..., None, None, None] * noise
  np.testing.assert_allclose(np.asarray(seen["x_t"]), x_t, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(seen["t"]), t * 1000.0, rtol=1e-6)
  out = np.asarray(seen["out"])  # the model's output
  assert out.shape == latents.shape  # no learned variance channels
  target = noise.astype(np.float64) - latents
  mse = ((target - out) ** 2).mean(axis=(2, 3, 4))
  w = 2 / (np.pi * (1 - 2 * t + 2 * t * t))
  want = (w * mse)[valid].sum() / valid.sum()
  np.testing.assert_allclose(np.asarray(terms["mse"]), mse, rtol=1e-5)
  np.testing.assert_allclose(float(terms["diff"]), want, rtol=1e-5)
  assert np.asarray(terms["vb"]).max() == 0
  per_image = 8 * 8 * 1
  want_grad = -2 * (w * valid)[..., None, None, None] * (target - out) / per_image / valid.sum()
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-9)
  assert not grad[1, 1].any()  # the empty slot gets no gradient


# ------------------------------------------------------ samplers on a model


@pytest.fixture(scope="module")
def flow_config():
  return complete(_flow(digits_config()))


@pytest.fixture(scope="module")
def flow_model(flow_config):
  graphdef, abstract, _ = abstract_model(flow_config.model)
  rng = np.random.default_rng(1)

  def draw(path, x):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    return 1 + 0.1 * noise if path[-1].key == "scale" else 0.08 * noise

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract))


def test_flow_cache_equals_recomputing_and_guidance_one_is_the_conditional(flow_config, flow_model):
  flow = from_config(flow_config.diffusion, "3")
  prompts = ["Please generate an image of seven.", "two"]
  guided = image_rows(prompts, TOK, 16, guidance=True)
  draw = lambda rows, **kw: np.asarray(
    sample_images(flow_model, rows, flow, jax.random.PRNGKey(0), sampler="heun", **kw)
  )
  cached = draw(guided, cfg_scale=3.0)
  assert cached.shape == (2, 8, 8, 1) and np.isfinite(cached).all()
  np.testing.assert_allclose(cached, draw(guided, cfg_scale=3.0, use_cache=False), **TOL)
  plain = draw(image_rows(prompts, TOK, 16, guidance=False))
  np.testing.assert_allclose(draw(guided, cfg_scale=1.0), plain, **TOL)
  assert np.abs(cached - plain).max() > 1e-2  # guidance moves the velocity
  assert np.abs(cached[0] - cached[1]).max() > 1e-2  # the prompt matters
  # Guidance combines every velocity channel (no variance half to keep).
  outs = [jnp.full((1, 2, 2, 2), v) for v in (3.0, 1.0)]
  np.testing.assert_allclose(np.asarray(apply_guidance(outs, [2.0], predicted=2)), 5.0)


def test_flow_with_a_timestep_token_caches_as_it_recomputes():
  # add_before_image_tokens: the token before the image embeds t * 1000, a float.
  config = _flow(digits_config())
  config.model.conditioning = "add_before_image_tokens"
  config = complete(config)
  model = random_model(config)
  rows = image_rows(["two", "seven"], TOK, 16, guidance=True, cond_token=True)
  draw = lambda **kw: np.asarray(
    sample_images(
      model, rows, from_config(config.diffusion, "2"), jax.random.PRNGKey(0), cfg_scale=2.0, **kw
    )
  )
  cached = draw()
  assert np.isfinite(cached).all() and np.abs(cached[0] - cached[1]).max() > 1e-2
  np.testing.assert_allclose(cached, draw(use_cache=False), **TOL)


def test_a_flow_process_refuses_iddpm_samplers_and_respacings(flow_config, flow_model):
  flow = from_config(flow_config.diffusion, "3")
  rows = image_rows(["two"], TOK, 16, guidance=False)
  with pytest.raises(ValueError, match="sampler='ddpm': this model samples with one of"):
    sample_images(flow_model, rows, flow, jax.random.PRNGKey(0), sampler="ddpm")
  with pytest.raises(ConfigError, match="respacing='ddim10': a flow model samples with a count"):
    from_config(flow_config.diffusion, "ddim10")
  with pytest.raises(
    ConfigError, match="sampler='ddim': does not sample a diffusion.objective='flow' model"
  ):
    inference.generate_images(
      flow_model, TOK, ["two"], config=flow_config, num_steps=2, sampler="ddim"
    )
  # Any step count: more than num_timesteps is an ODE grid like any other.
  assert from_config(flow_config.diffusion, "1500").num_timesteps == 1500


# ------------------------------------------------------- checkpoints, entry points


def test_a_flow_checkpoint_round_trips_and_every_entry_point_samples_it(tmp_path, monkeypatch):
  config = _flow(digits_config())
  config.model.vision_encoder = "vae"  # it reads images, so it can edit
  config = complete(config)
  path = random_checkpoint(str(tmp_path / "flow"), config)
  model, loaded = load_model(path)
  assert loaded.diffusion.objective == "flow" and not loaded.model.learn_sigma
  saved = jax.jit(lambda: init_params(config.model, seed=3))()
  raw, _, _ = load_params(path, weights="raw")
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(raw), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  head = model.final_layer.linear.kernel[...]
  assert head.shape[-1] == 2 * 2 * 1  # p * p * C: no variance channels

  # generate_images with no sampler named: the objective's own (euler).
  kw = dict(config=loaded, num_steps=2, cfg_scale=2.0, seed=0)
  default = np.asarray(inference.generate_images(model, TOK, ["two"], **kw))
  euler = np.asarray(inference.generate_images(model, TOK, ["two"], sampler="euler", **kw))
  np.testing.assert_array_equal(default, euler)
  assert default.shape == (1, 8, 8, 1) and np.isfinite(default).all()
  edited = inference.edit_images(
    model, TOK, [np.zeros((8, 8))], "the next digit:", config=loaded, num_steps=2
  )
  assert edited.shape == (1, 8, 8, 1) and np.isfinite(np.asarray(edited)).all()

  # Interleaved and the metrics' sampler get the flow process and no sampler
  # name, which each resolves to the objective's default.
  ran = []
  monkeypatch.setattr(
    inference,
    "interleave",
    lambda m, rows, *, diffusion, sampler, **kw: ran.append((diffusion, sampler)) or [],
  )
  inference.generate_interleaved(model, TOK, ["here is a"], config=loaded, num_steps=4)
  ((process, sampler),) = ran
  assert isinstance(process, FlowMatching) and process.num_timesteps == 4 and sampler is None

  # evaluate's run (its folder's settings): the objective's sampler by name.
  run = lambda sampler: run_settings(
    loaded,
    checkpoint=path,
    step=None,
    weights="ema",
    num_samples=8,
    chunk_size=8,
    num_steps=2,
    cfg_scale=2.0,
    sampler=sampler,
    seed=0,
    balanced=False,
  )
  assert run(None)["sampler"] == "euler" and run("heun")["sampler"] == "heun"
  with pytest.raises(ConfigError, match="--sampler='ddpm': does not sample a diffusion.objective"):
    run("ddpm")

  # The official format holds IDDPM models only: refused before anything is written.
  with pytest.raises(ConfigError, match="diffusion.objective='flow': the official MonoFormer"):
    convert_to_official(path, str(tmp_path / "official"))
  assert not (tmp_path / "official").exists()


def test_flow_settings_are_checked_where_they_are_set():
  def fails(match, **diffusion):
    c = digits_config()
    c.diffusion.update(diffusion)
    if diffusion.get("objective") == "flow":
      c.model.learn_sigma = False
    with pytest.raises(ConfigError, match=match):
      complete(c)

  fails(r"diffusion.shift=3.0: shapes only diffusion.objective='flow'", shift=3.0)
  fails(
    r"diffusion.logit_scale=2.0: shapes only diffusion.time_distribution='logit_normal'",
    objective="flow",
    time_distribution="uniform",
    logit_scale=2.0,
  )
  fails(r"diffusion.shift=0.0: must be > 0", objective="flow", shift=0.0)
  fails(r"diffusion.objective='rf': must be one of", objective="rf")
  c = digits_config()
  c.diffusion.objective = "flow"
  with pytest.raises(ConfigError, match="model.learn_sigma=True: is IDDPM's learned variance"):
    complete(c)
  # An iddpm config (every paper config) is unchanged: the flow fields at their defaults.
  assert complete(digits_config()).diffusion.objective == "iddpm"
