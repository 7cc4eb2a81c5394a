r"""The Pallas attention kernels, compiled, against the dense XLA attention.

    python benchmarks/kernel_check.py                   # on a GPU or TPU: compiled kernels
    python benchmarks/kernel_check.py --interpret --lengths=256 --heads=4 --kv_heads=2 \
        --head_dim=32 --output=''                       # anywhere: the kernels interpreted

The unit tests run the kernels in interpret mode on 128-token rows; this runs
the kernel the platform compiles (Triton on GPU, Mosaic on TPU; `--backend`
picks another, `--interpret` interprets it) on rows of the real sizes. For
each dtype and row length, `--rows` rows of random packed layouts (`random_row`:
examples of 1 to 600 tokens holding up to two images of 4 to 256 tokens each,
some rows ending in padding, one row the reference's image example padded to
the length) and random q, k, v and output cotangent. Two query layouts: every
token of the row, and the row's last quarter as queries against the whole row
(a cached call, as sampling makes). The kernel's output and its gradients dq,
dk, dv are compared with `xla_attention`'s, computed in float32 at full matmul
precision from the same (rounded) inputs; error = max |got - want| / max |want|
per tensor. It passes under 1e-4 for float32 (the kernels differ only in
summation order: ~1e-6) and 2e-2 for bfloat16 (both sides round the
probabilities to bfloat16 for P.V, in another order); one key block wrongly
dropped or kept moves it by 1e-1 or more. Exits 1 when any comparison fails
or is not finite. Results go to stdout, `--json`, and with `--output` into a
section of that markdown file.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import report
from absl import flags

from monoformer_jax.ops.attention.pallas import backend_for, pallas_attention
from monoformer_jax.ops.attention.xla import xla_attention

_LENGTHS = flags.DEFINE_list("lengths", ["512", "2048"], "row lengths")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "input dtypes")
_ROWS = flags.DEFINE_integer("rows", 4, "rows per call (layouts drawn per row)")
_HEADS = flags.DEFINE_integer("heads", 32, "query heads (TinyLlama: 32)")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 4, "kv heads (TinyLlama: 4)")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "head dim (TinyLlama: 64)")
_BACKEND = flags.DEFINE_string("backend", "", "'tpu' or 'gpu'; '': the platform's own")
_INTERPRET = flags.DEFINE_bool("interpret", False, "interpret the kernels (any platform)")
_SEED = flags.DEFINE_integer("seed", 0, "layouts and inputs")
_JSON = flags.DEFINE_string("json", "", "write the results as JSON here ('' for none)")
_OUTPUT = flags.DEFINE_string("output", "docs/benchmarks.md", "markdown file ('' for none)")

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
PAPER_EXAMPLE = 16 + 256 + 1  # the reference's row: a class prompt, the image, the end


def random_row(rng, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(segment_ids, image_ids) [L] of one packed row: examples one after another
  from token 0, numbered from 1, each of 1 to 600 tokens with up to two images
  of 4 to 256 tokens (image ids numbered along the row from 1), until the row is
  full or, for one row in four, until 1 to 64 tokens of padding are left."""
  seg, img = np.zeros(length, np.int32), np.zeros(length, np.int32)
  end = length - (int(rng.integers(1, 65)) if rng.random() < 0.25 else 0)
  at, example, image = 0, 0, 0
  while at < end:
    n = min(int(rng.integers(1, 601)), end - at)
    example += 1
    seg[at : at + n] = example
    start = at + int(rng.integers(0, 24))
    for _ in range(int(rng.integers(0, 3))):
      size = int(rng.integers(4, 257))
      if start + size > at + n:
        break
      image += 1
      img[start : start + size] = image
      start += size + int(rng.integers(1, 16))
    at += n
  return seg, img


def paper_row(length: int) -> tuple[np.ndarray, np.ndarray]:
  """The reference's image example (16 prompt tokens, 256 image tokens, the end
  marker) then padding to `length`."""
  seg, img = np.zeros(length, np.int32), np.zeros(length, np.int32)
  seg[:PAPER_EXAMPLE] = 1
  img[16 : 16 + 256] = 1
  return seg, img


def layouts(rows: int, length: int, rng) -> tuple[np.ndarray, np.ndarray]:
  """[rows, L] ids: the first row the reference's example (when it fits), the
  rest `random_row`."""
  drawn = [
    paper_row(length) if r == 0 and length >= PAPER_EXAMPLE else random_row(rng, length)
    for r in range(rows)
  ]
  return np.stack([s for s, _ in drawn]), np.stack([i for _, i in drawn])


def error(got, want) -> float:
  """max |got - want| / max |want| in float32 (inf when got is not finite)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if not np.isfinite(got).all():
    return float("inf")
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def compare(kernel, seg, img, q, k, v, dout) -> dict[str, float]:
  """Errors of `kernel(q, k, v, segment_ids, image_ids, q_offset=None)`'s output
  and its gradients (the vjp of `dout`) against xla_attention's in float32 at
  full precision on the same inputs."""

  def out_and_grads(attend, q, k, v, dout):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seg, img), q, k, v)
    return out, vjp(dout)

  out, grads = jax.jit(functools.partial(out_and_grads, kernel))(q, k, v, dout)
  up = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    want_out, want = jax.jit(functools.partial(out_and_grads, xla_attention))(
      up(q), up(k), up(v), up(dout)
    )
  return dict(
    out=error(out, want_out),
    **{name: error(g, w) for name, g, w in zip(("dq", "dk", "dv"), grads, want)},
  )


def run(lengths, dtypes, rows, heads, kv_heads, head_dim, backend, interpret, seed):
  """One result per (dtype, length, query layout): its errors, whether they pass."""
  rng = np.random.default_rng(seed)
  kernel = functools.partial(pallas_attention, backend=backend, interpret=interpret)
  results = []
  for dtype in dtypes:
    for length in lengths:
      seg, img = map(jnp.asarray, layouts(rows, length, rng))
      for queries in ("row", "last quarter"):
        lq = length if queries == "row" else length // 4
        keys = jax.random.split(jax.random.PRNGKey(int(rng.integers(2**31))), 4)
        make = lambda key, shape, dtype=dtype: jax.random.normal(key, shape, jnp.float32).astype(
          dtype
        )
        q = make(keys[0], (rows, lq, heads, head_dim))
        k = make(keys[1], (rows, length, kv_heads, head_dim))
        v = make(keys[2], (rows, length, kv_heads, head_dim))
        dout = make(keys[3], (rows, lq, heads, head_dim))
        start = time.perf_counter()
        errors = compare(kernel, seg, img, q, k, v, dout)
        worst = max(errors.values())
        results.append(
          dict(
            dtype=dtype,
            length=length,
            queries=queries,
            rows=rows,
            **errors,
            worst=worst,
            tolerance=TOLERANCE[dtype],
            passed=bool(worst <= TOLERANCE[dtype]),
            seconds=time.perf_counter() - start,
          )
        )
        print(
          f"  {dtype} L={length} queries={queries}: "
          + "  ".join(f"{n} {errors[n]:.2e}" for n in ("out", "dq", "dk", "dv"))
          + f"  {'ok' if results[-1]['passed'] else 'FAILED'} "
          f"(tolerance {TOLERANCE[dtype]:g})",
          flush=True,
        )
  return results


def markdown(results, what: str, command: str) -> list[str]:
  lines = [
    f"Command: `{command}`",
    "",
    f"Hardware: {report.hardware()}. {what}: output and gradients against "
    "`xla_attention` in float32 at full precision on the same inputs; "
    "max |error| / max |reference| per tensor (benchmarks/kernel_check.py says how the "
    "layouts are drawn).",
    "",
    "| dtype | row length | queries | rows | out | dq | dk | dv | tolerance | |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    lines.append(
      f"| {r['dtype']} | {r['length']} | {r['queries']} | {r['rows']} | "
      + " | ".join(f"{r[n]:.1e}" for n in ("out", "dq", "dk", "dv"))
      + f" | {r['tolerance']:g} | {'ok' if r['passed'] else '**FAILED**'} |"
    )
  return lines


def main(argv):
  del argv
  backend = _BACKEND.value or backend_for(jax.default_backend())
  compiled = not _INTERPRET.value
  what = f"the {backend} kernels {'compiled' if compiled else 'interpreted'}"
  print(
    f"{what}, {_HEADS.value} heads / {_KV_HEADS.value} kv heads, head dim {_HEAD_DIM.value}:",
    flush=True,
  )
  results = run(
    [int(n) for n in _LENGTHS.value],
    _DTYPES.value,
    _ROWS.value,
    _HEADS.value,
    _KV_HEADS.value,
    _HEAD_DIM.value,
    backend,
    _INTERPRET.value,
    _SEED.value,
  )
  if _JSON.value:
    pathlib.Path(_JSON.value).write_text(json.dumps(dict(what=what, results=results), indent=1))
  if _OUTPUT.value:
    report.write_section(
      pathlib.Path(_OUTPUT.value),
      "Pallas kernels against XLA",
      markdown(results, what, "python " + " ".join(sys.argv)),
    )
  failed = [r for r in results if not r["passed"]]
  if failed:
    print(f"{len(failed)} of {len(results)} comparisons FAILED", flush=True)
    sys.exit(1)
  print(f"all {len(results)} comparisons passed", flush=True)


if __name__ == "__main__":
  report.run(main)
