"""launch/gpu_slurm.sh executed for real through a fake SLURM (tests/fake_cloud/
sbatch, srun, scontrol): 2 "nodes" of this machine, their tasks joined by
jax.distributed on the CPU; and, with a stand-in Python whose exit status the
test picks, the requeue after a preemption (exit 75), and none after exit 2.
"""

import json
import os
import re
import shlex
import stat
import subprocess
import sys

import pytest
from helpers import TINY_CONFIG_FLAG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKES = os.path.join(REPO, "tests", "fake_cloud")
SCRIPT = os.path.join("launch", "gpu_slurm.sh")
GPU_FLAGS = (
  "--xla_gpu_enable_latency_hiding_scheduler=true",
  "--xla_gpu_enable_pipelined_all_gather=true",
  "--xla_disable_hlo_passes=rematerialization",
)


def _venv(folder, python_body: str):
  """A virtual environment as gpu_slurm.sh activates one: bin/activate puts
  its bin first on PATH; bin/python is `python_body` (a bash script)."""
  bin_dir = folder / "bin"
  bin_dir.mkdir(parents=True)
  (bin_dir / "activate").write_text(
    f'export VIRTUAL_ENV={shlex.quote(str(folder))}\nexport PATH="$VIRTUAL_ENV/bin:$PATH"\n'
  )
  python = bin_dir / "python"
  python.write_text("#!/usr/bin/env bash\n" + python_body)
  python.chmod(python.stat().st_mode | stat.S_IXUSR)
  return folder


def _sbatch(tmp_path, *args, **env):
  """`sbatch ARGS` from the checkout, the fakes first on PATH; the calls they
  recorded, and the job's output (slurm-JOBID.out, moved to tmp_path)."""
  fake = tmp_path / "slurm"
  fake.mkdir(exist_ok=True)
  run_env = dict(
    os.environ, PATH=f"{FAKES}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM=str(fake), **env
  )
  run = subprocess.run(
    ["sbatch", *args], cwd=REPO, env=run_env, capture_output=True, text=True, timeout=170
  )
  job = re.search(r"Submitted batch job (\d+)", run.stdout)
  assert job, run.stdout + run.stderr
  out_file = os.path.join(REPO, f"slurm-{job.group(1)}.out")
  output = open(out_file).read()
  os.replace(out_file, tmp_path / f"slurm-{job.group(1)}.out")
  calls = [json.loads(line) for line in (fake / "calls.jsonl").read_text().splitlines()]
  return run, output, calls


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_nodes_train_as_one_run_with_the_gpu_settings(tmp_path):
  workdir = tmp_path / "run"
  venv = _venv(tmp_path / "venv", f'exec {shlex.quote(sys.executable)} "$@"\n')
  xla = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
  # 2 nodes of 2 "GPUs" (CPU devices), one process per node.
  run, output, calls = _sbatch(
    tmp_path,
    "--nodes=2",
    "--ntasks-per-node=1",
    "--gpus-per-node=2",
    SCRIPT,
    TINY_CONFIG_FLAG,
    f"--workdir={workdir}",
    "--config.train.num_steps=2",
    "--config.train.checkpoint_every=2",
    "--config.sample.num_per_class=0",
    "--config.sample.text_prompts=()",
    VENV=str(venv),
    XLA_FLAGS=xla,
    PER_NODE="1",
  )
  assert run.returncode == 0, output[-3000:]
  logs = [(workdir / "logs" / f"task_{t}.log").read_text() for t in range(2)]
  for t in range(2):
    assert re.search(rf"process {t} of 2: 2 local devices, 4 in all", logs[t]), logs[t][-3000:]
    # The GPU flags parse on the CPU; with .[test]'s CUDA plugin, its no-GPU lines are left out.
    assert "Unknown flag" not in logs[t] and "GPU will not be used" not in logs[t]
  steps = [
    json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
  ]
  assert steps == [1, 2]  # one run: process 0 writes each step once
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  srun = [c for c in calls if c["program"] == "srun"]
  assert len(srun) == 1 and not [c for c in calls if c["program"] == "scontrol"]
  argv, env = srun[0]["argv"], srun[0]["env"]
  # The script's settings reach the tasks: GPU flags first, the user's last (they win).
  flags = env["XLA_FLAGS"].split()
  assert flags[-1] == "--xla_force_host_platform_device_count=2"
  assert all(flags.index(f) < flags.index(xla.split()[0]) for f in GPU_FLAGS)
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9" and env["NCCL_DEBUG"] == "WARN"
  assert env["VIRTUAL_ENV"] == str(venv)
  assert argv[-1] == "--config.mesh.dcn_data=-1"  # FSDP inside a node, data across
  assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1"  # each process drives its node's 2 GPUs
  assert argv[argv.index("python") + 1 : argv.index("python") + 3] == ["-m", "monoformer_jax.train"]
  assert f"logs: {workdir}/logs/task_T.log" in output and "tasks' statuses: 0" in output


def _exits(codes: str) -> str:
  """A Python that records its tasks' argv and environment, and exits with the
  codes[SLURM_RESTART_COUNT]-th status for `-m MODULE`."""
  return (
    "if [[ $1 == -m ]]; then\n"
    '  (( SLURM_PROCID == 0 )) || sleep "${LATE:-0}"  # task 0 ends first\n'
    '  { echo "argv: $*"; env | sort; } > "$RECORD/task_${SLURM_PROCID}_${SLURM_RESTART_COUNT:-0}"\n'
    f"  codes=({codes}); exit ${{codes[${{SLURM_RESTART_COUNT:-0}}]}}\n"
    "fi\n"
    f'exec {shlex.quote(sys.executable)} "$@"\n'
  )


def _run_with_exits(tmp_path, codes, *args, **env):
  tmp_path.mkdir(exist_ok=True)
  record = tmp_path / "record"
  record.mkdir()
  venv = _venv(tmp_path / "venv", _exits(codes))
  settings = dict(VENV=str(venv), RECORD=str(record), LOG_DIR=str(tmp_path / "logs"))
  return _sbatch(tmp_path, "--nodes=2", SCRIPT, *args, **{**settings, **env})


@pytest.mark.timeout(60)
def test_a_preempted_run_is_requeued_and_a_failed_one_is_not(tmp_path):
  # Preempted (75) on the first start, done (0) on the second.
  # Task 0 exits a second before the others: srun's --kill-on-bad-exit must not
  # take its 75 for a failure and kill them while they finish their save.
  run, output, calls = _run_with_exits(tmp_path / "a", "75 0", "--workdir=gs://b/run", LATE="1")
  assert run.returncode == 0, output
  job = re.search(r"Submitted batch job (\d+)", run.stdout).group(1)
  requeues = [c["argv"] for c in calls if c["program"] == "scontrol"]
  assert requeues == [["requeue", job]]
  assert "preempted (exit 75): requeue 1 of 5" in output
  srun = [c for c in calls if c["program"] == "srun"]
  assert len(srun) == 2 and srun[1]["env"]["SLURM_RESTART_COUNT"] == "1"
  record = tmp_path / "a" / "record"
  assert sorted(os.listdir(record)) == sorted(f"task_{t}_{r}" for t in range(16) for r in (0, 1))
  # The task logs run on across the requeue: both starts, in order, in each.
  log = (tmp_path / "a" / "logs" / "task_15.log").read_text()
  assert re.findall(r"=== job \d+ start (\d)", log) == ["1", "2"]

  # A config error or a diverged run (2): no requeue, the job fails.
  run, output, calls = _run_with_exits(tmp_path / "b", "2", "--workdir=gs://b/run")
  assert run.returncode == 2 and not [c for c in calls if c["program"] == "scontrol"]
  assert "exit 2 (a config error or a diverged run): not requeued" in output

  # Preempted again and again: requeued MAX_REQUEUES times, then it stops and says so.
  run, output, calls = _run_with_exits(
    tmp_path / "c", "75 75", "--workdir=gs://b/run", MAX_REQUEUES="1"
  )
  assert run.returncode == 75
  assert len([c for c in calls if c["program"] == "scontrol"]) == 1
  assert "MAX_REQUEUES=1: not requeued; sbatch the same command again to resume" in output


@pytest.mark.timeout(60)
def test_per_node_tasks_get_the_whole_node_and_any_module_runs(tmp_path):
  run, output, calls = _run_with_exits(
    tmp_path, "0", "convert", "--output_dir=/shared/prepared", MODULE="prepare", PER_NODE="1"
  )
  assert run.returncode == 0, output
  (srun,) = [c for c in calls if c["program"] == "srun"]
  assert srun["argv"][:4] == [
    "--kill-on-bad-exit=1",
    "--ntasks=2",
    "--ntasks-per-node=1",
    "--cpus-per-task=96",
  ]
  assert srun["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
  tasks = sorted(os.listdir(tmp_path / "record"))
  assert tasks == ["task_0_0", "task_1_0"]
  for t, name in enumerate(tasks):
    text = (tmp_path / "record" / name).read_text()
    env = dict(line.split("=", 1) for line in text.splitlines()[1:] if "=" in line)
    assert (
      text.splitlines()[0]
      == "argv: -m monoformer_jax.data.prepare convert --output_dir=/shared/prepared"
    )
    assert (env["SLURM_PROCID"], env["SLURM_NODEID"], env["SLURM_LOCALID"]) == (str(t), str(t), "0")
    assert env["SLURM_CPUS_PER_TASK"] == "96" and env["SLURM_STEP_NUM_NODES"] == "2"
    assert env["SLURMD_NODENAME"] == f"127.0.0.{t + 1}"
    assert env["SLURM_STEP_NODELIST"] == "127.0.0.[1-2]"


@pytest.mark.timeout(60)
def test_bad_settings_stop_before_srun_with_one_line(tmp_path):
  run, output, calls = _run_with_exits(tmp_path / "a", "0", MODULE="fit")
  assert run.returncode == 2 and not [c for c in calls if c["program"] == "srun"]
  assert output.strip() == (
    "error: MODULE=fit is not one of train, prepare, evaluate, sample, compile, convert"
  )
  run, output, calls = _run_with_exits(tmp_path / "b", "0", VENV=str(tmp_path / "none"))
  assert run.returncode == 2 and not [c for c in calls if c["program"] == "srun"]
  assert output.startswith(f"error: no virtual environment at VENV={tmp_path / 'none'}: make it")
  run, output, _ = _run_with_exits(tmp_path / "c", "0", MAX_REQUEUES="many")
  assert run.returncode == 2 and "MAX_REQUEUES=many must be a number >= 0" in output
  run, output, _ = _run_with_exits(tmp_path / "d", "0", PER_NODE="yes")
  assert run.returncode == 2 and "PER_NODE=yes must be 1 (one process per node) or 0" in output
  # 8 tasks (the script's default) on nodes of 4 GPUs: half the tasks would have none.
  (tmp_path / "e").mkdir()
  run, output, calls = _sbatch(tmp_path / "e", "--nodes=2", "--gpus-per-node=4", SCRIPT)
  assert run.returncode == 2 and not [c for c in calls if c["program"] == "srun"]
  assert output.strip() == (
    "error: 8 tasks per node but 4 GPUs per node: one task per GPU (sbatch --ntasks-per-node=4),"
    " or PER_NODE=1 for one process per node"
  )
  # Run without sbatch, it says how to submit it.
  direct = subprocess.run(
    ["bash", SCRIPT],
    cwd=REPO,
    capture_output=True,
    text=True,
    env={k: v for k, v in os.environ.items() if not k.startswith("SLURM")},
  )
  assert direct.returncode == 2 and "not inside a SLURM job: submit it with sbatch" in direct.stderr
