# What the launchers share (sourced by local.sh, tpu_pod.sh, pod_worker.sh and
# gpu_slurm.sh): the modules they run, where a run's logs go, a child's exit status.

MODULES="train, prepare, evaluate, sample, compile, convert"

# module_of NAME: the module `python -m` runs for a launcher's MODULE name;
# status 2, printing nothing, for another name (the caller says so its own way).
module_of() {
  case $1 in
    train | evaluate | sample | compile | convert) echo "monoformer_jax.$1" ;;
    prepare) echo monoformer_jax.data.prepare ;;
    *) return 2 ;;
  esac
}

# local_workdir ARGS...: the --workdir among a command's arguments when it is
# a local folder (a run's logs go beside it), else nothing (none, or a bucket:
# logs are local files).
local_workdir() {
  local arg workdir="" next=0
  for arg in "$@"; do
    if (( next )); then workdir=$arg; next=0; fi
    case $arg in
      --workdir=*) workdir=${arg#--workdir=} ;;
      --workdir) next=1 ;;
    esac
  done
  if [[ $workdir != *://* ]]; then echo "$workdir"; fi
}

# status_of PID: the exit status of the child PID, in `code`. A trapped signal
# makes `wait` return at once with a status over 128: wait again while PID
# runs; if it has ended meanwhile, a second `wait` gives its own status (127:
# the first was it).
status_of() {
  local again
  while true; do
    set +e; wait "$1"; code=$?; set -e
    (( code > 128 )) || return 0
    kill -0 "$1" 2>/dev/null && continue
    set +e; wait "$1" 2>/dev/null; again=$?; set -e
    (( again == 127 )) || code=$again
    return 0
  done
}
