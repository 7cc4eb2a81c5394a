"""A stand-in for SLURM's `sbatch`, `srun` and `scontrol` (tests/fake_cloud/
sbatch, srun, scontrol call `main` with their own name): what
launch/gpu_slurm.sh calls, executed for real on this machine.

$FAKE_SLURM (a folder) gets `calls.jsonl`: every call's program, argv, and
the environment a job's tasks see (SLURM_*, XLA_*, JAX_*, NCCL_*, VIRTUAL_ENV).

- `sbatch [OPTIONS] SCRIPT ARGS`: options from the command line, else the
  script's `#SBATCH` lines (as SLURM reads them); runs SCRIPT with bash as the
  job's batch step, with the variables SLURM sets (SLURM_JOB_ID,
  SLURM_JOB_NUM_NODES, SLURM_JOB_NODELIST, SLURM_NTASKS, SLURM_CPUS_ON_NODE,
  SLURM_GPUS_ON_NODE, SLURM_SUBMIT_DIR, ...), its output to --output (%j: the
  job id). Unlike SLURM it waits for the job (as `sbatch --wait`) and exits
  with its status. Nodes are 127.0.0.1, 127.0.0.2, ... (`127.0.0.[1-N]`, all
  this machine). The job id is chosen so that the port JAX's SLURM support
  derives from it (61440 + id % 4096) is free: parallel tests do not meet. A
  job that called `scontrol requeue` runs again with SLURM_RESTART_COUNT + 1.
- `srun [OPTIONS] COMMAND`: inside a job, --ntasks (default the job's) tasks,
  --ntasks-per-node (default the job's) on each node in turn, each a local
  process with the step's variables (SLURM_PROCID, SLURM_LOCALID,
  SLURM_NODEID, SLURMD_NODENAME, SLURM_STEP_NODELIST, SLURM_STEP_NUM_NODES,
  SLURM_NTASKS, SLURM_CPUS_PER_TASK, ...); --output per task (%t, %n, %N,
  %j) in --open-mode; --kill-on-bad-exit kills the others when a task fails.
  Exits with the highest task status (128 + N for a signal N), as srun does.
- `scontrol requeue JOBID`: marks the job for a rerun.
"""

import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

RECORDED = ("SLURM_", "XLA_", "JAX_", "NCCL_", "VIRTUAL_ENV", "CONDA_")


def record(program, argv):
  folder = os.environ["FAKE_SLURM"]
  env = {k: v for k, v in os.environ.items() if k.startswith(RECORDED)}
  with open(os.path.join(folder, "calls.jsonl"), "a") as f:
    f.write(json.dumps(dict(program=program, argv=argv, env=env)) + "\n")


def parse(argv, takes_value):
  """--opt=value, --opt value, -X value, --flag; stops at the first non-option."""
  options, i = {}, 0
  while i < len(argv) and argv[i].startswith("-"):
    arg = argv[i]
    if "=" in arg:
      key, value = arg.split("=", 1)
    elif arg in takes_value:
      key, value = arg, argv[i + 1]
      i += 1
    else:
      key, value = arg, "1"
    options[takes_value.get(key, key)] = value
    i += 1
  return options, argv[i:]


SBATCH_OPTIONS = {
  "-N": "--nodes",
  "--nodes": "--nodes",
  "--ntasks-per-node": "--ntasks-per-node",
  "--gpus-per-node": "--gpus-per-node",
  "--cpus-per-task": "--cpus-per-task",
  "-o": "--output",
  "--output": "--output",
  "-J": "--job-name",
  "--job-name": "--job-name",
  "--signal": "--signal",
  "--open-mode": "--open-mode",
}


def script_options(path):
  """The #SBATCH lines before the script's first command."""
  words = []
  with open(path) as f:
    for text in f:
      line = text.strip()
      if line.startswith("#SBATCH"):
        words += shlex.split(line[len("#SBATCH") :])
      elif line and not line.startswith("#"):
        break
  return parse(words, SBATCH_OPTIONS)[0]


def free_job_id():
  while True:
    job = random.randrange(10_000, 1_000_000)
    with socket.socket() as s:
      try:
        s.bind(("", 61440 + job % 4096))
        return job
      except OSError:
        continue


def sbatch(argv):
  options, rest = parse(argv, SBATCH_OPTIONS)
  if not rest:
    sys.exit("sbatch: error: no batch script")
  script, args = rest[0], rest[1:]
  options = {**script_options(script), **options}
  nodes = int(options.get("--nodes", 1))
  per_node = int(options.get("--ntasks-per-node", 1))
  cpus = int(options.get("--cpus-per-task", 1))
  gpus = options.get("--gpus-per-node")
  job = free_job_id()
  print(f"Submitted batch job {job}", flush=True)
  names = [f"127.0.0.{n + 1}" for n in range(nodes)]
  env = dict(
    os.environ,
    SLURM_JOB_ID=str(job),
    SLURM_JOBID=str(job),
    SLURM_JOB_NAME=options.get("--job-name", os.path.basename(script)),
    SLURM_JOB_NUM_NODES=str(nodes),
    SLURM_NNODES=str(nodes),
    SLURM_JOB_NODELIST=f"127.0.0.[1-{nodes}]" if nodes > 1 else names[0],
    SLURM_NODELIST=f"127.0.0.[1-{nodes}]" if nodes > 1 else names[0],
    SLURM_NTASKS=str(nodes * per_node),
    SLURM_NPROCS=str(nodes * per_node),
    SLURM_NTASKS_PER_NODE=str(per_node),
    SLURM_TASKS_PER_NODE=f"{per_node}(x{nodes})",
    SLURM_CPUS_PER_TASK=str(cpus),
    SLURM_CPUS_ON_NODE=str(cpus * per_node),
    SLURM_SUBMIT_DIR=os.getcwd(),
    SLURM_SUBMIT_HOST=socket.gethostname(),
    SLURMD_NODENAME=names[0],
    SLURM_NODEID="0",
    SLURM_CLUSTER_NAME="fake",
  )
  if gpus:
    env.update(SLURM_GPUS_ON_NODE=gpus, SLURM_GPUS_PER_NODE=gpus)
  output = options.get("--output", "slurm-%j.out").replace("%j", str(job))
  marker = os.path.join(os.environ["FAKE_SLURM"], f"requeue_{job}")
  restarts = 0
  while True:
    if restarts:
      env["SLURM_RESTART_COUNT"] = str(restarts)
    mode = "a" if options.get("--open-mode") == "append" or restarts else "w"
    with open(output, mode) as out:
      code = subprocess.call(["bash", script, *args], env=env, stdout=out, stderr=out)
    if not os.path.exists(marker):
      return code
    os.remove(marker)
    restarts += 1


SRUN_OPTIONS = {
  "-n": "--ntasks",
  "--ntasks": "--ntasks",
  "--ntasks-per-node": "--ntasks-per-node",
  "-c": "--cpus-per-task",
  "--cpus-per-task": "--cpus-per-task",
  "-o": "--output",
  "--output": "--output",
  "--open-mode": "--open-mode",
}


def srun(argv):
  if "SLURM_JOB_ID" not in os.environ:
    sys.exit("srun: error: not inside a job (the fake runs steps of sbatch jobs only)")
  options, command = parse(argv, SRUN_OPTIONS)
  env0 = os.environ
  nodes = int(env0["SLURM_JOB_NUM_NODES"])
  ntasks = int(options.get("--ntasks", env0["SLURM_NTASKS"]))
  per_node = int(options.get("--ntasks-per-node", env0["SLURM_NTASKS_PER_NODE"]))
  cpus = options.get("--cpus-per-task", env0.get("SLURM_CPUS_PER_TASK", "1"))
  if ntasks > nodes * per_node:
    sys.exit(f"srun: error: {ntasks} tasks do not fit {nodes} nodes of {per_node}")
  step_nodes = -(-ntasks // per_node)
  procs, files = [], []
  for t in range(ntasks):
    node = t // per_node
    name = f"127.0.0.{node + 1}"
    env = dict(
      env0,
      SLURM_STEP_ID="0",
      SLURM_STEPID="0",
      SLURM_STEP_NODELIST=env0["SLURM_JOB_NODELIST"] if step_nodes == nodes else name,
      SLURM_STEP_NUM_NODES=str(step_nodes),
      SLURM_STEP_NUM_TASKS=str(ntasks),
      SLURM_STEP_TASKS_PER_NODE=f"{per_node}(x{step_nodes})",
      SLURM_NTASKS=str(ntasks),
      SLURM_NPROCS=str(ntasks),
      SLURM_CPUS_PER_TASK=str(cpus),
      SLURM_PROCID=str(t),
      SLURM_LOCALID=str(t % per_node),
      SLURM_NODEID=str(node),
      SLURMD_NODENAME=name,
      SLURM_LAUNCH_NODE_IPADDR="127.0.0.1",
    )
    out = None
    if "--output" in options:
      path = options["--output"]
      for key, value in (("%t", t), ("%n", node), ("%N", name), ("%j", env0["SLURM_JOB_ID"])):
        path = path.replace(key, str(value))
      out = open(path, "a" if options.get("--open-mode") == "append" else "w")
      files.append(out)
    procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=out))

  def forward(signum, _frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)
  kill_on_bad_exit = options.get("--kill-on-bad-exit", "0") != "0"
  while any(p.poll() is None for p in procs):
    if kill_on_bad_exit and any(p.returncode not in (None, 0) for p in procs):
      for p in procs:
        if p.poll() is None:
          p.kill()
    time.sleep(0.05)
  for f in files:
    f.close()
  return max(128 - p.returncode if p.returncode < 0 else p.returncode for p in procs)


def scontrol(argv):
  if len(argv) == 2 and argv[0] == "requeue" and re.fullmatch(r"\d+", argv[1]):
    open(os.path.join(os.environ["FAKE_SLURM"], f"requeue_{argv[1]}"), "w").close()
    return 0
  print(f"scontrol (fake): only `requeue JOBID` is known, not {argv}", file=sys.stderr)
  return 1


def main(program):
  argv = sys.argv[1:]
  record(program, argv)
  sys.exit(dict(sbatch=sbatch, srun=srun, scontrol=scontrol)[program](argv))
