#!/usr/bin/env bash
# The demo pipeline, with the demo's settings unchanged, on a corpus nobody tuned them on: the Python 3.11 manual
# (Debian's python3.11-doc, technical prose; code blocks dropped). Checks that the ordering of the results (base
# LM, kNN-LM, memory) holds beyond the Wikipedia default. Usage: bash scripts/other_corpus.sh [extra flags]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
work=${MLPMEM_CORPORA:-runs/corpora}
if [ ! -d "$work/pydoc" ]; then
  mkdir -p "$work/deb"
  (cd "$work/deb" && apt-get download python3.11-doc)
  dpkg-deb -x "$work"/deb/python3.11-doc_*.deb "$work/deb/x"
  .venv/bin/python scripts/html_corpus.py "$work/deb/x/usr/share/doc/python3.11/html" "$work/pydoc.tmp"
  mv "$work/pydoc.tmp" "$work/pydoc"
fi
exec .venv/bin/python -m mlpmem pipeline --config configs/demo.yaml --data.source "$work/pydoc" \
  --out_dir runs/pydoc "$@"
