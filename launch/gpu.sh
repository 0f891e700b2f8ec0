#!/usr/bin/env bash
# Train on every GPU of this machine. Nothing else is needed: one process sees all the GPUs,
# the mesh spans them (all on the `data` axis by default; FSDP / tensor parallelism by config),
# and the global batch (data.batch_size) is split over them.
#
#   launch/gpu.sh experiments.gpt --config.data.batch_size=256
#   GPUS=0,1 launch/gpu.sh experiments.cnn        # only these GPUs (CUDA_VISIBLE_DEVICES)
#
# Install first with `bash launch/setup.sh --accelerator=gpu` (jax[cuda12]). Several machines:
# launch/slurm.sbatch (one process per machine, each seeing its own GPUs).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  exit $(( $# < 1 ? 2 : 0 ))
fi
MODULE="$1"; shift
[[ "$MODULE" =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || { echo "error: '$MODULE' is not a python module name (e.g. experiments.gpt)" >&2; exit 2; }

[[ -n "${GPUS:-}" ]] && export CUDA_VISIBLE_DEVICES="$GPUS"
# JAX preallocates 75% of each GPU's memory at start; a run that shares the GPUs can lower it.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.75}"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader ${CUDA_VISIBLE_DEVICES:+--id=$CUDA_VISIBLE_DEVICES}
fi
exec python -m "$MODULE" "$@"
