#!/usr/bin/env bash
# The default out-of-domain corpus (`--eval.ood_source`): the Python 3.11 manual (Debian's python3.11-doc; technical
# prose, code blocks dropped by scripts/html_corpus.py), its pages cut into parts of ~400 words, one .txt per part,
# in $MLPMEM_CORPORA/pydoc-parts (default runs/corpora/pydoc-parts): 25K tokens then hold ~40 documents, not the
# 5 long pages they did, so intervals over documents mean something. `--pages`: one .txt per whole page in
# $MLPMEM_CORPORA/pydoc (the corpus of scripts/other_corpus.sh). Built once; prints its path (only that, on stdout).
# Usage: bash scripts/ood_corpus.sh, then e.g. mlpmem eval --eval.ood_source runs/corpora/pydoc-parts
set -euo pipefail
cd "$(dirname "$0")/.."
work=${MLPMEM_CORPORA:-runs/corpora}
py=.venv/bin/python
[ -x "$py" ] || py=python3  # html_corpus.py needs only the standard library
name=pydoc-parts; args=(--max-words 400)
[ "${1:-}" = --pages ] && { name=pydoc; args=(); }
if [ ! -d "$work/$name" ]; then
  if [ ! -d "$work/deb/x" ]; then
    mkdir -p "$work/deb"
    (cd "$work/deb" && apt-get download python3.11-doc) >&2  # stdout carries only the path
    dpkg-deb -x "$work"/deb/python3.11-doc_*.deb "$work/deb/x"
  fi
  rm -rf "$work/$name.tmp"
  "$py" scripts/html_corpus.py "$work/deb/x/usr/share/doc/python3.11/html" "$work/$name.tmp" "${args[@]}" >&2
  mv "$work/$name.tmp" "$work/$name"
fi
echo "$work/$name"
