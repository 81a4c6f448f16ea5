#!/usr/bin/env bash
# The demo pipeline, with the demo's settings unchanged, on a corpus nobody tuned them on: the Python 3.11 manual
# (Debian's python3.11-doc, technical prose; code blocks dropped; built by scripts/ood_corpus.sh). Checks that the
# ordering of the results (base LM, kNN-LM, memory) holds beyond the Wikipedia default.
# Usage: bash scripts/other_corpus.sh [extra flags]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
corpus=$(bash scripts/ood_corpus.sh --pages)
exec .venv/bin/python -m mlpmem pipeline --config configs/demo.yaml --data.source "$corpus" \
  --out_dir runs/pydoc "$@"
