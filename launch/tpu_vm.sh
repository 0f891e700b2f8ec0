#!/usr/bin/env bash
# Create a Cloud TPU VM (one host or a multi-host slice), install jaxml on every worker, run an
# experiment on all workers at once with the logs streamed back, stop and delete it.
#
#   launch/tpu_vm.sh create --project=P --zone=us-west4-a --name=jx --accelerator-type=v5litepod-8 \
#                           --runtime-version=v2-alpha-tpuv5-lite
#   launch/tpu_vm.sh setup  --project=P --zone=us-west4-a --name=jx      # copy this checkout, run setup.sh
#   launch/tpu_vm.sh run    --project=P --zone=us-west4-a --name=jx --accelerator-type=v5litepod-8 \
#                           -- experiments.gpt --workdir=/mnt/shared/gpt
#   launch/tpu_vm.sh logs | kill | stop | delete  --project=P --zone=us-west4-a --name=jx
#
# --dry-run prints the exact commands (one per line, shell-quoted) instead of running them.
# See launch/README.md for multi-host notes (shared workdir, hangs, the libtpu lock).
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Subcommands: create setup run logs kill stop delete
Arguments:   --project=ID --zone=ZONE --name=TPU_NAME
             --accelerator-type=TYPE (create; run: decides single vs multi host, default v5litepod-8)
             --runtime-version=VERSION (create; e.g. v2-alpha-tpuv5-lite for v5e, tpu-ubuntu2204-base for v4)
             --spot (create: a Spot VM)   --dry-run   -- python module and arguments (run)
EOF
}

die() { echo "error: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || { usage; exit 2; }
SUBCOMMAND="$1"; shift
case "$SUBCOMMAND" in
  create|setup|run|logs|kill|stop|delete) ;;
  -h|--help|help) usage; exit 0 ;;
  *) die "unknown subcommand '$SUBCOMMAND'; expected one of: create setup run logs kill stop delete" ;;
esac

PROJECT="" ZONE="" NAME="" ACCELERATOR="v5litepod-8" RUNTIME="" DRY_RUN=0 SPOT=0
RUN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --name=*) NAME="${1#*=}" ;;
    --accelerator-type=*) ACCELERATOR="${1#*=}" ;;
    --runtime-version=*) RUNTIME="${1#*=}" ;;
    --project|--zone|--name|--accelerator-type|--runtime-version)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      set -- "$1=$2" "${@:3}"; continue ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --) shift; RUN_ARGS=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (experiment arguments go after --)" ;;
  esac
  shift
done

[[ -n "$PROJECT" ]] || die "--project=ID is required"
[[ -n "$ZONE" ]] || die "--zone=ZONE is required (e.g. us-west4-a for v5e, us-central2-b for v4)"
[[ -n "$NAME" ]] || die "--name=TPU_NAME is required"
[[ "$ACCELERATOR" =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-([0-9]+)$ ]] \
  || die "--accelerator-type=$ACCELERATOR: expected e.g. v5litepod-8, v4-32, v5p-16, v6e-8"
GENERATION="${BASH_REMATCH[1]}" SIZE="${BASH_REMATCH[2]}"

# Hosts in the slice: v2/v3/v4/v5p are named by TensorCores (8 per host); v5e/v6e by chips,
# 8 on a single host (…-8 and smaller), 4 per host in larger slices.
case "$GENERATION" in
  v5litepod|v6e) if (( SIZE <= 8 )); then HOSTS=1; else HOSTS=$(( SIZE / 4 )); fi ;;
  *) HOSTS=$(( (SIZE + 7) / 8 )) ;;
esac

WHERE=(--project="$PROJECT" --zone="$ZONE")
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARBALL="/tmp/jaxml-${NAME}.tar.gz"
REMOTE_DIR='~/jaxml'  # expanded by the worker's shell
LOG='~/jaxml_run.log'
PIDFILE='~/jaxml_run.pid'

# One argument as the shell reads it: bare when it is plain, else in single quotes (after the
# `--flag=` of a flag, so the line reads like the gcloud documentation's).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  elif [[ "$1" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    local flag="${BASH_REMATCH[1]}" value="${BASH_REMATCH[2]}"
    printf "%s'%s'" "$flag" "${value//\'/\'\\\'\'}"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# Print (dry run) or run one command; the printed line is the exact command, copy-pasteable.
step() {
  if (( DRY_RUN )); then
    local out="" a
    for a in "$@"; do out+="$(quote "$a") "; done
    echo "${out% }"
  else
    "$@"
  fi
}

ssh_all() {  # the command runs on every worker of the slice at once; output streams back
  step gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"
}

case "$SUBCOMMAND" in
  create)
    [[ -n "$RUNTIME" ]] || die "--runtime-version is required for create (v2-alpha-tpuv5-lite for v5e, tpu-ubuntu2204-base for v4, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)"
    extra=()
    (( SPOT )) && extra+=(--spot)
    step gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${extra[@]}"
    ;;
  setup)
    # The working tree (uncommitted edits included), without outputs, venvs or git history.
    step tar -czf "$TARBALL" -C "$REPO" --exclude=.git --exclude=workdirs --exclude=.venv \
      --exclude='*.egg-info' --exclude=__pycache__ .
    step gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:~/jaxml.tar.gz" "${WHERE[@]}" --worker=all
    ssh_all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/jaxml.tar.gz -C $REMOTE_DIR && bash $REMOTE_DIR/launch/setup.sh --accelerator=tpu --install-python"
    ;;
  run)
    [[ ${#RUN_ARGS[@]} -ge 1 ]] || die "run needs the module and its arguments after --, e.g. -- experiments.gpt --workdir=/mnt/shared/gpt"
    [[ "${RUN_ARGS[0]}" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "run: '${RUN_ARGS[0]}' is not a python module name (e.g. experiments.gpt)"
    args=("${RUN_ARGS[@]:1}")
    # Every worker runs the same program (multi-host SPMD); JAX finds its peers through the TPU
    # metadata server once told this is a multi-process run.
    (( HOSTS > 1 )) && args+=(--distributed=true)
    quoted=""
    for a in "${args[@]}"; do quoted+=" $(quote "$a")"; done
    ssh_all "cd $REMOTE_DIR && source .venv/bin/activate && echo \$\$ > $PIDFILE && exec python -m ${RUN_ARGS[0]}${quoted} 2>&1 | tee $LOG"
    ;;
  logs)
    ssh_all "tail -n 200 -F $LOG"
    ;;
  kill)
    # Ends the run on every worker and frees the TPU (a leftover process holds /dev/accel*).
    ssh_all "pkill -TERM -s \$(ps -o sid= -p \$(cat $PIDFILE) | tr -d ' ') 2>/dev/null; sleep 5; sudo rm -f /tmp/libtpu_lockfile"
    ;;
  stop)
    (( HOSTS == 1 )) || echo "note: $ACCELERATOR spans $HOSTS hosts; Cloud TPU cannot stop multi-host slices, only delete them" >&2
    step gcloud compute tpus tpu-vm stop "$NAME" "${WHERE[@]}"
    ;;
  delete)
    step gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
    ;;
esac
