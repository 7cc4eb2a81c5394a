"""What every benchmark shares: timing a jitted call and writing its section of
docs/benchmarks.md (one section per benchmark and hardware, replaced on rerun)."""

from __future__ import annotations

import datetime
import pathlib
import platform
import statistics
import time

import jax


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
  return (f"{device_kind()} ({jax.default_backend()}, {jax.device_count()} device(s)), host "
          f"{platform.processor() or platform.machine()}, jax {jax.__version__}")


def write_section(path: pathlib.Path, title: str, lines: list[str]):
  """Puts `## {title} ({device kind}, date)` and `lines` into the markdown file,
  replacing that title's earlier section for the same device kind."""
  heading = f"## {title} ({device_kind()},"
  section = "\n".join([f"{heading} {datetime.date.today().isoformat()})", ""] + lines) + "\n"
  text = path.read_text() if path.exists() else "# Benchmarks\n\n"
  if heading in text:
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    text = text[:start] + section + ("" if end == -1 else text[end + 1:])
  else:
    text = text.rstrip("\n") + "\n\n" + section
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  print(f"wrote {path}")
