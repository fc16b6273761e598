#!/usr/bin/env bash
# GPU smoke test: the first thing to run on a new GPU machine or cluster node (1 or 2 GPUs).
#   bash scripts/gpu_smoke.sh          # on the GPUs here
#   bash scripts/gpu_smoke.sh --cpu    # the same checks on the CPU (CI runs this)
# Extra arguments go to scripts/gpu_smoke.py (--workers N). Exit status 0 = every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s install data
if [[ " $* " != *" --cpu "* ]] && ! command -v nvidia-smi >/dev/null; then
    echo "gpu_smoke: no nvidia-smi on this machine (no NVIDIA driver); use --cpu for CPU mode" >&2
    exit 2
fi
exec .venv/bin/python scripts/gpu_smoke.py "$@"
