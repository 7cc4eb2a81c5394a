"""The device check's own parts (benchmarks/kernel_check.py, paper_step.py, gpu.py)."""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from helpers import benchmark_module

from monoformer_jax.ops.attention import mixed_mask
from monoformer_jax.ops.attention.pallas import pallas_attention
from monoformer_jax.ops.attention.xla import xla_attention

kernel_check = benchmark_module("kernel_check")
paper_step = benchmark_module("paper_step")


@pytest.mark.parametrize("seed", range(20))
def test_random_rows_follow_the_packed_row_contract(seed):
  rng = np.random.default_rng(seed)
  seg, img = kernel_check.random_row(rng, 2048)
  used = seg > 0
  n = used.sum()
  assert used[:n].all() and not used[n:].any(), "padding only at the end"
  assert seg[0] == 1 and (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
  images = np.unique(img[img > 0])
  np.testing.assert_array_equal(images, np.arange(1, len(images) + 1))
  for i in images:
    where = np.flatnonzero(img == i)
    assert (np.diff(where) == 1).all() and 4 <= len(where) <= 256
    assert len(np.unique(seg[where])) == 1 and seg[where[0]] > 0, "an image inside one example"
  assert (img[~used] == 0).all()


def test_the_first_row_is_the_references_example():
  seg, img = kernel_check.layouts(3, 512, np.random.default_rng(0))
  assert seg.shape == img.shape == (3, 512)
  assert (seg[0, :273] == 1).all() and (seg[0, 273:] == 0).all()
  assert (img[0, 16:272] == 1).all() and img[0].sum() == 256


def _inputs(seed, rows=2, length=128, lq=128, heads=4, kv=2, d=32, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  make = lambda key, *shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)
  seg, img = map(jnp.asarray, kernel_check.layouts(rows, length, np.random.default_rng(seed)))
  return (
    seg,
    img,
    make(keys[0], rows, lq, heads, d),
    make(keys[1], rows, length, kv, d),
    make(keys[2], rows, length, kv, d),
    make(keys[3], rows, lq, heads, d),
  )


@pytest.mark.parametrize("dtype,lq", [(jnp.float32, 128), (jnp.bfloat16, 32)])
def test_the_interpreted_gpu_kernel_passes_the_check(dtype, lq):
  kernel = functools.partial(
    pallas_attention, backend="gpu", interpret=True, block_q=32, block_k=32
  )
  errors = kernel_check.compare(kernel, *_inputs(1, lq=lq, dtype=dtype))
  tolerance = kernel_check.TOLERANCE[jnp.dtype(dtype).name]
  assert set(errors) == {"out", "dq", "dk", "dv"}
  assert max(errors.values()) <= tolerance, errors
  if dtype == jnp.float32:
    assert max(errors.values()) < 1e-5, errors


def test_the_check_fails_a_kernel_with_a_wrong_mask():
  """Image tokens made causal (their ids dropped), and one key of each row
  hidden from every query: both are far over the float32 tolerance."""
  inputs = _inputs(2)
  causal_images = lambda q, k, v, seg, img: xla_attention(q, k, v, seg, jnp.zeros_like(img))

  def one_key_hidden(q, k, v, seg, img):
    seg = seg.at[:, 3].set(0)
    return xla_attention(q, k, v, seg, img)

  for wrong in (causal_images, one_key_hidden):
    errors = kernel_check.compare(wrong, *inputs)
    assert max(errors.values()) > 100 * kernel_check.TOLERANCE["float32"], errors
  assert mixed_mask(inputs[0], inputs[1]).any()
  nan = lambda q, k, v, seg, img: xla_attention(q, k, v, seg, img) * jnp.nan
  assert kernel_check.compare(nan, *inputs)["out"] == float("inf")


def _plan(total, temporaries):
  return dict(total=total, temporaries=temporaries)


def test_rows_that_fit_from_the_probe_plan():
  # state 10 GiB, 0.5 GiB of temporaries + batch per row, probed at 8 rows
  gib = 2**30
  batch = 8 * 2**20
  probe = _plan(10 * gib + 8 * (gib // 2), 8 * (gib // 2) - batch)
  fit = lambda limit, most=256: paper_step.rows_that_fit(probe, 8, batch, limit * gib, most)
  assert fit(100) == 176  # (100 - 10) / 0.5 = 180, a multiple of 8 below
  assert fit(100, most=100) == 96  # at most max_rows, a multiple of 8
  assert fit(12) == 0  # 4 rows would fit, fewer than 8
  assert fit(14) == 8


def test_class_rows_hold_one_class_example_each():
  config = paper_step.step_config("tiny", None, 8)
  batch = paper_step.class_rows(config)
  tok = paper_step.token_ids(config)
  seg, tokens = batch["segment_ids"], batch["tokens"]
  assert seg.shape == tokens.shape == (8, config.data.seq_len)
  for r in range(8):
    n = int((seg[r] > 0).sum())
    assert (seg[r, :n] == 1).all() and (seg[r, n:] == 0).all()
    row = tokens[r, :n].tolist()
    assert row[0] == tok.bos_id and row[-1] == tok.eos_id
    assert row.count(tok.image_id) == 16, "the tiny variant's 8x8 latents, patch 2"
    assert 8 + 4 + 16 <= n <= 24 + 4 + 16


@pytest.mark.slow
def test_the_step_runs_at_the_most_rows_its_plan_allows():
  """The tiny model under a 50 MiB 'device': the batch chosen from the probe's
  plan fits, and the compiler's plan for 8 rows more does not."""
  result = paper_step.measure(
    "tiny", None, probe_rows=8, max_rows=512, fill=0.9, memory_gib=0.05, iters=1
  )
  limit = 0.9 * 0.05 * 2**30
  assert result["rows"] >= 8 and result["rows"] % 8 == 0
  assert result["plan"]["total"] <= limit
  assert result["attempts"][-1] == dict(result["attempts"][-1], rows=result["rows"], outcome="ran")
  _, more, _ = paper_step.compile_step(paper_step.step_config("tiny", None, result["rows"] + 8))
  assert more["total"] > limit
  assert np.isfinite(result["step_seconds"]) and result["step_seconds"] > 0
  flops = (
    paper_step.train_flops_per_row(paper_step.step_config("tiny", None, 8).model, result["seq_len"])
    * result["rows"]
  )
  assert result["model_tflops"] == pytest.approx(flops / 1e12)


@pytest.mark.slow
def test_the_device_script_runs_a_part_and_reports_it(tmp_path):
  out = subprocess.run(
    [
      sys.executable,
      str(REPO / "benchmarks" / "gpu.py"),
      "--smoke",
      "--only=attention",
      f"--out={tmp_path}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "attention  ok" in out.stdout
  text = (tmp_path / "benchmarks.md").read_text()
  assert "## Attention (cpu," in text and "| 512 x 1 | xla |" in text
  assert "== attention:" in (tmp_path / "gpu.log").read_text()
  bad = subprocess.run(
    [
      sys.executable,
      str(REPO / "benchmarks" / "gpu.py"),
      "--smoke",
      "--only=nothing",
      f"--out={tmp_path}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert bad.returncode != 0 and "no part ['nothing']" in bad.stderr


def test_the_matmul_floor_counts_each_dot_a_program_runs():
  """benchmarks/train_step.py's floor: a scan's body counts its length, of a
  cond's branches the cheaper one, batch dimensions multiply; the FLOPs are
  2 x m x k x n per call, counted here by hand."""
  train_step = benchmark_module("train_step")
  lax = jax.lax

  def program(x_4x8, w_8x8, big_8x64, a_2x3x4, b_2x4x5):
    def layer(x, _):
      return x @ w_8x8, None

    x_4x8, _ = lax.scan(layer, x_4x8, None, length=3)
    head = lax.cond(x_4x8.sum() > 0, lambda x: (x @ big_8x64).sum(), lambda x: x.sum(), x_4x8)
    batched = lax.dot_general(a_2x3x4, b_2x4x5, (((2,), (1,)), ((0,), (0,))))
    return head + batched.sum()

  args = [jnp.ones(s, jnp.float32) for s in [(4, 8), (8, 8), (8, 64), (2, 3, 4), (2, 4, 5)]]
  dots = train_step.program_dots(jax.make_jaxpr(program)(*args).jaxpr)
  assert dots == {
    ((4, 8), (8, 8), "float32", (((1,), (0,)), ((), ()))): 3,
    ((2, 3, 4), (2, 4, 5), "float32", (((2,), (1,)), ((0,), (0,)))): 1,
  }
  flops = 3 * 2 * 4 * 8 * 8 + 2 * 2 * 3 * 4 * 5
  assert train_step.dot_flops(dots) == flops
  seconds, floor_flops, each = train_step.matmul_floor(program, *args, iters=1)
  assert floor_flops == flops and seconds == pytest.approx(sum(d["seconds"] for d in each))
  assert sorted(d["count"] for d in each) == [1, 3] and all(d["seconds"] > 0 for d in each)
  table = train_step.dot_table("toy", each, plain_rate=1e9, top=1)
  assert table[0] == f"toy: the 1 slowest of its 2 matmul shapes, {seconds * 1e3:.0f} ms in all"
  assert len(table) == 6 and table[4].count("|") == 8
  assert train_step.dot_table("toy", each, 1e9, top=5)[0].startswith("toy: the 2 slowest of its 2")
