r"""The paper's model training on one accelerator: the largest batch that fits,
its step time and MFU.

    python benchmarks/paper_step.py                     # one GPU or TPU chip: the 1.1B
    python benchmarks/paper_step.py --remat=False       # without rematerialisation
    python benchmarks/paper_step.py --variant=tiny --memory_gib=0.25 --output=''   # a CPU

The real train step of configs/imagenet256.py (train/step.py: gradient, clip,
AdamW, EMA, the health check; the 1.1B is TinyLlama's decoder, bfloat16
compute, float32 weights and moments, remat, the platform's Pallas attention)
on the first device, on rows of the reference's ImageNet layout: one class
example per row (<s>, a prompt of 8 to 24 tokens, <|im_start|>, the 256 image
tokens, <|im_end|>, </s>), padded to 512 tokens; random weights, tokens and
latents.

The batch: the step is compiled ahead of time (train/aot.lower_train_step) at
`--probe_batch` rows, and the compiler's memory plan (arguments + outputs -
aliased + temporaries + code) is split into what the rows need, taken as
proportional to the rows (the temporaries, the batch), and the rest (the
state). That gives the most rows under `--fill` of the device's memory
(`memory_stats()['bytes_limit']`, or `--memory_gib`), rounded down to a
multiple of 8 and at most `--max_batch`; that step is compiled, its plan
checked against the limit again, and run (a plan over the limit, or a run
out of memory, steps down by an eighth, at most three times). Timed: the
median of `--iters` steps after a warm-up. MFU is model/build.py's FLOPs of
the step (6 per weight per token, plus the attention over all 512 tokens)
over that time at the chip's dense bf16 peak (perf.CHIPS).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import report
from absl import flags

from monoformer_jax import perf
from monoformer_jax.config import config_file
from monoformer_jax.data.packing import pack_examples
from monoformer_jax.layout import HOST_KEYS, Example, batch_shapes, row_spec
from monoformer_jax.model.build import train_flops_per_row
from monoformer_jax.ops.attention import resolve_impl
from monoformer_jax.parallel import sharding
from monoformer_jax.text.tokenizer import ByteTokenizer, Tokenizer
from monoformer_jax.train.aot import lower_train_step, memory_plan
from monoformer_jax.train.state import create_train_state, make_optimizer
from monoformer_jax.train.step import healthy

_VARIANT = flags.DEFINE_string("variant", "", "configs/imagenet256.py's variant ('', tiny, 7b)")
_REMAT = flags.DEFINE_bool("remat", None, "model.remat (default: the config's)")
_PROBE_BATCH = flags.DEFINE_integer("probe_batch", 8, "rows of the compile that sizes the batch")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 256, "at most this many rows (the recipe's 256)")
_FILL = flags.DEFINE_float("fill", 0.9, "share of the device's memory the step may plan for")
_MEMORY_GIB = flags.DEFINE_float(
  "memory_gib", 0.0, "the device's memory; 0: its memory_stats()['bytes_limit']"
)
_ITERS = flags.DEFINE_integer("iters", 5, "timed steps (median)")
_JSON = flags.DEFINE_string("json", "", "write the result as JSON here ('' for none)")
_OUTPUT = flags.DEFINE_string("output", "docs/benchmarks.md", "markdown file ('' for none)")

GIB = 2**30


class _Ids(Tokenizer):
  """Llama's id layout without its vocabulary: the ids a batch needs."""

  def __init__(self, base_vocab: int):
    self.base_vocab = base_vocab


def step_config(variant: str, remat: bool | None, rows: int):
  c = config_file("imagenet256" + (f":{variant}" if variant else ""))
  c.mesh.update(data=1, fsdp=1, tensor=1, dcn_data=1)
  c.data.batch_size = rows
  if remat is not None:
    c.model.remat = remat
  return c


def token_ids(config) -> Tokenizer:
  if config.data.tokenizer == "bytes":
    return ByteTokenizer()
  return _Ids(config.model.vocab_size - 4)


def class_rows(config, seed: int = 0) -> dict[str, np.ndarray]:
  """data.batch_size rows of one class example each (the module docstring)."""
  tok = token_ids(config)
  spec = row_spec(config, tok)
  rng = np.random.default_rng(seed)
  examples = []
  for _ in range(config.data.batch_size):
    prompt = rng.integers(3, tok.base_vocab, int(rng.integers(8, 25))).tolist()
    ids = [tok.bos_id] + prompt + [tok.im_start_id, tok.image_id, tok.im_end_id, tok.eos_id]
    examples.append(Example(ids, [rng.normal(size=spec.image_shape).astype(np.float32)]))
  return pack_examples(examples, spec, one_per_row=True)


def batch_bytes(config) -> int:
  """Bytes of a batch of data.batch_size rows (packing.batch_shapes)."""
  return sum(
    int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in batch_shapes(config).values()
  )


def rows_that_fit(
  probe: dict[str, int], probe_rows: int, per_batch_bytes: int, limit_bytes: float, max_rows: int
) -> int:
  """The most rows (a multiple of 8, at most max_rows) whose plan stays under
  limit_bytes, from the plan at probe_rows: the temporaries and the batch grow
  with the rows, the rest does not. 0 when not even 8 rows fit."""
  per_row = (probe["temporaries"] + per_batch_bytes) / probe_rows
  fixed = probe["total"] - probe["temporaries"] - per_batch_bytes
  rows = int((limit_bytes - fixed) // per_row) if per_row > 0 else max_rows
  return max(0, min(max_rows, rows) // 8 * 8)


def compile_step(config):
  """(compiled train step on the first device, its memory plan, compile seconds)."""
  start = time.perf_counter()
  lowered, _ = lower_train_step(config, jax.devices()[:1])
  compiled = lowered.compile()
  return compiled, memory_plan(compiled), time.perf_counter() - start


def time_step(config, compiled, iters: int) -> float:
  """Median seconds of `compiled` (the train step) over `iters` steps after a warm-up."""
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh), sharding.logical_rules(config.sharding_rules):
    tx, _ = make_optimizer(config.optim, config.model)
    _, state, _ = create_train_state(config, mesh, tx)
    rows = class_rows(config)
    batch = {k: jnp.asarray(v) for k, v in rows.items() if k not in HOST_KEYS}  # the model's
    health = healthy()
    times = []
    for i in range(iters + 1):
      start = time.perf_counter()
      state, metrics, health = compiled(state, batch, health)
      jax.block_until_ready(metrics["loss"])
      if i:
        times.append(time.perf_counter() - start)
    if not np.isfinite(float(metrics["loss"])):
      raise FloatingPointError(f"the step's loss is {float(metrics['loss'])}")
  return float(np.median(times))


def measure(variant, remat, probe_rows, max_rows, fill, memory_gib, iters) -> dict:
  device = jax.devices()[0]
  if memory_gib:
    limit = memory_gib * GIB
  else:
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
      raise ValueError(f"{device} reports no memory limit: pass --memory_gib")
    limit = stats["bytes_limit"]
  config = step_config(variant, remat, probe_rows)
  _, probe, probe_seconds = compile_step(config)
  rows = rows_that_fit(probe, probe_rows, batch_bytes(config), fill * limit, max_rows)
  print(
    f"  probe: {probe_rows} rows plan {probe['total'] / GIB:.2f} GiB (compiled in "
    f"{probe_seconds:.0f} s); {rows} rows fit under {fill:.0%} of "
    f"{limit / GIB:.1f} GiB",
    flush=True,
  )
  attempts = []
  while rows >= 8 and len(attempts) < 4:
    config = step_config(variant, remat, rows)
    compiled, plan, seconds = compile_step(config)
    attempt = dict(rows=rows, plan_gib=plan["total"] / GIB, compile_seconds=seconds)
    attempts.append(attempt)
    if plan["total"] > fill * limit:
      attempt["outcome"] = "plan over the limit"
    else:
      try:
        step_seconds = time_step(config, compiled, iters)
        break
      except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
          raise
        attempt["outcome"] = "out of memory when run"
    print(f"  {rows} rows: {attempt['outcome']}, stepping down", flush=True)
    del compiled
    rows = (rows - max(8, rows // 8)) // 8 * 8
  else:
    raise RuntimeError(f"no batch of 8 rows or more fits {limit / GIB:.1f} GiB: {attempts}")
  attempt["outcome"] = "ran"
  seq_len = config.data.seq_len
  flops = train_flops_per_row(config.model, seq_len) * rows
  chip = perf.chip_of(device)
  peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
  result = dict(
    model=variant or "1.1B",
    remat=bool(config.model.remat),
    dtype=config.model.dtype,
    attention=resolve_impl(config.model.attention_impl, device.platform),
    rows=rows,
    seq_len=seq_len,
    step_seconds=step_seconds,
    tokens_per_second=rows * seq_len / step_seconds,
    model_tflops=flops / 1e12,
    tflops_per_second=flops / step_seconds / 1e12,
    chip=chip.name if chip else None,
    peak_tflops=chip.bf16_tflops if chip else None,
    mfu=flops / step_seconds / (chip.bf16_tflops * 1e12) if chip else None,
    plan=plan,
    limit_gib=limit / GIB,
    peak_bytes_in_use=peak,
    probe_rows=probe_rows,
    probe_plan_gib=probe["total"] / GIB,
    attempts=attempts,
    iters=iters,
  )
  print(
    "  "
    + "  ".join(
      f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
      for k, v in result.items()
      if k not in ("plan", "attempts")
    ),
    flush=True,
  )
  return result


def markdown(r: dict, command: str) -> list[str]:
  mfu = f"{100 * r['mfu']:.1f}% of {r['peak_tflops']:g}" if r["mfu"] is not None else "n/a"
  peak = f"{r['peak_bytes_in_use'] / GIB:.1f} GiB" if r["peak_bytes_in_use"] else "n/a"
  tried = "; ".join(
    f"{a['rows']} rows: {a['outcome']} (plan {a['plan_gib']:.3g} GiB, compiled "
    f"in {a['compile_seconds']:.0f} s)"
    for a in r["attempts"]
  )
  return [
    f"Command: `{command}`",
    "",
    f"Hardware: {report.hardware()}. configs/imagenet256.py{':' + r['model'] if r['model'] != '1.1B' else ''}"
    f" on one device, {r['dtype']} compute, attention {r['attention']}, remat "
    f"{r['remat']}; the reference's ImageNet rows (one class example each, padded to "
    f"{r['seq_len']} tokens); median of {r['iters']} steps after a warm-up.",
    "",
    "| model | rows x tokens | step | tokens/s | model TFLOP per step | TFLOP/s | MFU (bf16 peak) | "
    "memory plan / limit | peak in use |",
    "|---|---|---|---|---|---|---|---|---|",
    f"| {r['model']} | {r['rows']} x {r['seq_len']} | {1e3 * r['step_seconds']:.1f} ms | "
    f"{r['tokens_per_second']:,.0f} | {r['model_tflops']:.3g} | {r['tflops_per_second']:.3g} | "
    f"{mfu} | {r['plan']['total'] / GIB:.3g} / {r['limit_gib']:.3g} GiB | {peak} |",
    "",
    f"The batch: the plan at {r['probe_rows']} rows was {r['probe_plan_gib']:.3g} GiB; {tried}.",
  ]


def main(argv):
  del argv
  print(
    f"train step of configs/imagenet256.py{':' + _VARIANT.value if _VARIANT.value else ''} "
    f"on {report.hardware()}:",
    flush=True,
  )
  result = measure(
    _VARIANT.value,
    _REMAT.value,
    _PROBE_BATCH.value,
    _MAX_BATCH.value,
    _FILL.value,
    _MEMORY_GIB.value,
    _ITERS.value,
  )
  if _JSON.value:
    pathlib.Path(_JSON.value).write_text(json.dumps(result, indent=1))
  if _OUTPUT.value:
    report.write_section(
      pathlib.Path(_OUTPUT.value),
      "Train step of the paper's model",
      markdown(result, "python " + " ".join(sys.argv)),
    )


if __name__ == "__main__":
  report.run(main)
