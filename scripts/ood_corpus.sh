#!/usr/bin/env bash
# The default out-of-domain corpus (`--eval.ood_source`), also the corpus of scripts/other_corpus.sh: the Python 3.11
# manual (Debian's python3.11-doc; technical prose, code blocks dropped by scripts/html_corpus.py), one .txt per
# page in $MLPMEM_CORPORA/pydoc (default runs/corpora/pydoc). Built once; prints its path (only that, on stdout).
# Usage: bash scripts/ood_corpus.sh, then e.g. mlpmem eval --eval.ood_source runs/corpora/pydoc
set -euo pipefail
cd "$(dirname "$0")/.."
work=${MLPMEM_CORPORA:-runs/corpora}
py=.venv/bin/python
[ -x "$py" ] || py=python3  # html_corpus.py needs only the standard library
if [ ! -d "$work/pydoc" ]; then
  mkdir -p "$work/deb"
  (cd "$work/deb" && apt-get download python3.11-doc) >&2  # stdout carries only the path
  dpkg-deb -x "$work"/deb/python3.11-doc_*.deb "$work/deb/x"
  "$py" scripts/html_corpus.py "$work/deb/x/usr/share/doc/python3.11/html" "$work/pydoc.tmp" >&2
  mv "$work/pydoc.tmp" "$work/pydoc"
fi
echo "$work/pydoc"
