#!/usr/bin/env bash
# Install jaxml from this checkout into a virtual environment and print the devices JAX sees.
# Idempotent: re-running reuses the venv and only reinstalls when pyproject.toml or the
# accelerator changed. Works on a fresh TPU VM, a GPU machine or a laptop (CPU).
#
#   bash launch/setup.sh                       # accelerator detected: tpu, gpu or cpu
#   bash launch/setup.sh --accelerator=gpu --venv=$HOME/venvs/jaxml
#   bash launch/setup.sh --dry-run             # print the commands only
#
# Options: --accelerator=auto|tpu|gpu|cpu  --venv=DIR (default <checkout>/.venv)
#          --python=PYTHON (default: python3.12, python3.11 or python3, whichever is >= 3.11)
#          --install-python (apt-get python3.11 when the machine has none, e.g. Ubuntu 22.04 TPU VMs)
#          --extras=a,b (more extras, e.g. notebook,tensorboard)  --no-preflight  --dry-run
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ACCELERATOR=auto VENV="$REPO/.venv" PYTHON="" INSTALL_PYTHON=0 EXTRAS="" PREFLIGHT=1 DRY_RUN=0

die() { echo "error: $*" >&2; exit 2; }

for arg in "$@"; do
  case "$arg" in
    --accelerator=*) ACCELERATOR="${arg#*=}" ;;
    --venv=*) VENV="${arg#*=}" ;;
    --python=*) PYTHON="${arg#*=}" ;;
    --install-python) INSTALL_PYTHON=1 ;;
    --extras=*) EXTRAS="${arg#*=}" ;;
    --no-preflight) PREFLIGHT=0 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$arg'; see --help" ;;
  esac
done
case "$ACCELERATOR" in
  auto|tpu|gpu|cpu) ;;
  *) die "--accelerator=$ACCELERATOR: expected auto, tpu, gpu or cpu" ;;
esac
[[ -z "$EXTRAS" || "$EXTRAS" =~ ^[a-z0-9_-]+(,[a-z0-9_-]+)*$ ]] || die "--extras=$EXTRAS: expected names like notebook,tensorboard"

step() {  # print the command; run it unless --dry-run
  echo "+ $*"
  (( DRY_RUN )) || "$@"
}

if [[ "$ACCELERATOR" == auto ]]; then
  if compgen -G "/dev/accel*" > /dev/null || compgen -G "/dev/vfio/[0-9]*" > /dev/null; then ACCELERATOR=tpu
  elif command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then ACCELERATOR=gpu
  else ACCELERATOR=cpu; fi
  echo "accelerator: $ACCELERATOR (detected; --accelerator= to choose)"
fi

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2> /dev/null; }
if [[ -z "$PYTHON" ]]; then
  for candidate in python3.12 python3.11 python3; do
    if command -v "$candidate" > /dev/null && python_ok "$candidate"; then PYTHON="$candidate"; break; fi
  done
fi
if [[ -z "$PYTHON" ]]; then
  (( INSTALL_PYTHON )) || die "jaxml needs Python >= 3.11 and this machine has none; install one (Ubuntu 22.04: sudo apt-get install -y python3.11 python3.11-venv) or re-run with --install-python"
  step sudo apt-get update -q
  step sudo apt-get install -y -q python3.11 python3.11-venv
  PYTHON=python3.11
fi
(( DRY_RUN )) || python_ok "$PYTHON" || die "--python=$PYTHON is not a Python >= 3.11"

case "$ACCELERATOR" in
  tpu) extras="tpu" ;;
  gpu) extras="gpu" ;;
  cpu) extras="" ;;
esac
[[ -n "$EXTRAS" ]] && extras="${extras:+$extras,}$EXTRAS"
target="$REPO${extras:+[$extras]}"

if [[ -x "$VENV/bin/python" ]]; then
  echo "venv: $VENV (exists, reused)"
else
  step "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when what is asked for changed: the stamp holds pyproject.toml's hash and the extras.
stamp="$VENV/.jaxml-install"
want="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1) [$extras]"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "jaxml: already installed in $VENV ($target)"
else
  step "$VENV/bin/python" -m pip install --quiet --upgrade pip
  step "$VENV/bin/python" -m pip install --quiet -e "$target"
  (( DRY_RUN )) || echo "$want" > "$stamp"
fi

if (( PREFLIGHT )); then
  # The devices JAX sees, and one tiny computation on them (catches a TPU held by another
  # process, a CUDA/driver mismatch, or a CPU-only jaxlib on an accelerator machine).
  step "$VENV/bin/python" - <<'EOF'
import jax, jax.numpy as jnp
import jaxml
devices = jax.devices()
print(f"jax {jax.__version__}: backend {jax.default_backend()}, {jax.device_count()} devices "
      f"({jax.local_device_count()} local), process {jax.process_index()} of {jax.process_count()}")
for d in devices[:16]:
    print(f"  {d.id}: {d.device_kind} ({d.platform})")
if len(devices) > 16:
    print(f"  ... and {len(devices) - 16} more")
x = jnp.arange(8.0)
print(f"check: sum(arange(8)) = {float(x.sum())} on {x.devices()}")
EOF
fi
echo "done: activate with  source $VENV/bin/activate  then e.g.  python -m experiments.cnn"
