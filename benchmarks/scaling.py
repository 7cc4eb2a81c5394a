r"""What the paper's model (and a 7B) needs on TPU slices, from ahead-of-time compiles.

    python benchmarks/scaling.py   # docs/scaling.md and its figures in docs/scaling.json

Each setting is one `python -m monoformer_jax.compile` run (a fresh process
each: the TPU compiler's memory is freed between them), compiling the real
train step of configs/imagenet256.py (the 1.1B; `:7b` the Llama-2-7B shape)
at its global batch of 256 rows x 288 columns for a slice's compile-only
devices, the rows measured by the packer with a Llama-style tokenizer
(tests/fixtures/llama_style_tokenizer) so that FLOPs and MFU count only the
non-padding tokens. Beside each, the same setting's figures from the rows of
512 columns the config had before (docs/scaling_512.json, written by this
script on 2026-12-01). A setting that does not fit moves on to the next one in its list
(FSDP over every chip, then gradient accumulation, then tensor parallelism),
and the table shows every attempt with the compiler's out-of-memory message.
`--only=v5e-16,7b@v5p-64` runs some settings; the document is rewritten from
the runs of this invocation only. Each compile takes 1 to 3 minutes on an
idle 2-core host (the table of docs/scaling.md: about 20 minutes).
"""

from __future__ import annotations

import datetime
import json
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 2**30
TOKENIZER = REPO / "tests" / "fixtures" / "llama_style_tokenizer" / "tokenizer.model"
BEFORE = REPO / "docs" / "scaling_512.json"  # the 512-column rows, 2026-12-01

_OUTPUT = flags.DEFINE_string("output", str(REPO / "docs" / "scaling.md"), "markdown file")
_ONLY = flags.DEFINE_list("only", [], "run only these rows: TOPOLOGY (1.1B) or 7b@TOPOLOGY")
_TIMEOUT = flags.DEFINE_integer("timeout", 3600, "seconds per compile")

PURE_DP = ("pure data parallel", ["--config.mesh.data=-1", "--config.mesh.fsdp=1"])
FSDP = ("FSDP (the config's mesh)", [])
FSDP_ACCUM2 = ("FSDP, 2 micro-batches", ["--config.optim.grad_accum_steps=2"])
FSDP_ACCUM4 = ("FSDP, 4 micro-batches", ["--config.optim.grad_accum_steps=4"])
FSDP_TP2 = ("FSDP x tensor 2", ["--config.mesh.tensor=2"])

# (model variant, topology, settings tried in order until one fits). The 1.1B
# is shown both as the config runs it (FSDP) and with pure data parallelism,
# where each chip holds the whole state.
ROWS = (
  [("", topology, [PURE_DP]) for topology in ("v4-8", "v5p-8", "v5e-16", "v6e-8")]
  + [
    ("", topology, [FSDP, FSDP_ACCUM2, FSDP_ACCUM4])
    for topology in ("v4-8", "v5p-8", "v5p-32", "v5e-16", "v6e-8")
  ]
  + [("7b", topology, [FSDP, FSDP_ACCUM2, FSDP_TP2]) for topology in ("v5p-64", "v5p-128")]
)


def compile_once(variant: str, topology: str, flags_: list[str]) -> dict:
  """One compile: its JSON figures, or {'error': the message} when it does not fit."""
  print(f"[{time.strftime('%H:%M:%S')}]", end=" ")
  config = f"--config={REPO / 'configs' / 'imagenet256.py'}" + (f":{variant}" if variant else "")
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "plan.json"
    command = [
      sys.executable,
      "-m",
      "monoformer_jax.compile",
      config,
      f"--topology={topology}",
      f"--output={out}",
      f"--config.data.tokenizer={TOKENIZER}",
    ] + flags_
    print("$", " ".join(command[1:]), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=_TIMEOUT.value)
    seconds = time.perf_counter() - t0
    if done.returncode == 0:
      result = json.loads(out.read_text())
      print(
        f"  compiled: {result['total_bytes'] / GIB:.1f} GiB per chip (arguments "
        f"{result['argument_bytes'] / GIB:.1f}, temporaries {result['temp_bytes'] / GIB:.1f}"
        f"), fits {result['fits']}, {seconds:.0f} s",
        flush=True,
      )
      return result
  errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
  if done.returncode == 2 and errors and "does not fit" in errors[0]:
    print(f"  does not fit ({seconds:.0f} s)", flush=True)
    return dict(error=errors[0][len("error: ") :])
  raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")


def _why(message: str) -> str:
  """The compiler's out-of-memory words, or the figures of a step it accepted
  that still exceeds the HBM."""
  if "The compiler says: " in message:
    said = message.split("The compiler says: ", 1)[1]
  else:
    said = "compiled, " + message.split("accepted it, ", 1)[-1]
  return said.split(" To fit it:", 1)[0].rstrip(".")


def _images_per_s_per_chip(result: dict) -> float:
  """The step's images (one per row before the padding was measured) per second per chip."""
  images = result.get("images_per_step") or result["batch_size"]
  return images / result["step_seconds"] / result["devices"]


def _before(result: dict, before: dict) -> str:
  """The 512-column row's step time and images/s per chip, and the speed-up."""
  old = before.get((result["model"], result["topology"], result["setting"]))
  if not old or "error" in old:
    return "did not fit" if old else ""
  if old["estimate"] != "xla":
    return f">= {old['step_seconds'] * 1e3:,.0f} ms (at peak)"
  ratio = _images_per_s_per_chip(result) / _images_per_s_per_chip(old)
  return (
    f"{old['step_seconds'] * 1e3:,.0f} ms, {_images_per_s_per_chip(old):,.1f} images/s: "
    f"now {ratio:.2f}x"
  )


def _row(model: str, topology: str, setting: str, result: dict, before: dict) -> str:
  if "error" in result:
    why = _why(result["error"])
    return f"| {model} | {topology} | {setting} | | | does not fit: {why} | | | | | | {_before(result, before)} |"
  mesh = "x".join(str(result["mesh"][a]) for a in ("data", "fsdp", "tensor"))
  memory = (
    f"{result['total_bytes'] / GIB:.1f} of {result['hbm_bytes'] / GIB:g} GiB "
    f"(arguments {result['argument_bytes'] / GIB:.1f}, temporaries "
    f"{result['temp_bytes'] / GIB:.1f}): " + ("fits" if result["fits"] else "does NOT fit")
  )
  images = _images_per_s_per_chip(result)
  if result["estimate"] == "xla":
    time_ms, mfu = f"{result['step_seconds'] * 1e3:,.0f}", f"{100 * result['mfu']:.0f}%"
    speed = f"{images:,.1f}"
  else:  # no usable XLA estimate: the time at peak, a lower bound
    time_ms, mfu = f">= {result['step_seconds'] * 1e3:,.0f} (at peak)", "n/a"
    speed = f"<= {images:,.1f}"
  flops = (
    f"{result['useful_flops'] / 1e15:.3f} ({result['model_flops'] / 1e15:.3f})"
    f" | {result['useful_flops'] / result['images_per_step'] / 1e12:.2f}"
  )
  return (
    f"| {model} | {topology} | {setting} | {mesh} | {result['remat']} | {memory} | "
    f"{100 * result['padding']:.1f}% | {flops} | {time_ms} | {mfu} | {speed} | "
    f"{_before(result, before)} |"
  )


def main(argv):
  del argv
  import jax
  import libtpu

  lines, records = [], []
  before = {(r["model"], r["topology"], r["setting"]): r for r in json.loads(BEFORE.read_text())}
  for variant, topology, settings in ROWS:
    key = f"7b@{topology}" if variant else topology
    if _ONLY.value and key not in _ONLY.value:
      continue
    model = "7B (`:7b`)" if variant else "1.1B"
    for setting, flags_ in settings:
      result = compile_once(variant, topology, flags_)
      records.append(
        {**result, "model": model, "topology": topology, "setting": setting, "flags": flags_}
      )
      shown = setting + (f" `{' '.join(flags_)}`" if flags_ else "")
      lines.append(_row(model, topology, shown, records[-1], before))
      if result.get("fits"):
        break
  path = pathlib.Path(_OUTPUT.value)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
  chosen = {}  # (model, slice) -> what each of its settings did, in order
  for r in records:
    chosen.setdefault((r["model"], r["topology"]), []).append(
      f"{r['setting']} fits ({r['total_bytes'] / GIB:.1f} of {r['hbm_bytes'] / GIB:g} GiB)"
      if r.get("fits")
      else f"{r['setting']} does not fit"
    )
  chosen = [
    f"- {model} on {topology}: " + "; ".join(done) for (model, topology), done in chosen.items()
  ]
  no_estimate = sorted({r["chip"] for r in records if r.get("estimate") == "peak"})
  today = datetime.date.today().isoformat()
  text = "\n".join(
    [
      "# Scaling: the train step planned for TPU slices",
      "",
      f"Written by `python benchmarks/scaling.py` on {today} (jax {jax.__version__}, libtpu "
      f"{libtpu.__version__}) from a 2-core CPU host: every figure comes from the TPU "
      "compiler's plan of the real train step (`python -m monoformer_jax.compile`, "
      "`monoformer_jax/train/aot.py`), not from a run on the chips. One row per setting "
      "tried; a setting that does not fit is followed by the next of its list.",
      "",
      "configs/imagenet256.py (1.1B: TinyLlama's decoder, 22 layers of 2048) and its "
      "`:7b` variant (Llama-2-7B's decoder, 32 layers of 4096), both at the config's "
      "global batch of 256 rows x 288 columns (one 256-token image and its prompt per "
      "row: 256 images per step), bf16 compute, float32 master weights, AdamW and an EMA "
      "copy, rematerialised layers (`model.remat=True`), Pallas (Mosaic) attention. The "
      "rows are measured by the packer on made ImageNet examples (the 1000 class names "
      "under the reference's templates, 10% with the prompt dropped) tokenized with a "
      "Llama-style 32,000-piece tokenizer (`--config.data.tokenizer=tests/fixtures/"
      "llama_style_tokenizer/tokenizer.model`); the last column is the same setting "
      "with the 512-column rows the config had until 2026-12-07 (47.7% padding; "
      "docs/scaling_512.json). Why the images/s gain stays below the FLOPs': "
      "[row_layout.md](row_layout.md).",
      "",
      "| model | slice | setting | mesh data x fsdp x tensor | remat | memory per chip "
      "(of HBM) | padding | model PFLOPs per step: non-padding (computed) | model TFLOPs "
      "per image | est. step ms | est. MFU | est. images/s per chip | before, 512 "
      "columns: step, images/s per chip |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
      *lines,
      "",
      "What fits, setting by setting:",
      "",
      *chosen,
      "",
      "How to read it:",
      "",
      "- memory per chip: arguments + outputs - outputs aliased to donated arguments + "
      "temporaries + code, from `compiled.memory_analysis()`; HBM is the chip's "
      "(`monoformer_jax/perf.py`: v4 32 GiB, v5e 16, v5p 95, v6e 32). The compiler "
      "refuses a step whose arguments and temporaries exceed what it can use (its message "
      "is quoted), but has accepted steps whose figures add up to more than the HBM; those "
      "are counted as not fitting too.",
      "- padding: the share of the step's columns that hold no example, as the packer "
      "lays out the made examples (`data.datasets.class_prompt_rows`).",
      "- model FLOPs: `model.build.train_flops_counter`: 6 per weight per token plus the "
      "attention's 12 x layers x heads x head_dim per query-key pair; rematerialisation "
      "not counted. Of the non-padding tokens and the pairs inside each example (what "
      "MFU counts), and in brackets of the whole rows, which the chips compute.",
      "- est. step time: XLA's own estimate (`cost_analysis()['optimal_seconds']`) of the "
      "program it counts, which is one layer of one micro-batch (it counts each `scan` "
      "body once), scaled by the model FLOPs of the whole step over those of that one "
      "layer and micro-batch. It is a compiler's roofline, not a measurement: "
      "communication across chips, the attention kernels (custom calls) and the input "
      "pipeline are modelled loosely or not at all. Expect a real step to be slower.",
      "  Where XLA gives no usable estimate (here on "
      f"{', '.join(no_estimate) or 'none'}: `optimal_seconds` comes out negative), the "
      "time at 100% of the chips' bf16 peak is shown instead: a lower bound of the time.",
      "- est. MFU: non-padding model FLOPs / (est. step time x chips x bf16 peak); "
      "est. images/s per chip: images per step / est. step time / chips (an upper bound "
      "where the time is the peak bound).",
      "",
      "Any single setting: `python -m monoformer_jax.compile --config=configs/imagenet256.py "
      "--topology=v5e-16 --config.mesh.data=-1 --config.mesh.fsdp=1` (add `--output=x.json` "
      "for the figures). GPUs: `--topology=h100-8` (8 per host) plans H100s the same way "
      "once JAX's CUDA plugin is installed (`pip install jax-cuda12-plugin==<jax "
      "version>`, no CUDA libraries needed), with memory per GPU but no cost estimate "
      "from XLA's GPU compiler (`monoformer_jax/parallel/topology.py`): the 1.1B on "
      "H100s is in [scaling_h100.md](scaling_h100.md).",
      "",
    ]
  )
  path.write_text(text)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
