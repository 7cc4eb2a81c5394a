"""What every benchmark shares: timing a jitted call and writing its section of
docs/benchmarks.md (one section per benchmark and hardware, replaced on rerun)."""

from __future__ import annotations

import datetime
import pathlib
import platform
import statistics
import time

import jax
from absl import app

from monoformer_jax import cli


def run(main):
  """`absl.app.run(main)` for a benchmark, with the host memory kept between
  steps as `python -m monoformer_jax.train` keeps it (cli.keep_host_memory):
  the figures are the ones a user's run gets."""
  cli.keep_host_memory()
  app.run(main)


def median_seconds(fn, *args, iters: int) -> float:
  """Median wall time of `fn(*args)` over `iters` calls, after a compile and a warm-up."""
  jax.block_until_ready(fn(*args))  # compile
  jax.block_until_ready(fn(*args))  # warm-up
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def device_kind() -> str:
  device = jax.devices()[0]
  return getattr(device, "device_kind", device.platform)


def hardware() -> str:
  return (
    f"{device_kind()} ({jax.default_backend()}, {jax.device_count()} device(s)), host "
    f"{platform.processor() or platform.machine()}, jax {jax.__version__}"
  )


def write_section(path: pathlib.Path, title: str, lines: list[str]):
  """Puts `## {title} ({device kind}, date)` and `lines` into the markdown file,
  replacing that title's earlier section for the same device kind."""
  heading = f"## {title} ({device_kind()},"
  section = "\n".join([f"{heading} {datetime.date.today().isoformat()})", ""] + lines) + "\n"
  text = path.read_text() if path.exists() else "# Benchmarks\n\n"
  if heading in text:
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    text = text[:start] + section + ("" if end == -1 else "\n" + text[end + 1 :])
  else:
    text = text.rstrip("\n") + "\n\n" + section
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  print(f"wrote {path}")


def paper_layout_cpu_model():
  """The paper's sampling layout (32x32x4 latents, patch 2: 256 image tokens)
  with a 4-layer, 256-wide model that runs on a CPU."""
  import ml_collections

  from monoformer_jax.config import config_file

  m = ml_collections.ConfigDict(config_file("digits").model.to_dict())
  m.update(
    vocab_size=264,
    hidden_size=256,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    mlp_dim=704,
    image_size=32,
    in_channels=4,
    patch_size=2,
  )
  return m


def random_model(model_cfg):
  """A model with freshly initialised weights (its heads' zeros included)."""
  from flax import nnx

  from monoformer_jax.model.build import abstract_model, init_params

  graphdef, _, _ = abstract_model(model_cfg)
  return nnx.merge(graphdef, jax.jit(lambda: init_params(model_cfg, seed=0))())
