"""Flow matching (rectified flow): the `diffusion.objective='flow'` process.

The path from data to noise is a straight line,

    x_t = (1 - t) x_0 + t noise,   t in [0, 1]  (t = 0: the data; 1: noise),

and the model predicts its velocity v = dx_t/dt = noise - x_0 (channels last,
[B, ..., C]: no learned variance). Training draws t logit-normal or uniform
and minimises the (optionally weighted) velocity MSE; sampling integrates the
ODE from t = 1 to 0 with Euler or Heun steps on the shifted time grid

    t_k = s u_k / (1 + (s - 1) u_k),  u_k = 1 - k / N,  k = 0..N

(s = diffusion.shift; s > 1 spends more of the N steps at high noise, SD3's
resolution shift). The network sees t * `time_scale` (the config's
num_timesteps), the range of the IDDPM timesteps, so a read image (t = 0) is
embedded as the clean image it is under both objectives.

The object has the interface the trainers and samplers use of
`GaussianDiffusion` (`num_timesteps` the number of sampling steps,
`draw_timesteps`, `model_timesteps`, `q_sample`, `training_losses`,
`prediction_channels`, `sample_step`, SAMPLERS); `from_config` makes both.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.config.schema import SAMPLERS


def shifted_times(num_steps: int, shift: float) -> np.ndarray:
  """The N + 1 sampling times float64 [N + 1], from 1 (noise) down to 0 (data)."""
  u = 1.0 - np.arange(num_steps + 1, dtype=np.float64) / num_steps
  return shift * u / (1.0 + (shift - 1.0) * u)


class FlowMatching:
  """A linear data-to-noise path, its training times and loss, its ODE steps."""

  SAMPLERS = SAMPLERS["flow"]

  def __init__(
    self,
    num_steps: int,
    *,
    time_scale: float = 1000.0,
    shift: float = 1.0,
    time_distribution: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_scale: float = 1.0,
    loss_weighting: str = "none",
  ):
    if num_steps < 1:
      raise ValueError(f"num_steps={num_steps}: a flow sampler needs at least 1 step")
    self.num_timesteps = int(num_steps)  # sampling steps (the samplers' loop length)
    self.time_scale = float(time_scale)
    self.shift = float(shift)
    self.time_distribution = time_distribution
    self.logit_mean, self.logit_scale = float(logit_mean), float(logit_scale)
    self.loss_weighting = loss_weighting
    self.times = shifted_times(self.num_timesteps, self.shift)

  # Equal settings are equal objects: a jitted sampler taking one as a static
  # argument compiles once per setting (as GaussianDiffusion).
  def _key(self):
    return (
      self.num_timesteps,
      self.time_scale,
      self.shift,
      self.time_distribution,
      self.logit_mean,
      self.logit_scale,
      self.loss_weighting,
    )

  def __eq__(self, other):
    return isinstance(other, FlowMatching) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())

  # ---------------------------------------------------------------- training
  def draw_timesteps(self, key, shape):
    """Training times float32 `shape` in (0, 1): sigmoid(mean + scale * N(0, 1)) or U(0, 1)."""
    if self.time_distribution == "uniform":
      return jax.random.uniform(key, shape, jnp.float32)
    z = jax.random.normal(key, shape, jnp.float32)
    return jax.nn.sigmoid(self.logit_mean + self.logit_scale * z)

  def model_timesteps(self, t):
    """What the network is conditioned on at times t: t * time_scale, float32."""
    return jnp.asarray(t, jnp.float32) * self.time_scale

  @staticmethod
  def _per_row(t, x):
    t = jnp.asarray(t, jnp.float32)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))

  def q_sample(self, x_start, t, noise):
    """x_t = (1 - t) x_0 + t noise, t float [B]."""
    t = self._per_row(t, x_start)
    return (1.0 - t) * x_start + t * noise

  @staticmethod
  def prediction_channels(total: int) -> int:
    """Of a model output's `total` channels, those guidance combines: all (the velocity)."""
    return total

  def weight(self, t):
    """The loss weight of times t [B]: 1, or SD3's cosmap 2 / (pi (1 - 2t + 2t^2))."""
    t = jnp.asarray(t, jnp.float32)
    if self.loss_weighting == "cosmap":
      return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t * t))
    return jnp.ones_like(t)

  def training_losses(self, model_output, x_start, x_t, t, noise):
    """Per sample [B]: mse (the velocity's, unweighted), vb (0: there is no
    variance to learn) and loss (mse times the weight of t)."""
    if model_output.shape != x_t.shape:
      raise ValueError(
        f"model_output {model_output.shape} must be x_t's {x_t.shape}: a flow model "
        "predicts the velocity alone (model.learn_sigma=False)"
      )
    axes = tuple(range(1, x_t.ndim))
    mse = ((noise - x_start - model_output) ** 2).mean(axis=axes)
    return dict(mse=mse, vb=jnp.zeros_like(mse), loss=self.weight(t) * mse)

  # ---------------------------------------------------------------- sampling
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
    """Step i (0 = the first, from t = 1) of the ODE from times[i] to
    times[i + 1]: Euler, or Heun (the Euler step's end re-evaluated, the
    two velocities averaged; two model calls). Deterministic: `key`,
    `eta` and `row_keys` are the stochastic samplers' and unused here."""
    del key, row_keys
    sampler = sampler or self.SAMPLERS[0]
    if sampler not in self.SAMPLERS:
      raise ValueError(f"sampler={sampler!r}: a flow model samples with one of {self.SAMPLERS}")
    if eta:
      raise ValueError(f"eta={eta} is DDIM's noise; the flow samplers are deterministic")
    times = jnp.asarray(self.times.astype(np.float32))
    t_now, t_next = times[i], times[i + 1]
    at = lambda t: jnp.full((x_t.shape[0],), t * self.time_scale, jnp.float32)
    v_now = denoise_fn(x_t, at(t_now))
    x_euler = x_t + (t_next - t_now) * v_now
    if sampler == "euler":
      return x_euler
    v_next = denoise_fn(x_euler, at(t_next))
    return x_t + (t_next - t_now) * 0.5 * (v_now + v_next)
