#!/usr/bin/env bash
# Start an MLflow tracking server bound to 127.0.0.1 (once: does nothing when one answers).
#   scripts/mlflow_server.sh [STORE_DIR] [PORT]     defaults: runs 5000
# Runs and the registry go to STORE_DIR/mlflow.db (SQLite), artifacts to STORE_DIR/mlartifacts,
# the log to STORE_DIR/mlflow-server.log. Reach it from your laptop through an SSH tunnel:
#   ssh -L 5000:127.0.0.1:5000 HEAD   then open http://127.0.0.1:5000
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-runs}"; port="${2:-5000}"
py="$root/.venv/bin/python"
up() { "$py" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; }
if up; then echo "MLflow server already answers on http://127.0.0.1:$port"; exit 0; fi
mkdir -p "$dir"; dir="$(cd "$dir" && pwd)"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup "$py" -m mlflow server --host 127.0.0.1 \
  --port "$port" --workers 2 --backend-store-uri "sqlite:///$dir/mlflow.db" \
  --artifacts-destination "$dir/mlartifacts" >"$dir/mlflow-server.log" 2>&1 &
for _ in $(seq 120); do
  if up; then echo "MLflow server on http://127.0.0.1:$port (store $dir/mlflow.db)"; exit 0; fi
  sleep 0.5
done
echo "MLflow server did not come up; see $dir/mlflow-server.log" >&2
exit 1
