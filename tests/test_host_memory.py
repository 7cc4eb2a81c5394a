"""cli.keep_host_memory: XLA:CPU's per-run temporaries stop page-faulting in
again on every call, counted by the kernel (getrusage's minor faults)."""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

# A program whose temporaries are one 64 MiB block ([8192, 2048] float32, the
# product between the two dots), run 4 rounds of 8 calls after 24 warm-up
# calls (the heap grows to its steady size in the first dozen); it prints
# keep_host_memory's answer and the minor page faults per call of the quietest
# round: with another process busy beside it, as under `pytest -n 2`, a kept
# heap now and then faults 2,000-4,300 pages per call for one round and 0 in
# the others (2 of 8 runs beside a pytest on 2026-12-07; CI failed once on
# such a round), where glibc's defaults fault in the whole block every round.
_PROGRAM = textwrap.dedent("""
    import resource, sys
    from monoformer_jax import cli
    kept = cli.keep_host_memory()
    import jax, jax.numpy as jnp
    a = jnp.ones((8192, 64), jnp.float32)
    b = jnp.ones((64, 2048), jnp.float32)
    c = jnp.ones((2048, 8), jnp.float32)
    f = jax.jit(lambda a, b, c: jnp.sin(a @ b) @ c)
    for _ in range(24):
      f(a, b, c).block_until_ready()
    rounds = []
    for _ in range(4):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      for _ in range(8):
        f(a, b, c).block_until_ready()
      rounds.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)
    print(kept, min(rounds))
""")
_PAGES = 8192 * 2048 * 4 // 4096  # the block's 4 KiB pages

# Every test starts Python processes.
pytestmark = [
  pytest.mark.slow,
  pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only"),
]


def _python(program: str, **env) -> list[str]:
  """`program`'s output words, run in a fresh Python with `env` on top of
  this environment less any malloc settings of its own."""
  environ = {
    k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")
  }
  run = subprocess.run(
    [sys.executable, "-c", program],
    cwd=REPO,
    env={**environ, **env},
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert run.returncode == 0, run.stderr[-2000:]
  return run.stdout.split()


def _faults_per_call(**env) -> tuple[bool, float]:
  kept, faults = _python(_PROGRAM, **env)[-2:]
  return kept == "True", float(faults)


def test_kept_memory_is_not_faulted_in_again_and_a_users_malloc_settings_win():
  # glibc's defaults (the user set MALLOC_ARENA_MAX): every call maps the
  # block afresh and touches each page.
  kept, faults = _faults_per_call(MALLOC_ARENA_MAX="8")
  assert not kept
  if faults < 0.5 * _PAGES:
    pytest.skip(
      f"this jaxlib reuses its temporaries itself ({faults:.0f} faults per call "
      f"of {_PAGES} pages): keep_host_memory has nothing to keep"
    )
  kept, faults = _faults_per_call()
  assert kept
  assert faults < 0.05 * _PAGES, f"{faults:.0f} minor faults per call of {_PAGES} pages"


@pytest.mark.parametrize(
  "platforms, expected", [("tpu", "False"), ("cuda,cpu", "False"), ("cpu", "True")]
)
def test_only_a_process_that_computes_on_the_cpu_is_tuned(platforms, expected):
  program = "from monoformer_jax import cli; print(cli.keep_host_memory())"
  assert _python(program, JAX_PLATFORMS=platforms)[-1] == expected
