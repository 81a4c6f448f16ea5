#!/usr/bin/env bash
# Set up (if needed) and run the main job on the offline default: the whole MLP-memory pipeline on SmolLM2-135M
# and Wikipedia leads (prepare -> extract -> index -> knn-targets -> train -> eval -> generate), ending with the
# results table. Extra arguments are passed on, e.g. `bash scripts/demo.sh --config configs/full.yaml`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- --config configs/demo.yaml; fi
exec .venv/bin/mlpmem pipeline "$@"
