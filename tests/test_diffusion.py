"""Diffusion math against the official IDDPM/DiT code's outputs, plus the
stop-gradient, CFG and analytic checks of the DDPM and DDIM samplers.

Fixture arrays are NCHW; ours are channels last, so tensors are moved to NHWC.

Tolerances: the float64 tables are the same formulas in the same order (seen:
bit-identical); rtol 1e-12 leaves room for a libm differing in the last ulp.
Tensor quantities are float32 math on float32-cast coefficients as in the
reference; they differ only by op order / fusion (seen: <= 5e-7 abs, the
vb losses <= 1.5e-6 abs as they average O(1-10) KL / NLL terms and divide by
log 2): rtol 1e-5 with atol 1e-6, atol 1e-5 for vb. A wrong coefficient
(e.g. a table read one index off) moves them by >= 1e-4 relative.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax.config import base
from monoformer_jax.config.schema import BETA_SCHEDULES
from monoformer_jax.diffusion import (
  BETAS,
  GaussianDiffusion,
  apply_cfg,
  from_config,
  sample_loop,
  space_timesteps,
)
from monoformer_jax.errors import ConfigError

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "official_tiny"
TABLES = [
  "betas",
  "alphas_cumprod",
  "alphas_cumprod_prev",
  "alphas_cumprod_next",
  "sqrt_alphas_cumprod",
  "sqrt_one_minus_alphas_cumprod",
  "log_one_minus_alphas_cumprod",
  "sqrt_recip_alphas_cumprod",
  "sqrt_recipm1_alphas_cumprod",
  "posterior_variance",
  "posterior_log_variance_clipped",
  "posterior_mean_coef1",
  "posterior_mean_coef2",
]
TOL = dict(rtol=1e-5, atol=1e-6)
TOL_VB = dict(rtol=1e-5, atol=1e-5)


def _load(name):
  path = FIXTURES / name
  assert path.exists(), f"reference fixtures missing at {path}"
  return dict(np.load(path))


def nhwc(a):
  a = np.asarray(a)
  return np.moveaxis(a, 1, -1) if a.ndim == 4 else a


@pytest.fixture(scope="module")
def ref():
  return _load("diffusion.npz")


@pytest.fixture(scope="module")
def d1000():
  return GaussianDiffusion.create(1000, "linear")


@pytest.fixture(scope="module")
def d20():
  return GaussianDiffusion.create(1000, "linear", respacing="20")


# ------------------------------------------------------------------ tables
@pytest.mark.parametrize("prefix,respacing", [("T1000", None), ("S20", "20")])
def test_tables(ref, prefix, respacing):
  d = GaussianDiffusion.create(1000, "linear", respacing=respacing)
  for name in TABLES:
    np.testing.assert_allclose(
      getattr(d, name), ref[f"{prefix}_{name}"], rtol=1e-12, atol=0, err_msg=name
    )
  np.testing.assert_array_equal(d.timestep_map, ref[f"{prefix}_timestep_map"])
  assert d.num_timesteps == len(ref[f"{prefix}_betas"])


def test_raw_linear_betas(ref):
  from monoformer_jax.diffusion.gaussian import linear_betas

  np.testing.assert_allclose(linear_betas(1000), ref["betas_linear_raw"], rtol=1e-15, atol=0)


def test_the_schedule_table_has_betas_for_exactly_the_schemas_choices():
  assert sorted(BETAS) == sorted(BETA_SCHEDULES)
  with pytest.raises(
    ConfigError,
    match=r"diffusion.beta_schedule='cosine' has no betas; "
    r"choose one of \['linear'\]",
  ):
    GaussianDiffusion.create(1000, "cosine")


def test_from_config_builds_the_sections_steps_of_its_schedule(monkeypatch):
  """Every field of the diffusion section reaches the process: a second
  schedule in the table, named by the section, gives its own alphas_cumprod
  (computed here with numpy), over the section's num_timesteps."""
  steeper = lambda t: np.linspace(2e-4, 0.03, t)
  monkeypatch.setitem(BETAS, "steeper", steeper)
  section = base().diffusion
  section.update(num_timesteps=400, beta_schedule="steeper")
  alphas_cumprod = np.cumprod(1.0 - steeper(400))
  full = from_config(section)
  np.testing.assert_allclose(full.alphas_cumprod, alphas_cumprod, rtol=1e-12, atol=0)
  np.testing.assert_array_equal(full.timestep_map, np.arange(400))
  d20 = from_config(section, respacing="20")
  assert d20.num_timesteps == 20 and d20.timestep_map[-1] == 399
  np.testing.assert_allclose(
    d20.alphas_cumprod, alphas_cumprod[d20.timestep_map], rtol=1e-12, atol=0
  )
  linear = GaussianDiffusion.create(400, "linear", respacing="20")
  assert np.abs(linear.alphas_cumprod - d20.alphas_cumprod).max() > 0.1  # it tells them apart


def test_space_timesteps():
  assert space_timesteps(10, "") == list(range(10))
  assert space_timesteps(10, None) == list(range(10))
  assert space_timesteps(1000, "20") == space_timesteps(1000, 20) == space_timesteps(1000, [20])
  assert space_timesteps(300, "ddim3") == [0, 100, 200]
  # Per-section counts: sections [0, 50) and [50, 100).
  assert space_timesteps(100, "2,3") == [0, 49, 50, 74, 99]
  with pytest.raises(ValueError):
    space_timesteps(10, "20")


# --------------------------------------------------- q, posterior, p, losses
@pytest.mark.parametrize("case", ["", "extra_"])
def test_forward_posterior_pmv_losses(ref, d1000, case):
  g = lambda k: nhwc(ref[case + k])
  x_start, noise, out = g("x_start"), g("noise"), g("model_output")
  t = jnp.asarray(ref[case + "t"], jnp.int32)

  x_t = d1000.q_sample(x_start, t, noise)
  np.testing.assert_allclose(x_t, g("q_sample"), **TOL)
  x_t = g("q_sample")  # the rest of the chain starts from the reference's x_t

  mean, var, log_var = d1000.q_posterior_mean_variance(x_start, x_t, t)
  np.testing.assert_allclose(mean, g("q_posterior_mean"), **TOL)
  np.testing.assert_allclose(var, g("q_posterior_variance"), **TOL)
  np.testing.assert_allclose(log_var, g("q_posterior_log_variance_clipped"), **TOL)

  pmv = jax.jit(d1000.p_mean_variance)(out, x_t, t)
  for k in ["mean", "variance", "log_variance", "pred_xstart"]:
    np.testing.assert_allclose(pmv[k], g("pmv_" + k), **TOL, err_msg=k)
  pmv = d1000.p_mean_variance(out, x_t, t, clip_denoised=True)
  np.testing.assert_allclose(pmv["mean"], g("pmv_clip_mean"), **TOL)
  np.testing.assert_allclose(pmv["pred_xstart"], g("pmv_clip_pred_xstart"), **TOL)

  losses = jax.jit(d1000.training_losses)(out, x_start, x_t, t, noise)
  np.testing.assert_allclose(losses["mse"], g("loss_mse"), **TOL)
  np.testing.assert_allclose(losses["vb"], g("loss_vb"), **TOL_VB)
  np.testing.assert_allclose(losses["loss"], g("loss_loss"), **TOL_VB)


@pytest.mark.parametrize("case", ["ps1", "ps2"])
def test_p_sample_respaced(ref, d20, case):
  g = lambda k: nhwc(ref[f"S20_{case}_{k}"])
  t = jnp.asarray(g("t_idx"), jnp.int32)
  np.testing.assert_array_equal(d20.model_timesteps(t), g("t_model"))
  out = jax.jit(d20.p_sample)(g("model_output"), g("x"), t, g("noise"))
  np.testing.assert_allclose(out["sample"], g("sample"), **TOL)
  np.testing.assert_allclose(out["pred_xstart"], g("pred_xstart"), **TOL)
  pmv = d20.p_mean_variance(g("model_output"), g("x"), t)
  for k in ["mean", "variance", "log_variance"]:
    np.testing.assert_allclose(pmv[k], g(k), **TOL, err_msg=k)


# ------------------------------------------------------------------ CFG step
def test_cfg_step(d20):
  ref = _load("cfg_step.npz")
  raw, s = nhwc(ref["x_out_raw"]), float(ref["cfg_scale"])
  # The reference guides eps 0..2 into BOTH rows and leaves eps 3 and the
  # variance channels per-row raw. Row 1 is therefore apply_cfg with the
  # halves swapped: x0 + (1 - s) * (x1 - x0) == x1 + s * (x0 - x1).
  row0 = apply_cfg(raw[:1], raw[1:], s, guided_channels=3)
  row1 = apply_cfg(raw[1:], raw[:1], 1.0 - s, guided_channels=3)
  cfg = nhwc(ref["x_out_cfg"])
  np.testing.assert_allclose(jnp.concatenate([row0, row1]), cfg, **TOL)
  # Our default guides all four eps channels, so it differs exactly at eps 3.
  full = np.asarray(apply_cfg(raw[:1], raw[1:], s))
  np.testing.assert_allclose(full[..., :3], cfg[:1, ..., :3], **TOL)
  assert np.abs(full[..., 3] - cfg[:1, ..., 3]).max() > 1e-3

  t = jnp.asarray(ref["t_idx"], jnp.int32)
  np.testing.assert_array_equal(d20.model_timesteps(t), ref["t_model"])
  np.testing.assert_array_equal(d20.timestep_map, ref["timestep_map"])
  z, noise = nhwc(ref["z"]), nhwc(ref["noise"])
  pmv = d20.p_mean_variance(cfg, z, t)
  for k in ["mean", "variance", "log_variance", "pred_xstart"]:
    np.testing.assert_allclose(pmv[k], nhwc(ref[k]), **TOL, err_msg=k)
  np.testing.assert_allclose(d20.p_sample(cfg, z, t, noise)["sample"], nhwc(ref["sample"]), **TOL)


def test_cfg_scale_one_is_conditional():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  cond, uncond = jax.random.normal(k1, (2, 4, 4, 8)), jax.random.normal(k2, (2, 4, 4, 8))
  for g in [None, 3]:
    np.testing.assert_allclose(apply_cfg(cond, uncond, 1.0, g), cond, rtol=0, atol=1e-6)


# ------------------------------------------------------------ stop-gradient
def test_vb_trains_only_the_variance(ref, d1000):
  # t = [0, 517]: both the decoder-NLL and the KL branch.
  x_start, noise, out = nhwc(ref["x_start"]), nhwc(ref["noise"]), nhwc(ref["model_output"])
  t = jnp.asarray(ref["t"], jnp.int32)
  x_t = d1000.q_sample(x_start, t, noise)
  grad = lambda k: jax.grad(lambda o: d1000.training_losses(o, x_start, x_t, t, noise)[k].sum())(
    out
  )
  g_vb, g_mse = np.asarray(grad("vb")), np.asarray(grad("mse"))
  assert np.all(g_vb[..., :4] == 0)
  assert np.all(np.abs(g_vb[..., 4:]).reshape(2, -1).max(axis=1) > 0)  # both samples
  assert np.all(g_mse[..., 4:] == 0)
  assert np.all(np.abs(g_mse[..., :4]).reshape(2, -1).max(axis=1) > 0)


# ----------------------------------------------------------------- sampler
MU, S = 0.5, 0.5


def _optimal_denoiser(x_t, t_model, v):
  """E[eps | x_t] for x_0 ~ N(MU, S^2) per dimension, at ORIGINAL timestep t.

  x_t = sqrt(a) x_0 + sqrt(1-a) eps is Gaussian, so
  E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) MU) / (a S^2 + 1 - a), a = abar(t).
  """
  abar = jnp.asarray(GaussianDiffusion.create(1000).alphas_cumprod, jnp.float32)[t_model]
  a = abar.reshape((-1,) + (1,) * (x_t.ndim - 1))
  eps = jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * MU) / (a * S**2 + 1 - a)
  return jnp.concatenate([eps, jnp.full_like(eps, v)], axis=-1)


def _chain_moments(d, v):
  """Exact (mean, std) of x_0 from this sampler with the optimal denoiser.

  Given eps_hat linear in x_t, each step is x <- A x + B + sigma z, so the
  law stays Gaussian; propagate its moments in float64 from x_T ~ N(0, 1).
  This is the target without the discretisation error of finite steps.
  """
  abar_full = GaussianDiffusion.create(1000).alphas_cumprod
  frac = (v + 1) / 2
  m, var = 0.0, 1.0
  for t in reversed(range(d.num_timesteps)):
    a = abar_full[d.timestep_map[t]]
    k = np.sqrt(1 - a) / (a * S**2 + 1 - a)  # eps_hat = k (x - sqrt(a) MU)
    r, rm1 = d.sqrt_recip_alphas_cumprod[t], d.sqrt_recipm1_alphas_cumprod[t]
    c1, c2 = d.posterior_mean_coef1[t], d.posterior_mean_coef2[t]
    A, B = c1 * (r - rm1 * k) + c2, c1 * rm1 * k * np.sqrt(a) * MU
    log_var = frac * np.log(d.betas[t]) + (1 - frac) * d.posterior_log_variance_clipped[t]
    m, var = A * m + B, A * A * var + (np.exp(log_var) if t else 0.0)
  return m, np.sqrt(var)


@pytest.mark.parametrize("v", [-1.0, 1.0])  # posterior variance, beta_t
def test_ddpm_sampler_reproduces_gaussian_data(v):
  d50 = GaussianDiffusion.create(1000, "linear", respacing="50")
  x_T = jax.random.normal(jax.random.PRNGKey(1), (4096, 2, 2, 1))
  calls = []
  sample = jax.jit(
    lambda x, k: sample_loop(
      lambda x_t, tm: _optimal_denoiser(x_t, tm, v), x, k, d50, progress=calls.append
    )
  )
  x_0 = np.asarray(sample(x_T, jax.random.PRNGKey(2))).ravel()
  jax.effects_barrier()
  assert sorted(int(c) for c in calls) == list(range(50))

  # At 50 steps the chain's law is N(MU, S^2) up to discretisation error in
  # the variance only: std 0.443 with the posterior variance (too little
  # noise), 0.518 with beta_t (too much); the mean is exact. Test against
  # that exact law, and bound its distance to the data.
  mean, std = _chain_moments(d50, v)
  assert abs(mean - MU) < 1e-4 and abs(std - S) < 0.06
  n = x_0.size  # 16384 draws: SE(mean) = std/128 ~ 0.004, SE(std) ~ std/181 ~ 0.003
  # 4 SE: robust to the seed, yet a wrong timestep fed to the network, a
  # missing noise term or the same noise at every step each miss by >> 4 SE
  # (checked by breaking them one at a time).
  assert abs(x_0.mean() - mean) < 4 * std / np.sqrt(n)
  assert abs(x_0.std() - std) < 4 * std / np.sqrt(2 * n)


def test_sampler_rejects_wrong_output_shape():
  d = GaussianDiffusion.create(1000, respacing="5")
  with pytest.raises(ValueError, match="2\\*3 channels"):
    sample_loop(lambda x, t: x, jnp.zeros((2, 4, 4, 3)), jax.random.PRNGKey(0), d)


def test_sampler_name_is_checked():
  d = GaussianDiffusion.create(1000, respacing="5")
  with pytest.raises(ValueError, match="sampler='euler'"):
    sample_loop(lambda x, t: x, jnp.zeros((2, 4, 4, 3)), jax.random.PRNGKey(0), d, sampler="euler")


def test_ddim_eta_one_step_is_the_ddpm_step_with_the_posterior_variance(d20):
  # sigma_t(eta=1)^2 = (1 - abar_prev) / (1 - abar) * beta_t is the posterior
  # variance, and DDIM's mean then equals the posterior mean: the two steps
  # are one formula written twice.
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  x_t = jax.random.normal(keys[0], (20, 4, 4, 2))
  eps = jax.random.normal(keys[1], (20, 4, 4, 2))
  noise = jax.random.normal(keys[2], (20, 4, 4, 2))
  out = jnp.concatenate([eps, -jnp.ones_like(eps)], axis=-1)  # v = -1
  t = jnp.arange(20)
  ddim = d20.ddim_sample(out, x_t, t, noise, eta=1.0)["sample"]
  ddpm = d20.p_sample(out, x_t, t, noise)["sample"]
  np.testing.assert_allclose(np.asarray(ddim), np.asarray(ddpm), rtol=1e-5, atol=1e-5)


def _ddim_chain_moments(d, eta):
  """Exact (mean, std) of x_0 from DDIM with the optimal denoiser (see
  `_chain_moments`): x <- A x + B + sigma z with DDIM's coefficients."""
  m, var = 0.0, 1.0
  for t in reversed(range(d.num_timesteps)):
    a, a_prev = d.alphas_cumprod[t], d.alphas_cumprod_prev[t]
    k = np.sqrt(1 - a) / (a * S**2 + 1 - a)  # eps_hat = k (x - sqrt(a) MU)
    r, rm1 = d.sqrt_recip_alphas_cumprod[t], d.sqrt_recipm1_alphas_cumprod[t]
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    direction = np.sqrt(1 - a_prev - sigma**2)
    A = np.sqrt(a_prev) * (r - rm1 * k) + direction * k
    B = (np.sqrt(a_prev) * rm1 - direction) * k * np.sqrt(a) * MU
    m, var = A * m + B, A * A * var + sigma**2
  return m, np.sqrt(var)


@pytest.mark.parametrize("eta, respacing", [(1.0, ""), (0.0, "50")])
def test_ddim_sampler_reproduces_gaussian_data(eta, respacing):
  d = GaussianDiffusion.create(1000, "linear", respacing=respacing)
  x_T = jax.random.normal(jax.random.PRNGKey(1), (4096, 2, 2, 1))
  sample = jax.jit(
    lambda x, k: sample_loop(
      lambda x_t, tm: _optimal_denoiser(x_t, tm, 0.0), x, k, d, sampler="ddim", eta=eta
    )
  )
  x_0 = np.asarray(sample(x_T, jax.random.PRNGKey(2))).ravel()
  mean, std = _ddim_chain_moments(d, eta)
  if eta == 1.0:
    # eta = 1 over the full schedule is DDPM with the posterior variance: the
    # same law as the DDPM chain at v = -1, and close to the data's.
    ddpm_mean, ddpm_std = _chain_moments(d, -1.0)
    assert abs(mean - ddpm_mean) < 1e-9 and abs(std - ddpm_std) < 1e-9
    assert abs(mean - MU) < 1e-4 and abs(std - S) < 0.02
  else:
    # eta = 0 is the deterministic probability-flow map; at 50 steps its
    # discretisation moves the law a little (here mean 0.4985, std 0.472 for
    # the data's 0.5 and 0.5; DDPM at 50 steps: std 0.443 or 0.518).
    assert abs(mean - MU) < 5e-3 and abs(std - S) < 0.04
  n = x_0.size  # 4 standard errors, as for DDPM above
  assert abs(x_0.mean() - mean) < 4 * std / np.sqrt(n)
  assert abs(x_0.std() - std) < 4 * std / np.sqrt(2 * n)
