"""Gaussian diffusion as in IDDPM/ADM (and DiT, and MonoFormer): the numbers.

A model's process is `from_config(config.diffusion, respacing)`: the
schedule the config names (`BETAS`, one entry per name of
config.schema.BETA_SCHEDULES), respaced for sampling.

Conventions:
- Channels LAST: latents are x_BxhxwxC (any [B, ..., C]); a model output is
  [B, ..., 2C] with [..., :C] the epsilon prediction and [..., C:] the
  learned-range variance values v in [-1, 1]. Every loss reduces over all
  non-batch axes and returns one number per sample, [B].
- `t` arguments are int [B] indices into THIS object's tables. After
  respacing they are respaced indices; the network must see
  `model_timesteps(t)`, the original 0..T-1 timesteps (`timestep_map`).
- Tables are float64 numpy; a coefficient is gathered and cast to float32
  before it touches a tensor, as the reference does, so float32 inputs
  reproduce its numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.config.schema import SAMPLERS as SAMPLERS_OF
from monoformer_jax.diffusion.flow import FlowMatching
from monoformer_jax.errors import ConfigError


def linear_betas(num_timesteps: int) -> np.ndarray:
  """IDDPM's linear schedule: 1e-4 .. 0.02 at T=1000, scaled by 1000/T."""
  scale = 1000 / num_timesteps  # keeps the schedule's shape for any T
  return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


# The betas of each schedule a config may name (config.schema.BETA_SCHEDULES):
# name -> betas float64 [T] of T = num_timesteps.
BETAS: dict[str, Callable[[int], np.ndarray]] = {"linear": linear_betas}


def space_timesteps(
  num_timesteps: int, section_counts: str | int | Sequence[int] | None
) -> list[int]:
  """Original timesteps kept by respacing, sorted ("" or None: all of them).

  `section_counts` is an int, a string "20" or "10,15,20" / a list of ints
  (that many steps, evenly strided, in each of as many equal sections), or
  "ddimN" (a fixed integer stride giving exactly N steps).
  """
  if section_counts is None or section_counts == "":
    return list(range(num_timesteps))
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      want = int(section_counts[len("ddim") :])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == want:
          return list(range(0, num_timesteps, stride))
      raise ValueError(
        f"respacing {section_counts!r}: no integer stride gives exactly "
        f"{want} steps of {num_timesteps}; use a plain count like '{want}'"
      )
    section_counts = [int(x) for x in section_counts.split(",")]
  elif isinstance(section_counts, int):
    section_counts = [section_counts]
  per, extra = divmod(num_timesteps, len(section_counts))
  kept, start = [], 0
  for i, count in enumerate(section_counts):
    size = per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(
        f"respacing {section_counts!r}: cannot take {count} steps from a "
        f"section of {size} of the {num_timesteps} timesteps"
      )
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    # Accumulated, not stride * j: the rounding must match the reference's
    # float sums exactly or a kept step can move by one.
    pos = 0.0
    for _ in range(count):
      kept.append(start + round(pos))
      pos += stride
    start += size
  return sorted(set(kept))


class GaussianDiffusion:
  """Schedule tables (float64 numpy) and the math on them (jit-friendly jnp)."""

  SAMPLERS = SAMPLERS_OF["iddpm"]

  def __init__(self, betas: np.ndarray, timestep_map: np.ndarray):
    self.betas = betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
      raise ValueError(f"betas must be a 1-D array in (0, 1], got shape {betas.shape}")
    self.timestep_map = np.asarray(timestep_map, np.int64)
    if self.timestep_map.shape != betas.shape:
      raise ValueError(f"timestep_map {self.timestep_map.shape} must match betas {betas.shape}")
    self.num_timesteps = len(betas)
    alphas = 1.0 - betas
    self.alphas_cumprod = ac = np.cumprod(alphas)
    self.alphas_cumprod_prev = ac_prev = np.append(1.0, ac[:-1])
    self.alphas_cumprod_next = np.append(ac[1:], 0.0)
    self.sqrt_alphas_cumprod = np.sqrt(ac)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
    self.log_one_minus_alphas_cumprod = np.log(1.0 - ac)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
    self.posterior_variance = var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # The posterior variance is 0 at t = 0: its log uses the t = 1 value there
    # (a one-step schedule has none: beta_0, the largest it could be; the
    # step at t = 0 adds no noise, so only its finiteness matters).
    first = var[1] if len(var) > 1 else betas[0]
    self.posterior_log_variance_clipped = np.log(np.append(first, var[1:]))
    self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
    self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
    self.log_betas = np.log(betas)

  # Equal schedules are equal objects, so a jitted sampler that takes one as a
  # static argument compiles once per schedule, not once per object.
  def _key(self):
    return (self.betas.tobytes(), self.timestep_map.tobytes())

  def __eq__(self, other):
    return isinstance(other, GaussianDiffusion) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  @classmethod
  def create(
    cls,
    num_timesteps: int = 1000,
    beta_schedule: str = "linear",
    respacing: str | int | Sequence[int] | None = None,
  ) -> GaussianDiffusion:
    """The T-step schedule `beta_schedule` (a name of `BETAS`), optionally
    respaced (e.g. "20": 20 sampling steps). A model's process comes from its
    config through `from_config`."""
    if beta_schedule not in BETAS:
      raise ConfigError(
        f"diffusion.beta_schedule={beta_schedule!r} has no betas; choose one of {sorted(BETAS)}"
      )
    ac = np.cumprod(1.0 - BETAS[beta_schedule](num_timesteps))
    kept = space_timesteps(num_timesteps, respacing)
    # Betas re-derived so alphas_cumprod is exact at the kept steps. Done even
    # without respacing (it moves betas by ~1e-16), as the reference does.
    last, new_betas = 1.0, []
    for i in kept:
      new_betas.append(1.0 - ac[i] / last)
      last = ac[i]
    return cls(np.array(new_betas), np.array(kept))

  # ---------------------------------------------------------------- helpers
  @staticmethod
  def _at(table: np.ndarray, t, x):
    """table[t] as float32, shaped [B, 1, ...] to broadcast against x [B, ...]."""
    v = jnp.asarray(np.asarray(table, np.float32))[t]
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))

  def model_timesteps(self, t):
    """Original timesteps (what the network is conditioned on) of indices t."""
    return jnp.asarray(self.timestep_map.astype(np.int32))[t]

  def draw_timesteps(self, key, shape):
    """Training indices int32 `shape`, uniform over 0..T-1."""
    return jax.random.randint(key, shape, 0, self.num_timesteps)

  @staticmethod
  def prediction_channels(total: int) -> int:
    """Of a model output's `total` channels, those guidance combines: the
    epsilon half (the other half is the learned variance)."""
    return total // 2

  @staticmethod
  def _split(model_output, x_t):
    c = x_t.shape[-1]
    if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != 2 * c:
      raise ValueError(
        f"model_output {model_output.shape} must be x_t {x_t.shape} with "
        f"2*{c} channels (epsilon, then learned-range variance), channels last"
      )
    return model_output[..., :c], model_output[..., c:]

  # ------------------------------------------------------------ forward q
  def q_sample(self, x_start, t, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
    return (
      self._at(self.sqrt_alphas_cumprod, t, x_start) * x_start
      + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
    )

  def q_posterior_mean_variance(self, x_start, x_t, t):
    """(mean, variance, clipped log variance) of q(x_{t-1} | x_t, x_0)."""
    mean = (
      self._at(self.posterior_mean_coef1, t, x_t) * x_start
      + self._at(self.posterior_mean_coef2, t, x_t) * x_t
    )
    shape = x_t.shape
    return (
      mean,
      jnp.broadcast_to(self._at(self.posterior_variance, t, x_t), shape),
      jnp.broadcast_to(self._at(self.posterior_log_variance_clipped, t, x_t), shape),
    )

  # ------------------------------------------------------------ reverse p
  def p_mean_variance(self, model_output, x_t, t, clip_denoised: bool = False):
    """Mean, variance, log-variance and x_0 prediction of p(x_{t-1} | x_t)."""
    eps, v = self._split(model_output, x_t)
    min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
    max_log = self._at(self.log_betas, t, x_t)
    frac = (v + 1) / 2
    log_variance = frac * max_log + (1 - frac) * min_log
    pred_xstart = (
      self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
      - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1, 1)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
    return dict(
      mean=mean, variance=jnp.exp(log_variance), log_variance=log_variance, pred_xstart=pred_xstart
    )

  def p_sample(self, model_output, x_t, t, noise, clip_denoised: bool = False):
    """One ancestral step: x_{t-1} = mean + (t != 0) * sigma * noise."""
    out = self.p_mean_variance(model_output, x_t, t, clip_denoised)
    nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return dict(
      sample=out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise,
      pred_xstart=out["pred_xstart"],
    )

  def ddim_sample(self, model_output, x_t, t, noise, eta: float = 0.0):
    """One DDIM step (Song et al.): x_{t-1} from the x_0 prediction and the
    epsilon it implies; the learned variance is unused. eta = 0 is
    deterministic; eta = 1 draws the posterior variance, making the step equal
    to DDPM's with variance values v = -1."""
    out = self.p_mean_variance(model_output, x_t, t)
    eps = (self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - out["pred_xstart"]) / self._at(
      self.sqrt_recipm1_alphas_cumprod, t, x_t
    )
    ac, ac_prev = self.alphas_cumprod, self.alphas_cumprod_prev
    sigma = eta * np.sqrt((1 - ac_prev) / (1 - ac)) * np.sqrt(1 - ac / ac_prev)
    direction = np.sqrt(np.maximum(1 - ac_prev - sigma**2, 0.0))
    mean = (
      out["pred_xstart"] * self._at(np.sqrt(ac_prev), t, x_t) + self._at(direction, t, x_t) * eps
    )
    nonzero = (t != 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return dict(
      sample=mean + nonzero * self._at(sigma, t, x_t) * noise, pred_xstart=out["pred_xstart"]
    )

  # ---------------------------------------------------------------- losses
  def training_losses(self, model_output, x_start, x_t, t, noise):
    """IDDPM's hybrid loss per sample [B]: mse, vb (bits/dim) and their sum.

    L_vb trains only the variance: the eps channels enter it stop-gradiented,
    so the mean is learnt from the MSE alone. At t == 0 L_vb is the
    discretised decoder NLL of x_0 instead of a KL.
    """
    eps, v = self._split(model_output, x_t)
    axes = tuple(range(1, x_t.ndim))
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
    true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance(frozen, x_t, t)
    kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
    kl = kl.mean(axis=axes) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(
      x_start, out["mean"], 0.5 * out["log_variance"]
    ).mean(axis=axes) / math.log(2.0)
    vb = jnp.where(t == 0, nll, kl)
    mse = ((noise - eps) ** 2).mean(axis=axes)
    return dict(mse=mse, vb=vb, loss=mse + vb)

  # ------------------------------------------------------------- sampling
  def sample_step(
    self,
    denoise_fn: Callable,
    x_t,
    i,
    key,
    *,
    sampler: str | None = None,
    eta: float = 0.0,
    row_keys: bool = False,
  ):
    """Step i of a sampling loop (0 = the first, noisiest): x_{t-1} from x_t at
    index t = T' - 1 - i of the (respaced) steps, with the noise of
    fold_in(key, i) (with `row_keys`, `key` holds one key per row [B] and row
    b's noise is fold_in(key[b], i)'s, whatever else shares the batch).
    `denoise_fn(x_t, t_model) -> model_output [B, ..., 2C]` gets the ORIGINAL
    timesteps (timestep_map of the index), int32 [B]; `i` may be traced.
    `sampler` None: 'ddpm'."""
    sampler = sampler or self.SAMPLERS[0]
    if sampler not in self.SAMPLERS:
      raise ValueError(f"sampler={sampler!r}: an IDDPM model samples with one of {self.SAMPLERS}")
    t = jnp.full((x_t.shape[0],), self.num_timesteps - 1 - i, jnp.int32)
    out = denoise_fn(x_t, self.model_timesteps(t))
    if row_keys:
      noise = jax.vmap(
        lambda k: jax.random.normal(jax.random.fold_in(k, i), x_t.shape[1:], x_t.dtype)
      )(key)
    else:
      noise = jax.random.normal(jax.random.fold_in(key, i), x_t.shape, x_t.dtype)
    if sampler == "ddpm":
      return self.p_sample(out, x_t, t, noise)["sample"]
    return self.ddim_sample(out, x_t, t, noise, eta)["sample"]


def from_config(
  diffusion_cfg, respacing: str | int | Sequence[int] | None = None
) -> GaussianDiffusion | FlowMatching:
  """The diffusion process of a config's `diffusion` section, for sampling
  with `respacing` steps (e.g. "20"; None: what training uses). Every model's
  process is built here, so training and every sampler run the same one.

  objective 'iddpm': the num_timesteps steps of its beta_schedule, respaced;
  'flow': `FlowMatching` with its settings and `respacing` ODE steps (a
  count; None: num_timesteps, which training does not use)."""
  if diffusion_cfg.objective == "flow":
    steps = diffusion_cfg.num_timesteps if respacing in (None, "") else respacing
    if isinstance(steps, str) and steps.isdigit():
      steps = int(steps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
      raise ConfigError(
        f"respacing={respacing!r}: a flow model samples with a count of steps >= 1 "
        "(e.g. '20'), not sections or 'ddimN'"
      )
    return FlowMatching(
      steps,
      time_scale=diffusion_cfg.num_timesteps,
      shift=diffusion_cfg.shift,
      time_distribution=diffusion_cfg.time_distribution,
      logit_mean=diffusion_cfg.logit_mean,
      logit_scale=diffusion_cfg.logit_scale,
      loss_weighting=diffusion_cfg.loss_weighting,
    )
  return GaussianDiffusion.create(
    diffusion_cfg.num_timesteps, diffusion_cfg.beta_schedule, respacing=respacing
  )


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (
    -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
  )


def _approx_standard_normal_cdf(x):
  # The tanh approximation IDDPM uses, not erf: kept for identical numbers.
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-likelihood (nats, elementwise) of x in [-1, 1] under a Gaussian
  discretised to 8-bit bins of width 2/255; the edge bins take the tails."""
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(
    x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
  )


def apply_cfg(out_cond, out_uncond, scale, guided_channels: int | None = None, predicted=None):
  """Classifier-free guidance on model outputs [B, ..., 2C]; returns the guided
  output of the conditional half.

  The eps channels become uncond + scale * (cond - uncond); the variance
  channels stay the conditional ones. `guided_channels=3` guides only eps
  channels 0..2 (the reference, a DiT legacy) and leaves the rest of the
  conditional output raw.
  """
  return apply_guidance([out_cond, out_uncond], [scale], guided_channels, predicted)


def apply_guidance(outs, scales, guided_channels: int | None = None, predicted: int | None = None):
  """Guidance over a chain of conditions, each dropping more than the one before.

  `outs` [G] model outputs [B, ..., 2C]: outs[0] fully conditioned, outs[G-1]
  the least (e.g. [text and image, image only, nothing]); `scales` [G - 1].
  The eps channels become
      outs[G-1] + sum_g scales[g] * (outs[g] - outs[g + 1]),
  the variance channels stay outs[0]'s. G = 2 is classifier-free guidance;
  G = 3 with (text scale, image scale) is InstructPix2Pix's two-scale
  guidance. All scales 1 give outs[0]. `guided_channels` as in `apply_cfg`.
  `predicted`: how many leading channels are the prediction (the process's
  `prediction_channels`; None: half, IDDPM's epsilon; a flow model's velocity
  is all of them), the rest taken from outs[0].
  """
  if len(outs) < 2 or len(scales) != len(outs) - 1:
    raise ValueError(
      f"guidance needs G >= 2 outputs and G - 1 scales, got {len(outs)} "
      f"outputs and {len(scales)} scales"
    )
  shape = outs[0].shape
  if any(o.shape != shape for o in outs) or (predicted is None and shape[-1] % 2):
    raise ValueError(
      f"guided outputs {[o.shape for o in outs]} must be equal shapes [B, ..., 2C] (channels last)"
    )
  c = shape[-1] // 2 if predicted is None else predicted
  g = c if guided_channels is None else guided_channels
  if not 0 <= g <= c:
    raise ValueError(
      f"guided_channels={guided_channels} must be in 0..{c} (the predicted channels)"
    )
  eps = [o[..., :g] for o in outs]
  guided = eps[-1]
  for k, scale in enumerate(scales):
    guided = guided + scale * (eps[k] - eps[k + 1])
  return jnp.concatenate([guided, outs[0][..., g:]], axis=-1)


# Every sampler of either objective (each process's own: its SAMPLERS).
SAMPLERS = GaussianDiffusion.SAMPLERS + FlowMatching.SAMPLERS


def sample_step(
  denoise_fn: Callable,
  x_t,
  i,
  key,
  diffusion: GaussianDiffusion | FlowMatching,
  *,
  sampler: str | None = None,
  eta: float = 0.0,
  row_keys: bool = False,
):
  """Step i of a sampling loop of `diffusion` (0 = the first, noisiest): its
  own `sample_step` (GaussianDiffusion's or FlowMatching's); `sampler` None is
  the process's default (ddpm; euler)."""
  return diffusion.sample_step(denoise_fn, x_t, i, key, sampler=sampler, eta=eta, row_keys=row_keys)


def sample_loop(
  denoise_fn: Callable,
  x_T,
  key,
  diffusion: GaussianDiffusion | FlowMatching,
  *,
  sampler: str | None = None,
  eta: float = 0.0,
  progress: Callable | None = None,
):
  """x_0 from x_T through all of `diffusion`'s (respaced) steps, in one program.

  `sampler`: 'ddpm' (ancestral, with the learned variance; the reference) or
  'ddim' (with `eta`); 'euler' or 'heun' for a flow process; None: the
  process's default. `denoise_fn` as in `sample_step`. One compiled step,
  scanned from the last index to 0. `progress`, if given, is called on the host
  with each finished step's loop index (0 = the first, noisiest step).
  """
  sampler = sampler or diffusion.SAMPLERS[0]
  if sampler not in diffusion.SAMPLERS:
    raise ValueError(f"sampler={sampler!r}: this process samples with one of {diffusion.SAMPLERS}")

  def step(x_t, i):
    x_prev = sample_step(denoise_fn, x_t, i, key, diffusion, sampler=sampler, eta=eta)
    if progress is not None:
      jax.debug.callback(progress, i)
    return x_prev, None

  x_0, _ = jax.lax.scan(step, x_T, jnp.arange(diffusion.num_timesteps))
  return x_0
