"""Value checks for what a user sets: config fields, flags and keyword arguments.

Each check returns the value (as the type it names) or raises one
`ConfigError` naming the field, its value, what is allowed and the fix. A
field is named as the user wrote it: `model.hidden_size` for a config field
(the message says `--config.model.hidden_size=`), `--num_steps` for a flag,
`num_steps` for a keyword argument.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from monoformer_jax.errors import ConfigError


def fail(field: str, value: Any, allowed: str, fix: str | None = None):
  raise ConfigError(f"{field}={value!r}: {allowed}" + (f"; {fix}" if fix else ""))


def flag_of(field: str) -> str:
  """How a user sets `field`: `--config.x.y` for config fields, as given for flags."""
  return field if field.startswith("--") else f"--config.{field}"


def integer(
  field: str, value, *, low: int | None = None, high: int | None = None, fix: str | None = None
) -> int:
  """`value` as an int in [low, high]."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    fail(field, value, "must be an integer", fix)
  if (low is not None and value < low) or (high is not None and value > high):
    bounds = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
    fail(
      field,
      value,
      f"must be {bounds}",
      fix or f"pass e.g. {flag_of(field)}={low if low is not None and value < low else high}",
    )
  return int(value)


def real(
  field: str,
  value,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
  fix: str | None = None,
) -> float:
  """`value` as a finite float in the interval (an open end excludes its bound)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    fail(field, value, "must be a number", fix)
  value = float(value)
  if not math.isfinite(value):
    fail(field, value, "must be a finite number", fix)
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and (value >= high if high_open else value > high)
  if too_low or too_high:
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    interval = (
      f"in {lo}, {hi}"
      if lo and hi
      else f"{'>' if low_open else '>='} {low:g}"
      if lo
      else f"{'<' if high_open else '<='} {high:g}"
    )
    fail(field, value, f"must be {interval}", fix)
  return value


def boolean(field: str, value) -> bool:
  if not isinstance(value, bool):
    fail(field, value, "must be True or False")
  return value


def text(field: str, value) -> str:
  if not isinstance(value, str):
    fail(field, value, "must be a string")
  return value


def one_of(field: str, value, allowed: Iterable, fix: str | None = None):
  allowed = tuple(allowed)
  if value not in allowed:
    fail(field, value, f"must be one of {allowed}", fix)
  return value


def strings(field: str, value) -> tuple[str, ...]:
  """A list or tuple of strings, never one string (whose letters would be taken)."""
  if (
    isinstance(value, str)
    or not isinstance(value, (list, tuple))
    or not all(isinstance(v, str) for v in value)
  ):
    fail(field, value, "must be a list of strings", f"e.g. {flag_of(field)}=\"('a', 'b')\"")
  return tuple(value)


# ------------------------------------------------------ sampling arguments
#
# `prefix` is how the caller names its arguments: 'sample.' for config fields,
# '--' for flags, '' for the keyword arguments of the Python API.


def _named(prefix: str):
  """(the name of argument n, how a user sets it to v) for a caller's `prefix`."""
  name = lambda n: f"{prefix}{n}"
  # A keyword argument's string value is written as Python writes it: sampler='ddim'.
  value = lambda v: repr(v) if isinstance(v, str) and not prefix else v
  setter = lambda n, v: f"{flag_of(name(n)) if prefix.endswith('.') else name(n)}={value(v)}"
  return name, setter


def check_image_sampling(
  *,
  num_steps,
  cfg_scale,
  num_timesteps: int | None,
  eta: float = 0.0,
  num_samples: int = 1,
  sampler: str | None = None,
  guided_channels: int | None = None,
  channels: int | None = None,
  prefix: str = "",
):
  """Image sampling arguments (`num_timesteps`: the most steps, None for any).
  `eta` is DDIM's, so a non-zero one needs
  `sampler` 'ddim' (when the sampler is given); `guided_channels` (None: all)
  must be within the model's `channels` (when given)."""
  name, setter = _named(prefix)
  integer(
    name("num_steps"),
    num_steps,
    low=1,
    high=num_timesteps,
    fix=None
    if num_timesteps is None
    else f"the schedule has diffusion.num_timesteps={num_timesteps} steps to respace",
  )
  if cfg_scale is not None:
    real(name("cfg_scale"), cfg_scale, low=0, fix="0 (or None in Python) turns guidance off")
  real(name("eta"), eta, low=0, fix="DDIM's eta: 0 is deterministic, 1 the posterior noise")
  if eta and sampler is not None and sampler != "ddim":
    fail(
      name("eta"),
      eta,
      f"is DDIM's noise, which the {sampler!r} sampler does not use",
      f"pass {setter('sampler', 'ddim')} or leave {name('eta')} out"
      if sampler == "ddpm"  # an iddpm model's other sampler; flow's are deterministic
      else f"leave {name('eta')} out",
    )
  integer(name("num_samples"), num_samples, low=1, fix=f"e.g. {setter('num_samples', 1)}")
  if guided_channels is None:
    return
  # The CLI's one way to set it is --guide_eps_0_to_2 (3 channels, the reference's).
  what = "--guide_eps_0_to_2" if prefix == "--" else "guided_channels"
  fix = "leave it out to guide every channel"
  integer(what, guided_channels, low=1, fix=fix)
  if channels is not None and guided_channels > channels:
    fail(
      what,
      True if prefix == "--" else guided_channels,
      f"guides {guided_channels} epsilon channels, but the model has model.in_channels={channels}",
      fix,
    )


def check_text_sampling(
  *, max_new_tokens, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, prefix: str = ""
):
  """Text generation arguments, named as `check_image_sampling` names them;
  `max_new_tokens` None is "as many as the trained rows hold" (the sampler's budget check)."""
  name, setter = _named(prefix)
  if max_new_tokens is not None:
    integer(
      name("max_new_tokens"), max_new_tokens, low=1, fix=f"e.g. {setter('max_new_tokens', 16)}"
    )
  real(name("temperature"), temperature, low=0, fix="0 is greedy")
  integer(name("top_k"), top_k, low=0, fix="0 keeps every token")
  real(name("top_p"), top_p, low=0, high=1, low_open=True, fix="1 keeps every token")


# What jax.random.PRNGKey takes: a 64-bit integer.
SEED_RANGE = (-(2**63), 2**63 - 1)


def check_seed(seed, prefix: str = "") -> int:
  """A sampler's seed: an int (the same seed, the same samples). None is
  refused rather than read as "a fresh random seed": a run that cannot be
  repeated should say so in its code."""
  name, setter = _named(prefix)
  return integer(
    name("seed"),
    seed,
    low=SEED_RANGE[0],
    high=SEED_RANGE[1],
    fix=f"e.g. {setter('seed', 0)}: the same seed gives the same samples; for fresh ones pass "
    "a new seed on every call (e.g. random.randrange(2**63))",
  )


def check_prompts(prompts, what: str = "prompts") -> list:
  """A list of strings (or None for the null prompt), never one string; each
  string must be text a tokenizer can encode (UTF-8: no lone surrogates, which
  is how Python keeps undecodable bytes of a command line or file)."""
  if isinstance(prompts, str):
    raise ConfigError(
      f"{what} must be a list of strings, got the string {prompts!r}; pass [{prompts!r}]"
    )
  try:
    prompts = list(prompts)
  except TypeError:
    raise ConfigError(f"{what} must be a list of strings, got {prompts!r}") from None
  bad = [p for p in prompts if p is not None and not isinstance(p, str)]
  if bad:
    raise ConfigError(f"{what} must be strings (or None for the empty prompt), got {bad[:3]}")
  if not prompts:
    raise ConfigError(f"{what} is empty: give at least one")
  for i, p in enumerate(prompts):
    try:
      (p or "").encode("utf-8")
    except UnicodeEncodeError as e:
      raise ConfigError(
        f"{what}[{i}]={p!r} is not UTF-8 text (character {e.start}, {p[e.start]!r}, is a byte "
        "that no UTF-8 decoding gave); save the prompt as UTF-8"
      ) from None
  return prompts
