"""The launchers executed: launch/local.sh (N processes here) and
launch/tpu_pod.sh against a fake gcloud (tests/fake_cloud/gcloud).

The pod's 2-process run is held to one uninterrupted process of the same 8
devices reading the stream in 2 shards.

The fake runs each `ssh --worker=all` command as one local process per worker,
each in its own home folder, with a TPU VM's metadata server for its worker
number and the slice's hosts; two workers of 4 CPU devices each are one pod.
`setup` really installs the project with uv into each worker's environment,
and the runs use it: the commands here are launch/README.md's.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import TINY_CONFIG_FLAG, digits_config

from monoformer_jax.digits.source import cache_dir, digits_dir
from monoformer_jax.train.loop import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")
FAKE = os.path.join(REPO, "tests", "fake_cloud")
# The pod run saves every EVERY steps and never reaches STEPS: the test
# interrupts and stops it however slowly a busy machine runs it.
STEPS = 200
EVERY = 2
METRICS = ("loss", "diff", "lm", "grad_norm")
TRAIN_ARGS = [
  "--config=configs/digits.py:tiny",  # relative: the runs start in the project's folder
  f"--config.train.num_steps={STEPS}",
  f"--config.train.checkpoint_every={EVERY}",
  "--config.sample.num_per_class=0",  # no end-of-run images: not what is tested here
  "--config.sample.max_new_tokens=1",
]


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cloud(root, tpus: dict, uv_cache, **env) -> dict:
  """A fake cloud in `root` holding `tpus` ({name: workers}); the environment
  for tpu_pod.sh that reaches it."""
  root.mkdir(parents=True, exist_ok=True)
  vm_env = dict(
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    # The suite's compiler setting (conftest.py), so the workers compile as fast as
    # the tests' own processes and their programs as the reference run's.
    JAX_DISABLE_MOST_OPTIMIZATIONS=os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"],
    UV_CACHE_DIR=str(uv_cache),  # one download for every worker of the session
    RESTART_DELAY="0",
    # One compilation cache for the pod, as a bucket would be (JAX writes it from
    # process 0 only): a restart loads its step instead of compiling it.
    MONOFORMER_COMPILATION_CACHE=os.environ["MONOFORMER_COMPILATION_CACHE"],
  )
  (root / "tpus.json").write_text(
    json.dumps({name: dict(spec, env=vm_env) for name, spec in tpus.items()})
  )
  return dict(
    os.environ,
    FAKE_CLOUD=str(root),
    # A VM's own Python and tools, not this test's virtual environment.
    FAKE_VM_PATH=f"{sys.base_prefix}/bin:/usr/local/bin:/usr/bin:/bin",
    PATH=f"{FAKE}:{os.environ['PATH']}",
    ZONE="us-east5-a",
    **env,
  )


def _pod(env, *args, timeout=240, **extra):
  return subprocess.run(
    ["bash", TPU_POD, *args],
    env=dict(env, **extra),
    capture_output=True,
    text=True,
    timeout=timeout,
    cwd=REPO,
  )


def _calls(env) -> list[list[str]]:
  with open(os.path.join(env["FAKE_CLOUD"], "calls.jsonl")) as f:
    return [json.loads(line) for line in f]


def _until(condition, what: str, timeout: float = 180):
  deadline = time.time() + timeout
  while not (value := condition()):
    assert time.time() < deadline, f"{what}: not within {timeout} s"
    time.sleep(0.2)
  return value


def _pids(out_file, n: int, proc, deadline: float) -> list[int]:
  while True:
    found = re.findall(r"process (\d+): pid (\d+)", out_file.read_text())
    if len(found) == n:
      return [int(pid) for _, pid in sorted(found)]
    assert proc.poll() is None, out_file.read_text()
    assert time.time() < deadline, "launch/local.sh did not start its processes"
    time.sleep(0.1)


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
  """A 2-worker slice `pod`, set up (twice: the second finds it done)."""
  root = tmp_path_factory.mktemp("cloud")
  uv_cache = tmp_path_factory.getbasetemp() / "uv_cache"
  env = _cloud(root, {"pod": {"workers": 2}}, uv_cache, TPU="pod")
  done = _pod(env, "setup", timeout=280)
  assert done.returncode == 0, done.stdout + done.stderr
  commit = subprocess.check_output(["git", "-C", REPO, "rev-parse", "HEAD"], text=True).strip()
  homes = [root / "pod" / f"worker_{i}" / "monoformer_jax" for i in range(2)]
  for home in homes:
    assert (home / ".launch" / "commit").read_text().strip() == commit
    version = subprocess.check_output(
      [home / ".venv" / "bin" / "python", "-c", "import sys; print(sys.version_info[:2])"],
      text=True,
    )
    assert eval(version) >= (3, 11)
  printed = re.findall(
    r"Python (3\.\d+)\.\d+, jax (\S+), jaxlib \S+, libtpu (\S+), commit (\w+)",
    done.stdout + done.stderr,
  )
  assert len(printed) == 2 and all(p[0] >= "3.11" and p[3] == commit for p in printed), printed
  calls = _calls(env)  # launch/README.md's: one copy and one command per slice
  assert [c[:4] for c in calls] == [
    ["compute", "tpus", "tpu-vm", "scp"],
    ["compute", "tpus", "tpu-vm", "ssh"],
  ]
  assert calls[0][5:] == ["pod:monoformer_jax_code.tar.gz", "--worker=all", "--zone=us-east5-a"]
  assert calls[1][4:6] == ["pod", "--worker=all"] and calls[1][-1] == "--zone=us-east5-a"

  # Again, with a file of the user's in the folder: kept, and nothing reinstalled.
  (homes[0] / "my_tokenizer.model").write_text("mine")
  again = _pod(env, "setup", timeout=120)
  assert again.returncode == 0, again.stdout + again.stderr
  assert (homes[0] / "my_tokenizer.model").read_text() == "mine"
  assert "installing uv" not in again.stdout + again.stderr
  yield env, homes
  for home in homes:  # a failed test leaves no run going
    for name in ("supervisor", "child"):
      pid = home / ".launch" / f"{name}.pid"
      if pid.exists():
        try:
          os.kill(int(pid.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
          pass


def _worker_scripts(folder):
  """launch/pod_worker.sh and the common.sh it sources, copied into `folder`."""
  folder.mkdir(parents=True)
  for name in ("pod_worker.sh", "common.sh"):
    shutil.copy(os.path.join(REPO, "launch", name), folder / name)


def _log(home, process: int) -> str:
  """What the last launch on that worker logged."""
  path = home / "logs" / f"worker_{process}.log"
  return path.read_text().rsplit("=== launched ", 1)[-1] if path.exists() else ""


def _history(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r for r in map(json.loads, lines)}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_pod_run_survives_a_dropped_ssh_restarts_after_preemption_and_stops(pod, tmp_path):
  """The pod run is followed, loses its SSH connection, has a worker
  preempted, is restarted by the supervisors and is stopped: its steps are the
  reference's."""
  env, homes = pod
  data_dir = cache_dir(digits_config())
  digits_dir(data_dir)  # prepared once, here, for both workers
  data = f"--config.data.dir={data_dir}"

  env = dict(env, COORDINATOR_PORT=str(_free_port()))
  workdir = tmp_path / "run"
  follower = subprocess.Popen(
    ["bash", TPU_POD, "run", "train", f"--workdir={workdir}", *TRAIN_ARGS, data],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    cwd=REPO,
    start_new_session=True,
  )
  _until((workdir / "checkpoints" / "2").exists, "step 2 saved", 240)
  os.killpg(follower.pid, signal.SIGTERM)  # the connection drops
  shown = follower.communicate(timeout=30)[0]
  assert "following worker 0's log" in shown and f"step 1/{STEPS}" in shown, shown[-3000:]
  # What it ran (launch/README.md): a detached start on every worker, then worker 0's log.
  ssh = [c[4:] for c in _calls(env) if c[3] == "ssh"][-2:]  # after the set-ups
  guard = "--command=test -f monoformer_jax/launch/pod_worker.sh || { echo "
  assert ssh[0][:2] == ["pod", "--worker=all"] and ssh[0][2].startswith(guard)
  assert (
    f"; MAX_RESTARTS=3 COORDINATOR_PORT={env['COORDINATOR_PORT']} "
    f"bash monoformer_jax/launch/pod_worker.sh start train --workdir={workdir} "
  ) in ssh[0][2]
  assert ssh[1][:2] == ["pod", "--worker=0"] and ssh[1][2].startswith(guard)
  assert ssh[1][2].endswith("; bash monoformer_jax/launch/pod_worker.sh logs")
  children = [int((h / ".launch" / "child.pid").read_text()) for h in homes]
  _until((workdir / "checkpoints" / "4").exists, "step 4 saved after the drop")
  for pid in children:
    os.kill(pid, 0)  # the same processes: the hang-up did not reach them

  # A preemption of worker 1: both save one step and the supervisors restart them.
  os.kill(children[1], signal.SIGTERM)
  saved = [
    _until(
      lambda h=h, i=i: re.findall(
        r"preempted \(SIGTERM\): saved step (\d+) on every host", _log(h, i)
      ),
      "the preemption save",
    )
    for i, h in enumerate(homes)
  ]
  assert saved[0] == saved[1], saved
  preempted_at = int(saved[0][0])
  for i, home in enumerate(homes):
    _until(lambda h=home, i=i: "(restart 1 of 3)" in _log(h, i), "the restart")
    assert "preempted after saving (exit 75): restart 1 of 3" in _log(home, i)
  _until(
    lambda: f"step {preempted_at + 1}/{STEPS}" in _log(homes[0], 0), "a step after the restart"
  )
  going = _pod(env, "status").stdout
  assert going.count(": running (supervisor pid") == 2, going

  # `stop`: both save the same step; nothing restarts them.
  stopped = _pod(env, "stop")
  assert stopped.returncode == 0, stopped.stdout + stopped.stderr
  logs = [_log(h, i) for i, h in enumerate(homes)]
  at = [re.findall(r"saved step (\d+) on every host", log)[-1] for log in logs]
  assert at[0] == at[1] and preempted_at < int(at[0]), at
  stopped_at = int(at[0])
  for log in logs:
    assert log.rstrip().endswith("stopped on request, not restarted"), log[-2000:]
  ended = _pod(env, "status").stdout
  assert ended.count("Z: preempted after saving (exit 75), 1 restart(s), log ") == 2, ended
  shown = _pod(env, "logs", "1", TAIL_LINES="1")
  assert shown.stdout.rstrip().endswith("stopped on request, not restarted"), shown.stdout

  # One process on another mesh resumes the stopped run to the end.
  end = stopped_at + 4
  other_mesh = digits_config(num_steps=end)
  other_mesh.mesh.update(data=2, fsdp=4)
  train_and_evaluate(other_mesh, str(workdir), sample_at_end=False)

  # One curve, the reference's, across the drop, the restart, the stop and the new mesh.
  # One process of the 8 devices, a shard per worker's, on that mesh (its step is
  # the one just compiled).
  config = digits_config(num_steps=end, checkpoint_every=end)
  config.data.shards = 2
  config.mesh.update(data=2, fsdp=4)
  train_and_evaluate(config, str(tmp_path / "one"), sample_at_end=False)
  reference, resumed = _history(tmp_path / "one"), _history(workdir)
  assert sorted(resumed) == list(range(1, end + 1))
  for step in resumed:
    for key in METRICS:
      np.testing.assert_allclose(
        resumed[step][key], reference[step][key], rtol=1e-4, err_msg=f"{key}@{step}"
      )


# A stand-in for `python -m monoformer_jax.train` in the environment VENV names:
# it reports its arguments and environment, then either runs until SIGTERM and
# exits 75 as a preempted run does (saved, resumable), or, given a learning rate
# of 1e30, exits 2 as a diverged run does (train's divergence -> status 2 is
# test_failures.py's; training through the launchers is the pod test's above).
_TRAIN = """
import json, os, signal, sys, time
keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
print("stand-in", json.dumps([sys.argv[1:], {k: os.environ.get(k) for k in keys}]), flush=True)
if "--config.optim.lr=1e30" in sys.argv:
  print("step 3 is not finite (loss); the state stopped at step 2", file=sys.stderr)
  sys.exit(2)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
print("going", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_diverged_run_is_not_restarted(tmp_path):
  """launch/pod_worker.sh alone, as a GKE pod runs it (TPU_WORKER_ID and
  TPU_WORKER_HOSTNAMES in the environment, no metadata server), one worker,
  in the environment VENV names (a stand-in train, _TRAIN): a run still going
  is stopped by its pids when another is started, and the new run, which
  diverges and exits 2, is not retried by the supervisor."""
  project = tmp_path / "project"
  _worker_scripts(project / "launch")
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (tmp_path / "train.py").write_text(_TRAIN)
  python = venv / "bin" / "python"
  python.write_text(f'#!/bin/bash\nexec {sys.executable} {tmp_path / "train.py"} "$@"\n')
  python.chmod(0o755)
  port = str(_free_port())
  env = dict(
    os.environ,
    VENV=str(venv),
    TPU_WORKER_ID="0",
    TPU_WORKER_HOSTNAMES="localhost",
    COORDINATOR_PORT=port,
    RESTART_DELAY="0",
  )
  start = ["bash", str(project / "launch" / "pod_worker.sh"), "start", "train", TINY_CONFIG_FLAG]
  # A run that goes on until it is stopped, then one that diverges.
  going = [f"--workdir={tmp_path / 'going'}", *TRAIN_ARGS[1:]]
  first = subprocess.run(start + going, env=env, capture_output=True, text=True, timeout=60)
  assert first.returncode == 0, first.stderr
  stale = int((project / ".launch" / "supervisor.pid").read_text())
  # Its python is up, its SIGTERM handler set: what a stop then finds is a run going.
  child_pid = project / ".launch" / "child.pid"
  child = int(
    _until(
      lambda: "going" in _log(project, 0) and child_pid.exists() and child_pid.read_text().strip(),
      "the first run going",
      60,
    )
  )
  # Started again: the run still going is stopped first, by its pids.
  args = [f"--workdir={tmp_path / 'run'}", *TRAIN_ARGS[1:]]
  args += ["--config.optim.lr=1e30", "--config.optim.warmup_steps=5"]
  started = subprocess.run(start + args, env=env, capture_output=True, text=True, timeout=60)
  assert started.returncode == 0, started.stderr
  assert "process 0 of 1: stopped the run that was still going" in started.stdout
  assert "process 0 of 1: started python -m monoformer_jax.train" in started.stdout
  for pid in (stale, child):
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)
  first_log = (project / "logs" / "worker_0.log").read_text().split("=== launched ")[1]
  assert "preempted after saving (exit 75): stopped on request, not restarted" in first_log, (
    first_log[-2000:]
  )
  _until((project / ".launch" / "exit").exists, "the end", 60)
  log = _log(project, 0)
  # The module and its arguments reach the environment's python, with the
  # single process's coordinates.
  (reported,) = re.findall(r"^stand-in (.*)$", log, re.M)
  assert json.loads(reported) == [
    ["-m", "monoformer_jax.train", TINY_CONFIG_FLAG, *args],
    {
      "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
      "JAX_NUM_PROCESSES": "1",
      "JAX_PROCESS_ID": "0",
    },
  ]
  assert "step 3 is not finite" in log
  assert log.rstrip().endswith(
    "a config error or a diverged run (exit 2): not restarted (a rerun would repeat it)"
  ), log[-2000:]
  assert log.count("running monoformer_jax.train") == 1
  assert (project / ".launch" / "exit").read_text().startswith("2 ")


def test_two_slices_get_the_multislice_environment(tmp_path):
  """SLICES=2 over two 2-worker slices: slice 0's first worker coordinates,
  processes are numbered slice by slice (DRY_RUN prints what `run` would start)."""
  ips = {"ms-0": ["10.0.0.2", "10.0.0.3"], "ms-1": ["10.0.1.2", "10.0.1.3"]}
  env = _cloud(
    tmp_path, {n: {"workers": 2, "ips": i} for n, i in ips.items()}, tmp_path, TPU="ms", SLICES="2"
  )
  for name in ips:  # the scripts as `setup` puts them there
    for i in range(2):
      _worker_scripts(tmp_path / name / f"worker_{i}" / "monoformer_jax" / "launch")
  dry = _pod(env, "run", "train", "--workdir=gs://b/run", "--config.mesh.dcn_data=2", DRY_RUN="1")
  assert dry.returncode == 0, dry.stdout + dry.stderr
  found = {}
  for line in dry.stdout.splitlines():
    name = re.match(
      r"process (\d) of 4: would run \S+/python -m monoformer_jax.train "
      r"--workdir=gs://b/run --config.mesh.dcn_data=2 .* with (.*)",
      line,
    )
    if name:
      found[int(name[1])] = dict(kv.split("=", 1) for kv in name[2].split())
  assert sorted(found) == [0, 1, 2, 3], dry.stdout
  for process, values in found.items():
    assert values == {
      "JAX_COORDINATOR_ADDRESS": "10.0.0.2:8482",
      "JAX_NUM_PROCESSES": "4",
      "JAX_PROCESS_ID": str(process),
      "MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080",
      "MEGASCALE_NUM_SLICES": "2",
      "MEGASCALE_SLICE_ID": str(process // 2),
      "MEGASCALE_PORT": "8080",
    }
  # The slices are started at once: their ssh calls come in either order.
  calls = [(c[3], c[4]) for c in _calls(env)]
  assert calls[0] == ("describe", "ms-0") and sorted(calls[1:]) == [
    ("ssh", "ms-0"),
    ("ssh", "ms-1"),
  ]


def test_bad_requests_stop_before_any_gcloud_call(tmp_path):
  env = _cloud(tmp_path, {"pod": {"workers": 2}}, tmp_path, TPU="pod")
  wrong = _pod(env, "run", "--config=configs/digits.py")
  assert wrong.returncode == 2
  assert "error: MODULE '--config=configs/digits.py' is not one of train, prepare" in wrong.stderr
  assert _pod(env, "launch").returncode == 2
  no_zone = _pod(dict(env, ZONE=""), "status")
  assert no_zone.returncode != 0 and "set ZONE" in no_zone.stderr
  restarts = _pod(env, "run", "train", MAX_RESTARTS="three")
  assert "error: MAX_RESTARTS=three must be a whole number (0: never restart)" in restarts.stderr
  commit = _pod(env, "setup", COMMIT="no-such-branch")
  assert commit.returncode == 2
  assert f"error: COMMIT=no-such-branch is not a commit of {REPO}" in commit.stderr
  assert not (tmp_path / "calls.jsonl").exists()
  # A worker without the project: one line naming the fix, from every worker.
  missing = _pod(env, "status")
  assert missing.returncode == 2
  said = re.findall(
    r"^error: no ~/monoformer_jax on \S+: run launch/tpu_pod.sh setup first$", missing.stderr, re.M
  )
  assert len(said) == 2, missing.stderr


_PROCESS = """
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))  # as train: saved, resumable
keys = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS")
print(json.dumps({k: os.environ.get(k) for k in keys}), flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(120)
def test_local_sh_starts_n_processes_logs_beside_the_run_and_passes_sigterm_on(tmp_path):
  """launch/local.sh 2 with a stand-in process that reports its environment
  and exits 75 on SIGTERM, as a preempted run does (the 2-process training
  itself is the pod's test above: the same variables reach jax.distributed)."""
  workdir = tmp_path / "run"
  out = tmp_path / "local.out"
  with open(out, "w") as f:
    proc = subprocess.Popen(
      [
        "bash",
        os.path.join(REPO, "launch", "local.sh"),
        "2",
        "--",
        sys.executable,
        "-c",
        _PROCESS,
        f"--workdir={workdir}",
      ],
      env=dict(
        os.environ, XLA_FLAGS="--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"
      ),
      stdout=f,
      stderr=subprocess.STDOUT,
      cwd=tmp_path,
    )
  logs = [workdir / "logs" / f"process_{i}.log" for i in range(2)]
  seen = [
    _until(
      lambda p=p: re.findall(r"^(\{.*\})$", p.read_text() if p.exists() else "", re.M),
      "the processes' reports",
      60,
    )
    for p in logs
  ]
  proc.send_signal(signal.SIGTERM)  # Ctrl-C or a SIGTERM to local.sh: to every process
  assert proc.wait(timeout=60) == 75, out.read_text()
  reports = [json.loads(s[0]) for s in seen]
  port = reports[0]["JAX_COORDINATOR_ADDRESS"].split(":")[1]
  for i, report in enumerate(reports):
    assert report == {
      "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
      "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": str(i),
      # The 8 devices split between them; the other flags kept.
      "XLA_FLAGS": "--xla_dump_to=/tmp/x  --xla_force_host_platform_device_count=4",
    }
    assert logs[i].read_text().startswith("=== launched ")
  shown = out.read_text()
  assert f"logs in {workdir / 'logs'}/" in shown and "process 1 exited with status 75" in shown
  assert not (tmp_path / "launch_logs").exists()
