"""IDDPM against flow matching on the digits default, at the same training budget.

    python benchmarks/objectives.py --workdir=/tmp/objectives
    python benchmarks/objectives.py --workdir=/tmp/objectives --steps=4,50 --num_samples=200

trains configs/digits.py twice with everything equal but the objective
(`diffusion.objective=iddpm`, the default, and `flow` with
`model.learn_sigma=False`), each `python -m monoformer_jax.train` in a process
of its own, then scores each checkpoint with `python -m monoformer_jax.evaluate
--metrics=digits --num_samples=N --num_steps=S` at every `--steps` count, with
each objective's default sampler (ddpm; euler) and the config's guidance. A
finished training run or evaluation in `--workdir` is reused, so a rerun
only adds what is missing (`--objectives` runs some of them; a run trained
by hand into WORKDIR/NAME with its log in WORKDIR/NAME.train.log counts as
done). The table (drawn-right share and Fréchet distance per step count, the
wall time of each evaluate process, its compile and model load included; the
training time and the end-of-run reading, interleaved and editing scores of
each run) goes to stdout and into a section of `--output`.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import time

import report
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
OBJECTIVES = dict(
  iddpm=[], flow=["--config.diffusion.objective=flow", "--config.model.learn_sigma=False"]
)

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the two runs and their evaluations go.")
_OBJECTIVES = flags.DEFINE_list("objectives", list(OBJECTIVES), "The objectives to run.")
_HEUN_STEPS = flags.DEFINE_list(
  "heun_steps", [], "Step counts at which the flow model is also sampled with heun."
)
_STEPS = flags.DEFINE_list("steps", ["4", "5", "10", "20", "50"], "Sampling step counts.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1000, "Samples per evaluation.")
_TRAIN_FLAGS = flags.DEFINE_list(
  "train_flags", [], "More --config.x=y flags for both runs (the same budget for both)."
)
_OUTPUT = flags.DEFINE_string(
  "output", str(REPO / "docs" / "objectives.md"), "The markdown file the table goes to."
)


def _run(argv: list[str], log: pathlib.Path) -> float:
  """Runs `python argv` (the log to `log`) and returns its wall time; raises if it fails."""
  start = time.perf_counter()
  with open(log, "w") as f:
    done = subprocess.run([sys.executable, *argv], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
  if done.returncode:
    raise SystemExit(f"{' '.join(argv[:3])} failed (exit {done.returncode}); see {log}")
  return time.perf_counter() - start


def _train(name: str, workdir: pathlib.Path) -> dict:
  """The run of objective `name` (trained unless its summary is there), its
  scores and its training time (the `done:` line of its log)."""
  summary = workdir / "samples" / "summary.json"
  log = workdir.with_suffix(".train.log")
  if not summary.exists():
    _run(
      [
        "-m",
        "monoformer_jax.train",
        f"--config={REPO / 'configs' / 'digits.py'}",
        f"--workdir={workdir}",
        *OBJECTIVES[name],
        *(_TRAIN_FLAGS.value),
      ],
      log,
    )
  done = re.search(r"done: compile ([\d.]+) s, (\d+) steps in ([\d.]+) s", log.read_text())
  if done is None:
    raise SystemExit(f"{log} has no 'done:' line: train {workdir} with this script")
  return dict(json.loads(summary.read_text()), train_s=float(done[3]), train_steps=int(done[2]))


def _evaluate(workdir: pathlib.Path, steps: int, sampler: str | None = None) -> dict:
  """evaluate's digits scores of the run in `workdir` at `steps` (`sampler`
  None: the objective's default), with the evaluate process's wall time."""
  name = f"eval_{steps}_steps" + (f"_{sampler}" if sampler else "")
  out = workdir / f"objectives_{name}.json"
  if not out.exists():
    wall = _run(
      [
        "-m",
        "monoformer_jax.evaluate",
        f"--checkpoint={workdir}",
        "--metrics=digits",
        f"--num_samples={_NUM_SAMPLES.value}",
        f"--num_steps={steps}",
        f"--sample_dir={workdir / name}",
        f"--output={workdir / f'{name}.json'}",
        *([f"--sampler={sampler}"] if sampler else []),
      ],
      workdir / f"{name}.log",
    )
    scores = json.loads((workdir / f"{name}.json").read_text())
    out.write_text(json.dumps(dict(scores, wall_s=wall)))
  return json.loads(out.read_text())


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise SystemExit("error: --workdir is required (where the two runs go)")
  root = pathlib.Path(_WORKDIR.value)
  root.mkdir(parents=True, exist_ok=True)
  steps = [int(s) for s in _STEPS.value]
  names = [n for n in OBJECTIVES if n in _OBJECTIVES.value]
  runs = {name: _train(name, root / name) for name in names}
  evals = {(name, None): {s: _evaluate(root / name, s) for s in steps} for name in names}
  if "flow" in names and _HEUN_STEPS.value:
    heun = [int(s) for s in _HEUN_STEPS.value]
    evals["flow", "heun"] = {s: _evaluate(root / "flow", s, "heun") for s in heun}
  lines = [
    f"Command: `python benchmarks/objectives.py --workdir=W --steps={','.join(_STEPS.value)} "
    f"--num_samples={_NUM_SAMPLES.value}"
    + (f" --heun_steps={','.join(_HEUN_STEPS.value)}" if _HEUN_STEPS.value else "")
    + (f" --train_flags={','.join(_TRAIN_FLAGS.value)}" if _TRAIN_FLAGS.value else "")
    + f"` ({report.hardware()}). Both runs: configs/digits.py, the same steps, "
    "data and seed; flow adds `diffusion.objective=flow model.learn_sigma=False`. "
    f"Sampled with each objective's default sampler (ddpm; euler), {_NUM_SAMPLES.value} "
    "samples each, scored by `evaluate --metrics=digits`; wall: the evaluate process "
    "(model load and compile included).",
    "",
    "| objective | sampler | steps (model calls) | drawn right | Fréchet distance | wall |",
    "|---|---|---|---|---|---|",
  ]
  default = dict(iddpm="ddpm", flow="euler")
  for (name, sampler), by_steps in evals.items():
    for s, scores in by_steps.items():
      d = scores["digits"]
      calls = 2 * s if sampler == "heun" else s
      lines.append(
        f"| {name} | {sampler or default[name]} | {s} ({calls}) | "
        f"{_pct(d['classifier_accuracy'])} | {d['frechet_distance']:.2f} | "
        f"{scores['wall_s']:.0f} s |"
      )
  lines += [
    "",
    "End of each run (its own `sample.num_steps` and evaluators):",
    "",
    "| objective | training steps | drawn right | distance | reading | interleaved | edits |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, r in runs.items():
    lines.append(
      f"| {name} | {r['train_steps']} in {r['train_s']:.0f} s | "
      f"{_pct(r['digits']['classifier_accuracy'])} | "
      f"{r['digits']['frechet_distance']:.2f} | {_pct(r.get('reading_accuracy'))} | "
      f"{_pct(r.get('interleaved_accuracy'))} | {_pct(r.get('editing_accuracy'))} |"
    )
  print("\n".join(lines))
  report.write_section(pathlib.Path(_OUTPUT.value), "IDDPM and flow matching on the digits", lines)


if __name__ == "__main__":
  report.run(main)
