"""Train-step speed at the shapes of ../shared/bench/README.md, against this
machine's own dense matmul rate.

    python benchmarks/train_step.py                 # S1 and S2
    python benchmarks/train_step.py --shapes=S2 --iters=10
    python benchmarks/train_step.py --shapes=digits  # the README main job's step
    python benchmarks/train_step.py --dots=12        # and each shape's 12 slowest matmuls

For each shape: the forward pass with the loss, the gradient (forward and
backward), and the whole train step (gradient, clip, AdamW, EMA, the health
check: train/step.py), float32, XLA attention, one image per row with a
12-token prompt, no padding, random weights; model FLOPs from perf.py (6 per
weight per token plus attention; the forward a third of it) and the rate they
give, next to the rate XLA reaches here on a plain [B*L, E] x [E, mlp] matmul,
and the step's matmul floor: every dot_general of the gradient timed alone at
its own shapes and summed (`matmul_floor`; the batched attention matmuls and
the transposed operands of the backward run slower here than the plain one).
With `--official_src` (the reference's source tree) and `--official_python` (a
Python with torch 2.13 and transformers 4.38, ../shared/bench/README.md) the
reference's step at S1 and S2 is timed too, right after ours on the same
machine, by ../shared/bench/official_bench.py (its model compute: --max_pos
128, --ema, 2 threads), and the table gets its column and the ratio:

    python benchmarks/train_step.py --official_src=/tmp/official_src \
        --official_python=/tmp/torch-venv/bin/python
`digits` is configs/digits.py itself on a batch of its own stream (packed
rows of digits, sentences, readings, interleaved examples and edits).
"""

from __future__ import annotations

import collections
import math
import pathlib
import re
import subprocess
import sys

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import report
from absl import flags

from monoformer_jax import perf
from monoformer_jax.config import config_file
from monoformer_jax.data.packing import pack_examples
from monoformer_jax.diffusion.gaussian import from_config
from monoformer_jax.layout import HOST_KEYS, Example, row_spec
from monoformer_jax.model.build import abstract_model
from monoformer_jax.parallel import sharding
from monoformer_jax.text.tokenizer import ByteTokenizer
from monoformer_jax.train.state import create_train_state, make_optimizer
from monoformer_jax.train.step import healthy, make_loss_fn, make_train_step

# hidden, layers, heads, kv heads, mlp, latent side, batch (../shared/bench/README.md)
SHAPES = {"S1": (256, 4, 8, 4, 688, 8, 32), "S2": (512, 8, 8, 4, 1376, 16, 8)}
PROMPT_LEN = 12

_SHAPES = flags.DEFINE_list("shapes", ["S1", "S2"], "shapes to time (S1, S2, digits)")
_ITERS = flags.DEFINE_integer("iters", 5, "timed calls per figure (median)")
_DOTS = flags.DEFINE_integer(
  "dots", 0, "also list each shape's N slowest matmuls (the floor's parts)"
)
_OUTPUT = flags.DEFINE_string("output", "docs/benchmarks.md", "markdown file ('' for none)")
_OFFICIAL_SRC = flags.DEFINE_string(
  "official_src", "", "the reference's source tree ('': not timed)"
)
_OFFICIAL_PYTHON = flags.DEFINE_string(
  "official_python", "python3", "a Python with torch and transformers for the reference"
)
_OFFICIAL_BENCH = flags.DEFINE_string(
  "official_bench",
  str(
    pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "official_bench.py"
  ),
  "../shared/bench/official_bench.py",
)


def shape_config(name: str):
  if name == "digits":
    c = config_file("digits")
    c.mesh.update(data=1, fsdp=1, tensor=1)
    return c
  hidden, layers, heads, kv, mlp, latent, batch = SHAPES[name]
  c = config_file("digits")
  c.model.update(
    hidden_size=hidden,
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=kv,
    head_dim=hidden // heads,
    mlp_dim=mlp,
    image_size=latent,
    in_channels=4,
    patch_size=2,
    attention_impl="xla",
    dtype="float32",
    remat=False,
    scan_unroll=layers,
  )  # every layer unrolled, as configs/digits.py does
  tokens = (latent // 2) ** 2
  c.data.update(seq_len=PROMPT_LEN + tokens + 5, batch_size=batch, max_images_per_row=1)
  c.optim.update(lr=1e-4, warmup_steps=0, grad_clip=2.0, ema_decay=0.9999)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  return c


def shape_batch(config, name: str):
  """One image example per row: <s>, 12 prompt tokens, <|im_start|>, the image,
  <|im_end|>, "\\n", </s>: exactly seq_len tokens (the digits: a batch of
  their stream)."""
  tok = ByteTokenizer()
  if name == "digits":
    from monoformer_jax.data.packing import PackedBatches
    from monoformer_jax.digits.source import digits_example_stream

    batches = PackedBatches(
      digits_example_stream(config, tok, config.seed),
      rows=config.data.batch_size,
      spec=row_spec(config, tok),
    )
    return {k: jnp.asarray(v) for k, v in next(batches).items() if k not in HOST_KEYS}
  spec = row_spec(config, tok)
  rng = np.random.default_rng(0)
  examples = []
  for _ in range(config.data.batch_size):
    ids = (
      [tok.bos_id]
      + rng.integers(3, 259, PROMPT_LEN).tolist()
      + [tok.im_start_id, tok.image_id, tok.im_end_id]
      + tok.encode("\n")
      + [tok.eos_id]
    )
    examples.append(
      Example(ids, [rng.normal(size=spec.image_shape).astype(np.float32)], train_text=True)
    )
  batch = pack_examples(examples, spec, one_per_row=True)
  assert (batch["segment_ids"] > 0).all(), "rows must be exactly full"
  return {k: jnp.asarray(v) for k, v in batch.items() if k not in HOST_KEYS}  # the model's


def matmul_rate(m: int, k: int, n: int, iters: int) -> float:
  """FLOP/s of one jitted [m, k] x [k, n] float32 matmul (median of `iters`
  timings of 10 calls each)."""
  a = jnp.asarray(np.random.default_rng(1).normal(size=(m, k)), jnp.float32)
  b = jnp.asarray(np.random.default_rng(2).normal(size=(k, n)), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  ten = lambda a, b: [f(a, b) for _ in range(10)][-1]
  return 2 * m * k * n * 10 / report.median_seconds(ten, a, b, iters=iters)


def program_dots(jaxpr, times: int = 1, found=None) -> collections.Counter:
  """The dot_generals a program runs: (lhs shape, rhs shape, dtype, dimension
  numbers) -> how many times. Nested calls are entered, a scan's body counts
  `length` times, and of a cond's branches the one with the fewest FLOPs is
  counted (the LM head's capacities), so the floor below stays a floor."""
  found = collections.Counter() if found is None else found
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs, rhs = (v.aval for v in eqn.invars)
      (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
      dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
      found[(lhs.shape, rhs.shape, str(lhs.dtype), dims)] += times
    elif name == "cond":
      branches = [program_dots(b.jaxpr) for b in eqn.params["branches"]]
      for dot, n in min(branches, key=dot_flops).items():
        found[dot] += n * times
    elif name == "while":
      raise ValueError("program_dots: a while loop's trip count is not static")
    else:
      length = eqn.params["length"] if name == "scan" else 1
      for sub in jex.core.jaxprs_in_params(eqn.params):
        program_dots(sub, times * length, found)
  return found


def dot_flops(dots: collections.Counter) -> float:
  """2 x batch x free(lhs) x free(rhs) x contracted, summed over `dots`."""
  total = 0.0
  for (lhs, rhs, _, ((lc, rc), (lb, rb))), n in dots.items():
    free = lambda shape, *used: math.prod(d for i, d in enumerate(shape) if i not in sum(used, ()))
    total += (
      2.0
      * n
      * math.prod(lhs[i] for i in lb)
      * math.prod(lhs[i] for i in lc)
      * free(lhs, lc, lb)
      * free(rhs, rc, rb)
    )
  return total


def matmul_floor(fn, *args, iters: int) -> tuple[float, float, list[dict]]:
  """(seconds, FLOPs, each dot) of the matmuls `fn(*args)` runs, each
  dot_general timed alone at its own shapes (jitted, random operands, median
  of `iters`) and summed: what the program would take if everything but its
  matmuls were free and each ran at this machine's speed for its shape. Each
  dot: its `dot` key (program_dots), `count`, and `seconds` and `flops` for
  all its calls."""
  dots = program_dots(jax.make_jaxpr(fn)(*args).jaxpr)
  rng = np.random.default_rng(0)
  each = []
  for dot, n in dots.items():
    lhs, rhs, dtype, dims = dot
    a = jnp.asarray(rng.normal(size=lhs), dtype)
    b = jnp.asarray(rng.normal(size=rhs), dtype)
    one = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims))
    each.append(
      dict(
        dot=dot,
        count=n,
        seconds=n * report.median_seconds(one, a, b, iters=iters),
        flops=dot_flops({dot: n}),
      )
    )
  return sum(d["seconds"] for d in each), dot_flops(dots), each


def dot_table(name: str, each: list[dict], plain_rate: float, top: int) -> list[str]:
  """Markdown rows of the `top` dots of `each` (matmul_floor) that take the
  longest, with their rate against the plain matmul's."""
  top = min(top, len(each))
  lines = [
    f"{name}: the {top} slowest of its {len(each)} matmul shapes, "
    f"{sum(d['seconds'] for d in each) * 1e3:.0f} ms in all",
    "",
    "| lhs | rhs | contracting, batch dims | calls | ms, all calls | GFLOP/s | "
    "of the plain matmul's |",
    "|---|---|---|---|---|---|---|",
  ]
  for d in sorted(each, key=lambda d: -d["seconds"])[:top]:
    lhs, rhs, _, ((lc, rc), (lb, rb)) = d["dot"]
    rate = d["flops"] / d["seconds"]
    lines.append(
      f"| {list(lhs)} | {list(rhs)} | {list(lc)}x{list(rc)}, {list(lb)}x{list(rb)} | "
      f"{d['count']} | {d['seconds'] * 1e3:.1f} | {rate / 1e9:.0f} | "
      f"{rate / plain_rate:.0%} |"
    )
  return lines + [""]


def time_shape(name: str, iters: int) -> dict:
  config = shape_config(name)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh), sharding.logical_rules(config.sharding_rules):
    tx, schedule = make_optimizer(config.optim)
    graphdef, state, shardings = create_train_state(config, mesh, tx)
    batch = shape_batch(config, name)
    diffusion = from_config(config.diffusion)
    loss_fn = make_loss_fn(graphdef, diffusion, config)
    key = jax.random.PRNGKey(0)
    params = state["params"]
    forward = jax.jit(lambda p, b: loss_fn(p, b, key)[0])
    grad = jax.jit(lambda p, b: jax.grad(lambda p: loss_fn(p, b, key)[0])(p))
    t_forward = report.median_seconds(forward, params, batch, iters=iters)
    t_grad = report.median_seconds(grad, params, batch, iters=iters)
    batch_sh = sharding.batch_sharding(mesh, config.sharding_rules, 1)
    step = make_train_step(graphdef, diffusion, config, tx, schedule, shardings, batch_sh)
    health = healthy()
    holder = dict(state=state)

    def one_step():
      holder["state"], metrics, _ = step(holder["state"], batch, health)
      return metrics["loss"]

    t_step = report.median_seconds(one_step, iters=iters)
  rows, length = config.data.batch_size, config.data.seq_len
  flops = perf.train_flops_per_row(config.model, length) * rows
  m = config.model
  rate = matmul_rate(rows * length, m.hidden_size, m.mlp_dim, iters)
  with jax.set_mesh(mesh), sharding.logical_rules(config.sharding_rules):
    floor, dot_flops_, dots = matmul_floor(grad, params, batch, iters=iters)
  params_n = sum(x.size for x in jax.tree.leaves(abstract_model(m)[1]))
  return dict(
    name=name,
    rows=rows,
    length=length,
    params=params_n,
    forward=t_forward,
    grad=t_grad,
    step=t_step,
    flops=flops,
    matmul=rate,
    floor=floor,
    dot_flops=dot_flops_,
    dots=dots,
  )


def official_step(name: str) -> float | None:
  """The reference's median train step (seconds) at shape `name`, or None
  when not asked for (or not an S shape)."""
  if not _OFFICIAL_SRC.value or name not in SHAPES:
    return None
  hidden, layers, heads, kv, mlp, latent, batch = SHAPES[name]
  args = dict(
    hidden=hidden,
    layers=layers,
    heads=heads,
    kv_heads=kv,
    mlp=mlp,
    latent=latent,
    prompt_len=PROMPT_LEN,
    batch=batch,
    vocab=264,
    threads=2,
    max_pos=128,
  )
  command = [
    _OFFICIAL_PYTHON.value,
    _OFFICIAL_BENCH.value,
    "--src",
    _OFFICIAL_SRC.value,
    "--mode",
    "train",
    "--ema",
  ] + [f"--{k}={v}" for k, v in args.items()]
  print("reference:", " ".join(command), flush=True)
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  found = re.search(r"train: median ([\d.]+) ms/step", done.stdout)
  if done.returncode or not found:
    raise RuntimeError(
      f"the reference's benchmark failed (exit {done.returncode}): "
      f"{(done.stderr or done.stdout)[-2000:]}"
    )
  return float(found.group(1)) / 1e3


def main(argv):
  del argv
  results = []
  for name in _SHAPES.value:
    results.append(time_shape(name, _ITERS.value))
    results[-1]["official"] = official_step(name)
  with_official = any(r["official"] for r in results)
  lines = [
    f"Command: `python {' '.join(sys.argv)}`",
    "",
    f"Hardware: {report.hardware()}. Median of {_ITERS.value} calls after a compile "
    "and a warm-up; float32, XLA attention, random weights."
    + (
      " The reference's step: official_bench.py (torch, 2 threads, its median of 10 "
      "steps after 2 warm-ups), run right after ours at each shape."
      if with_official
      else ""
    ),
    "",
    "| shape | rows x tokens | params | forward + loss | gradient | train step | "
    "gradient / forward | step GFLOP | step GFLOP/s | matmul GFLOP/s | share of matmul | "
    "its matmuls alone (floor) | floor / step |"
    + (" reference's step | our speed / reference's |" if with_official else ""),
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if with_official else ""),
  ]
  for r in results:
    achieved = r["flops"] / r["step"]
    official = ""
    if with_official:
      official = (
        f" {r['official'] * 1e3:.0f} ms | {r['official'] / r['step']:.2f}x |"
        if r["official"]
        else " | |"
      )
    lines.append(
      f"| {r['name']} | {r['rows']} x {r['length']} | {r['params'] / 1e6:.2f}M | "
      f"{r['forward'] * 1e3:.0f} ms | {r['grad'] * 1e3:.0f} ms | {r['step'] * 1e3:.0f} ms | "
      f"{r['grad'] / r['forward']:.2f} | {r['flops'] / 1e9:.1f} | {achieved / 1e9:.0f} | "
      f"{r['matmul'] / 1e9:.0f} | {achieved / r['matmul']:.0%} | "
      f"{r['floor'] * 1e3:.0f} ms ({r['dot_flops'] / 1e9:.1f} GFLOP) | "
      f"{r['floor'] / r['step']:.0%} |" + official
    )
  if _DOTS.value:
    lines.append("")
    for r in results:
      lines += dot_table(r["name"], r["dots"], r["matmul"], _DOTS.value)
  print("\n".join(lines))
  if _OUTPUT.value:
    report.write_section(pathlib.Path(_OUTPUT.value), "Train step", lines)


if __name__ == "__main__":
  report.run(main)
