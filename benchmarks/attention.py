"""Mixed-mask attention: Pallas kernels vs the dense XLA reference vs jax.nn.

    python benchmarks/attention.py                      # every length, this machine
    python benchmarks/attention.py --lengths=512 --impls=xla,jax_nn --batch=2

Layouts (`--lengths`): 512 is the reference's row, one example of a 16-token
prompt, 256 image tokens and the end marker, padded; 2048 and 8192 are packed
rows of such image examples alternating with text-only examples of 40-400
tokens. For each impl it times the forward and forward+backward (median of
`--iters` after a compile and a warm-up), and reports the fraction of
(query block, key block) pairs the kernel computes and TFLOP/s for the useful
work: 4*D FLOPs per allowed (query, key) pair per head forward, 2.5 times that
backward. Impls: `pallas` (the kernels, compiled: on CPU it is left out, as
interpret mode measures Python, not the kernel), `xla` (xla_attention, dense
under the mixed mask), `jax_nn` (jax.nn.dot_product_attention with the dense
mask, XLA's choice of implementation) and `cudnn` (the same asking for cuDNN's
fused kernel; NVIDIA GPUs only, and a call cuDNN refuses is a row saying why).
Results go to stdout and, with --output, into a section of that markdown file.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import report
from absl import flags

from monoformer_jax.data.packing import pack_examples
from monoformer_jax.layout import Example, RowSpec
from monoformer_jax.ops.attention import block_map, live_fraction, mixed_mask
from monoformer_jax.ops.attention.pallas import backend_for, kernel_config, pallas_attention
from monoformer_jax.ops.attention.xla import xla_attention

_LENGTHS = flags.DEFINE_list("lengths", ["512", "2048", "8192"], "row lengths")
_IMPLS = flags.DEFINE_list(
  "impls",
  ["pallas", "xla", "jax_nn", "cudnn"],
  "what to time (cudnn: jax.nn's on NVIDIA GPUs only)",
)
_BATCH = flags.DEFINE_integer("batch", 0, "rows per call; 0: 16384 tokens per call")
_HEADS = flags.DEFINE_integer("heads", 32, "query heads (TinyLlama: 32)")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 4, "kv heads (TinyLlama: 4)")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "head dim (TinyLlama: 64)")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "inputs")
_ITERS = flags.DEFINE_integer("iters", 10, "timed calls per measurement")
_BLOCK_Q = flags.DEFINE_integer("block_q", 0, "0: the backend's default")
_BLOCK_K = flags.DEFINE_integer("block_k", 0, "0: the backend's default")
_OUTPUT = flags.DEFINE_string("output", "docs/benchmarks.md", "markdown file ('' for none)")

PROMPT, IMAGE = 16, 256
TOKEN, IMAGE_ID = 1, 2  # token ids do not matter here, only the layout


def layout(length: int, rng) -> tuple[np.ndarray, np.ndarray]:
  """(segment_ids, image_ids) [L] of one row (see the module docstring), packed
  by data.packing from the reference's image example (a prompt of PROMPT
  tokens, the image, the end marker) and text examples."""
  examples, used = [], 0
  while True:
    is_image = len(examples) % 2 == 0
    n = PROMPT + IMAGE + 1 if is_image else int(rng.integers(40, 401))
    if used + n > length:
      break
    examples.append(
      Example([TOKEN] * PROMPT + [IMAGE_ID, TOKEN], [np.zeros((1, 1, 1))])
      if is_image
      else Example([TOKEN] * n)
    )
    used += n
    if length <= 512:
      break
  spec = RowSpec(
    seq_len=length,
    max_images=len(examples),
    image_shape=(1, 1, 1),
    tokens_per_image=IMAGE,
    image_id=IMAGE_ID,
    pad_id=0,
  )
  batch = pack_examples(examples, spec)
  assert batch["tokens"].shape[0] == 1, "the examples were chosen to fill one row"
  return batch["segment_ids"][0], batch["image_ids"][0]


def _impls(seg, img):
  bq, bk = _BLOCK_Q.value or None, _BLOCK_K.value or None
  mask_Bx1xLxL = None

  def jax_nn(q, k, v, implementation=None):
    return jax.nn.dot_product_attention(q, k, v, mask=mask_Bx1xLxL, implementation=implementation)

  # The kernel of this machine, named: a benchmark runs where it measures.
  backend = backend_for(jax.default_backend())
  table = {
    "pallas": lambda q, k, v: pallas_attention(
      q, k, v, seg, img, backend=backend, block_q=bq, block_k=bk, interpret=False
    ),
    "xla": lambda q, k, v: xla_attention(q, k, v, seg, img),
    "jax_nn": jax_nn,
    "cudnn": lambda q, k, v: jax_nn(q, k, v, implementation="cudnn"),
  }
  if {"jax_nn", "cudnn"} & set(_IMPLS.value):
    mask_Bx1xLxL = mixed_mask(seg, img)[:, None]
  return table


def measure(length: int):
  rng = np.random.default_rng(0)
  b = _BATCH.value or max(1, 16384 // length)
  rows = [layout(length, rng) for _ in range(b)]
  seg = jnp.asarray(np.stack([r[0] for r in rows]))
  img = jnp.asarray(np.stack([r[1] for r in rows]))
  h, kv, d = _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
  dtype = jnp.dtype(_DTYPE.value)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(keys[0], (b, length, h, d), dtype)
  k = jax.random.normal(keys[1], (b, length, kv, d), dtype)
  v = jax.random.normal(keys[2], (b, length, kv, d), dtype)
  dout = jax.random.normal(keys[3], (b, length, h, d), dtype)
  allowed_pairs = int(mixed_mask(seg, img).sum())
  fwd_flops = 4 * d * h * allowed_pairs
  cfg = kernel_config(
    backend_for(jax.default_backend()),
    block_q=_BLOCK_Q.value or None,
    block_k=_BLOCK_K.value or None,
    interpret=False,
  )
  fraction = float(
    live_fraction(
      block_map(seg, img, q_len=length, q_offset=0, block_q=cfg.block_q, block_k=cfg.block_k)
    )
  )
  results = []
  for name, fn in _impls(seg, img).items():
    if name not in _IMPLS.value:
      continue
    if name == "pallas" and jax.default_backend() == "cpu":
      print(f"  {length}: pallas skipped on CPU (interpret mode is not a kernel timing)")
      continue
    if name == "cudnn" and jax.default_backend() != "gpu":
      print(f"  {length}: cudnn skipped on {jax.default_backend()} (NVIDIA GPUs only)")
      continue
    fwd = jax.jit(fn)
    fwd_bwd = jax.jit(lambda q, k, v, dout, fn=fn: jax.vjp(fn, q, k, v)[1](dout))
    try:
      t_fwd = report.median_seconds(fwd, q, k, v, iters=_ITERS.value)
      t_both = report.median_seconds(fwd_bwd, q, k, v, dout, iters=_ITERS.value)
    except Exception as error:  # e.g. cuDNN refusing a mask or a head count: a row, not a stop
      failure = " ".join(str(error).split())[:160]
      print(f"  {length}: {name} failed: {failure}", flush=True)
      results.append(dict(length=length, batch=b, impl=name, failed=failure))
      continue
    results.append(
      dict(
        length=length,
        batch=b,
        impl=name,
        fwd_ms=1e3 * t_fwd,
        fwd_bwd_ms=1e3 * t_both,
        fwd_tflops=fwd_flops / t_fwd / 1e12,
        fwd_bwd_tflops=3.5 * fwd_flops / t_both / 1e12,
        blocks=fraction if name == "pallas" else 1.0,
        allowed=allowed_pairs / (b * length * length),
      )
    )
    print(
      "  "
      + "  ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in results[-1].items()
      ),
      flush=True,
    )
  return results, fraction, allowed_pairs / (b * length * length)


def write_markdown(path: pathlib.Path, results, fractions, command):
  lines = [
    f"Command: `{command}`",
    "",
    f"Hardware: {report.hardware()}. Heads {_HEADS.value} (kv {_KV_HEADS.value}), head "
    f"dim {_HEAD_DIM.value}, {_DTYPE.value}. Median of {_ITERS.value} calls.",
    "",
    "| row | allowed pairs | blocks computed (pallas) |",
    "|---|---|---|",
  ]
  for length, (fraction, allowed) in fractions.items():
    lines.append(f"| {length} | {allowed:.1%} | {fraction:.1%} |")
  lines += [
    "",
    "| row x batch | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s |",
    "|---|---|---|---|---|---|",
  ]
  for r in results:
    if "failed" in r:
      lines.append(f"| {r['length']} x {r['batch']} | {r['impl']} | failed: {r['failed']} | | | |")
      continue
    lines.append(
      f"| {r['length']} x {r['batch']} | {r['impl']} | {r['fwd_ms']:.2f} | "
      f"{r['fwd_bwd_ms']:.2f} | {r['fwd_tflops']:.3g} | {r['fwd_bwd_tflops']:.3g} |"
    )
  if jax.default_backend() == "cpu":
    lines += [
      "",
      "The Pallas kernels have no CPU timing (interpret mode runs them in "
      "Python); run this command on a TPU or GPU to fill in their rows.",
    ]
  report.write_section(path, "Attention", lines)


def main(argv):
  del argv
  results, fractions = [], {}
  for length in map(int, _LENGTHS.value):
    print(f"row length {length}:", flush=True)
    rows, fraction, allowed = measure(length)
    results += rows
    fractions[length] = (fraction, allowed)
  if _OUTPUT.value:
    command = "python " + " ".join(sys.argv)
    write_markdown(pathlib.Path(_OUTPUT.value), results, fractions, command)


if __name__ == "__main__":
  report.run(main)
