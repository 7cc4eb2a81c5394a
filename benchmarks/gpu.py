r"""The accelerator figures in one prepared run of at most 10 minutes (one GPU).

Here, once (a host with pip and the package registries):
    python benchmarks/gpu.py --prepare
        # the wheels the GPU machine's image lacks (ml_collections, grain,
        # array_record, portpicker; Python 3.12), into .whl/ (git ignores it)
On the GPU machine (the device tool: run with carry [".whl"]):
    python3 benchmarks/gpu.py --out=$OUT
Anywhere, every part at toy sizes with the kernels interpreted (checks the script):
    python benchmarks/gpu.py --smoke --out=/tmp/gpu_smoke

Four parts, in this order, each a process of its own (a part that fails or
runs out of time is reported, and the next one runs):
  kernels    benchmarks/kernel_check.py: the Pallas kernels compiled against
             the XLA attention on random packed layouts, output and gradients,
             float32 and bfloat16, rows of 512 and 2048 tokens;
  attention  benchmarks/attention.py: their times at the reference's row (512
             tokens, 256 image tokens) and at 2048-token packed rows, 32 heads
             / 4 kv heads, head dim 64, bfloat16, against the dense XLA
             attention, jax.nn.dot_product_attention with the dense mask, and
             its cuDNN implementation;
  step       benchmarks/paper_step.py: the 1.1B train step in bfloat16 on the
             GPU at the largest batch that fits, MFU against the bf16 peak;
  sampling   benchmarks/sampling.py: 20-step guided sampling of the 1.1B (a
             16-token class prompt, 256 image tokens; with and without the
             prompt's KV cache) and its greedy text decoding.
Each part's budget is its share of `--budget` seconds plus what the parts
before it left unused. Written under --out: benchmarks.md (docs/benchmarks.md
with each part's section put in, to copy back), kernels.json, step.json and
gpu.log (every part's output); a summary table is printed last.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
# What the GPU image (the device tool's KINDS.md) lacks of what the benchmarks
# import, at the versions this project's tests run with; their own needs are there.
MISSING_THERE = (
  "ml_collections==1.1.0",
  "grain==0.2.18",
  "array_record==0.8.6",
  "portpicker==1.6.0",
)
SITE = "/tmp/monoformer_site"

_OUT = flags.DEFINE_string("out", os.environ.get("OUT", ""), "folder for the results")
_SMOKE = flags.DEFINE_bool("smoke", False, "toy sizes, kernels interpreted: any host")
_PREPARE = flags.DEFINE_bool("prepare", False, "download the wheels into .whl/ and stop")
_BUDGET = flags.DEFINE_integer("budget", 540, "seconds for all four parts")
_ONLY = flags.DEFINE_list("only", [], "run only these parts")

# (name, share of the budget, script, arguments on the GPU, arguments with --smoke)
PARTS = (
  (
    "kernels",
    0.15,
    "kernel_check.py",
    ["--lengths=512,2048", "--rows=4", "--json={out}/kernels.json"],
    [
      "--interpret",
      "--backend=gpu",
      "--lengths=256",
      "--rows=2",
      "--heads=4",
      "--kv_heads=2",
      "--head_dim=32",
      "--json={out}/kernels.json",
    ],
  ),
  (
    "attention",
    0.2,
    "attention.py",
    ["--lengths=512,2048", "--impls=pallas,xla,jax_nn,cudnn", "--dtype=bfloat16"],
    [
      "--lengths=512",
      "--impls=xla,jax_nn",
      "--batch=1",
      "--heads=4",
      "--kv_heads=2",
      "--head_dim=32",
      "--dtype=float32",
      "--iters=2",
    ],
  ),
  (
    "step",
    0.4,
    "paper_step.py",
    ["--json={out}/step.json"],
    ["--variant=tiny", "--memory_gib=0.05", "--iters=2", "--json={out}/step.json"],
  ),
  (
    "sampling",
    0.25,
    "sampling.py",
    [
      "--layouts=paper",
      "--paper_model=full",
      "--prompt_lengths=16",
      "--paper_images=8",
      "--text_rows=8",
      "--new_tokens=64",
    ],
    [
      "--layouts=paper",
      "--paper_model=small",
      "--prompt_lengths=16",
      "--paper_images=1",
      "--iters=1",
      "--text_rows=1",
      "--new_tokens=4",
    ],
  ),
)


def prepare():
  """The wheels of MISSING_THERE for the GPU machine's Python (3.12, x86-64 Linux)."""
  WHEELS.mkdir(exist_ok=True)  # .gitignore has it
  platforms = [
    a
    for p in (
      "manylinux_2_28_x86_64",
      "manylinux_2_24_x86_64",
      "manylinux_2_17_x86_64",
      "manylinux2014_x86_64",
    )
    for a in ("--platform", p)
  ]
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pip",
      "download",
      "--no-deps",
      "--only-binary=:all:",
      "--python-version",
      "3.12",
      "--implementation",
      "cp",
      *platforms,
      "-d",
      str(WHEELS),
      *MISSING_THERE,
    ],
    check=True,
  )
  print(
    f"{WHEELS}: {sorted(p.name for p in WHEELS.glob('*.whl'))}\n"
    "on the GPU machine: python3 benchmarks/gpu.py --out=$OUT (carry .whl)"
  )


def environment() -> dict[str, str]:
  """The parts' environment: the carried wheels installed (when there are any)
  and on the path with the repository; the GPU's memory for the step."""
  env = dict(
    os.environ,
    PYTHONUNBUFFERED="1",
    XLA_PYTHON_CLIENT_MEM_FRACTION="0.95",
    TF_CPP_MIN_LOG_LEVEL="2",
  )
  paths = [str(REPO)]
  wheels = sorted(WHEELS.glob("*.whl"))
  if wheels and not _SMOKE.value:
    subprocess.run(
      [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        SITE,
        *map(str, wheels),
      ],
      check=True,
    )
    paths.insert(0, SITE)
  env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return env


def run_part(name, script, args, seconds, env, log) -> tuple[str, float]:
  """Runs one part for at most `seconds`; (outcome, seconds taken)."""
  command = [sys.executable, str(REPO / "benchmarks" / script), *args]
  print(f"== {name}: {' '.join(command[1:])} (at most {seconds:.0f} s)", flush=True)
  log.write(f"== {name}: {' '.join(command)}\n")
  start = time.perf_counter()
  process = subprocess.Popen(
    command,
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )
  outcome = None
  try:
    for line in _lines_until(process, start + seconds):
      log.write(line)
      log.flush()
      if not _noise(line):
        print(f"  [{name}] {line.rstrip()}", flush=True)
  except TimeoutError:
    os.killpg(process.pid, 9)
    outcome = f"stopped at its {seconds:.0f} s"
  code = process.wait()
  if outcome is None:
    outcome = "ok" if code == 0 else f"failed (exit {code})"
  taken = time.perf_counter() - start
  log.write(f"== {name}: {outcome} in {taken:.0f} s\n")
  return outcome, taken


def _lines_until(process, deadline):
  """The process's output lines; TimeoutError at the deadline."""
  import selectors

  selector = selectors.DefaultSelector()
  selector.register(process.stdout, selectors.EVENT_READ)
  while True:
    left = deadline - time.perf_counter()
    if left <= 0:
      raise TimeoutError
    if selector.select(timeout=min(left, 5.0)):
      line = process.stdout.readline()
      if not line:
        return
      yield line


def _noise(line: str) -> bool:
  """Start-up chatter of libraries (TPU probing, absl's info lines)."""
  return any(
    s in line
    for s in (
      "TPU",
      "libtpu",
      "InitGoogle",
      "common_lib.cc",
      "Source Location",
      "tfrc/",
      "dataset_info.py",
    )
  )


def main(argv):
  del argv
  if _PREPARE.value:
    prepare()
    return
  if not _OUT.value:
    raise app.UsageError("--out: the folder for the results (the device tool's $OUT)")
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  markdown = out / "benchmarks.md"
  if not _SMOKE.value:
    shutil.copy(REPO / "docs" / "benchmarks.md", markdown)
  env = environment()
  unknown = set(_ONLY.value) - {p[0] for p in PARTS}
  if unknown:
    raise app.UsageError(f"--only: no part {sorted(unknown)}; parts: {[p[0] for p in PARTS]}")
  parts = [p for p in PARTS if not _ONLY.value or p[0] in _ONLY.value]
  shares = sum(p[1] for p in parts)
  summary, saved, start = [], 0.0, time.perf_counter()
  with (out / "gpu.log").open("w") as log:
    for name, share, script, gpu_args, smoke_args in parts:
      left = _BUDGET.value - (time.perf_counter() - start)
      seconds = min(left, _BUDGET.value * share / shares + saved)
      if seconds < 20:
        summary.append((name, "not run: the budget is spent", 0.0))
        continue
      args = [a.format(out=out) for a in (smoke_args if _SMOKE.value else gpu_args)]
      outcome, taken = run_part(name, script, args + [f"--output={markdown}"], seconds, env, log)
      saved = max(0.0, seconds - taken)
      summary.append((name, outcome, taken))
  print(f"\n{'part':<10} {'outcome':<28} seconds")
  for name, outcome, taken in summary:
    print(f"{name:<10} {outcome:<28} {taken:7.0f}")
  print(f"results: {markdown}, {out}/kernels.json, {out}/step.json, {out}/gpu.log")
  if any(outcome != "ok" for _, outcome, _ in summary):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
