#!/usr/bin/env bash
# GPU smoke check for mlpmem on a fresh single-GPU machine, in about 8 minutes:
#   1. find a Python whose torch sees CUDA (PYTHON, .venv, the system python; else try to pip-install one),
#   2. make the package and its dependencies importable (pip only for what is missing: the machine may be offline),
#   3. run a short pipeline (prepare -> extract -> index -> knn-targets -> train -> eval -> generate) on the offline
#      default model, on cuda in bf16, with tiny.yaml-like but larger sizes,
#   4. run `mlpmem bench` with small datastore sizes,
#   5. print the results and copy the key files to $OUT (the device runner fetches at most 8 files from there).
#
# Usage: bash scripts/gpu_check.sh   (env: PYTHON, OUT, WORK, MODEL=<model dir or .gguf>, CORPUS=<path>,
#                                     DEVICE=cuda; DEVICE=cpu dry-runs the script's logic on a machine without GPU;
#                                     PIPELINE_ARGS / BENCH_ARGS: extra flags appended to those commands,
#                                     PIPELINE_TIMEOUT / BENCH_TIMEOUT: their limits in seconds, 330 and 300)
# If the default model cannot be fetched (no network, no cache) and MODEL is unset, a small random Llama and a
# synthetic corpus are used instead, so the CUDA code paths are still exercised (the numbers then mean little).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/mlpmem-gpu-check/out}
WORK=${WORK:-/tmp/mlpmem-gpu-check}
mkdir -p "$OUT" "$WORK"
LOG="$WORK/gpu_check.log"
: >"$LOG"
export MLPMEM_NO_PROGRESS=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
DEVICE=${DEVICE:-cuda}
T0=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
die() { say "FAILED: $*"; cp "$LOG" "$OUT/" 2>/dev/null; exit 1; }

# ----------------------------------------------------------------------------- 1. python with CUDA torch
has_cuda() {
  [ "$DEVICE" = cpu ] && { "$1" -c 'import torch' >/dev/null 2>&1; return; }
  "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}
PY=""
for cand in ${PYTHON:-} "$ROOT/.venv-gpu/bin/python" "$ROOT/.venv/bin/python" python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && has_cuda "$cand"; then PY=$(command -v "$cand"); break; fi
done
if [ -z "$PY" ]; then
  say "no python with CUDA torch found; trying a venv + pip install torch (needs network)"
  python3 -m venv --system-site-packages "$ROOT/.venv-gpu" >>"$LOG" 2>&1 || die "cannot create a venv"
  timeout 300 "$ROOT/.venv-gpu/bin/pip" install -q torch >>"$LOG" 2>&1 || true
  has_cuda "$ROOT/.venv-gpu/bin/python" || die "no CUDA torch: install one (pip install torch) or set PYTHON"
  PY="$ROOT/.venv-gpu/bin/python"
fi
say "python: $PY"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
                               torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")' | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  | tee -a "$LOG"

# ----------------------------------------------------------------------------- 2. dependencies and the package
# module name -> pip requirement; torch is never reinstalled (that could replace the CUDA build by a CPU one)
declare -A REQ=([transformers]="transformers>=5.0,<6" [tokenizers]="tokenizers>=0.21" [safetensors]="safetensors>=0.4"
  [gguf]="gguf>=0.10" [accelerate]="accelerate>=1.0" [faiss]="faiss-cpu>=1.8" [numpy]="numpy>=1.26" [yaml]="pyyaml>=6"
  [tqdm]="tqdm>=4.66" [matplotlib]="matplotlib>=3.8" [datasets]="datasets>=3.0")
missing=()
for mod in "${!REQ[@]}"; do
  [ "$mod" = datasets ] && continue  # optional: only hf: corpora need it
  "$PY" -c "import $mod" >/dev/null 2>&1 || missing+=("${REQ[$mod]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing missing dependencies: ${missing[*]}"
  # into a folder of our own on PYTHONPATH: never touch the python's environment (it may be a venv, whose
  # packages a second venv would not see, or hold the CUDA torch that a resolver could replace)
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  # an offline machine (no package index) must fail fast, not retry for minutes
  timeout 120 "$PY" -m pip install -q --retries 0 --timeout 10 --target "$WORK/site" "${missing[@]}" >>"$LOG" 2>&1 \
    || say "pip install failed (offline? carry wheels and put them on PYTHONPATH)"
  for mod in "${!REQ[@]}"; do
    [ "$mod" = datasets ] && continue
    "$PY" -c "import $mod" >/dev/null 2>&1 || die "python module '$mod' is missing and could not be installed"
  done
fi
# the package itself: no install needed, the source tree is on the path (works offline, no build backend)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m mlpmem.cli --version >>"$LOG" 2>&1 || die "mlpmem does not import (see $LOG)"
"$PY" -c 'import faiss; print("faiss", faiss.__version__, "GPUs seen by faiss:", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)' \
  | tee -a "$LOG"

# ----------------------------------------------------------------------------- 3. model and corpus
MODEL_ARGS=() DATA_ARGS=()
if [ -n "${MODEL:-}" ]; then
  MODEL_ARGS=(--model.name "$MODEL")
elif timeout 240 "$PY" -m mlpmem.cli fetch-assets >>"$LOG" 2>&1; then
  say "default model and corpus ready (SmolLM2-135M, Wikipedia leads)"
else
  say "WARNING: cannot fetch the default model (offline?): using a random Llama and a synthetic corpus instead"
  "$PY" - "$WORK" <<'EOF' >>"$LOG" 2>&1 || die "could not build the fallback model"
import sys
from pathlib import Path
sys.path.insert(0, "tests")
import torch
from helpers import make_texts, make_tokenizer, write_corpus
from transformers import LlamaConfig, LlamaForCausalLM
work = Path(sys.argv[1])
texts = make_texts(3000, words_per_doc=(40, 120))
tok = make_tokenizer(texts, vocab_size=2000)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)
LlamaForCausalLM(cfg).save_pretrained(work / "fallback-model")
tok.save_pretrained(work / "fallback-model")
write_corpus(work / "fallback-corpus.txt", texts)
EOF
  MODEL_ARGS=(--model.name "$WORK/fallback-model")
  DATA_ARGS=(--data.source "$WORK/fallback-corpus.txt")
fi
[ -n "${CORPUS:-}" ] && DATA_ARGS=(--data.source "$CORPUS")

# ----------------------------------------------------------------------------- 4. pipeline on cuda, bf16
RUN="$WORK/run"
rm -rf "$RUN"
say "pipeline -> $RUN"
timeout "${PIPELINE_TIMEOUT:-330}" "$PY" -m mlpmem pipeline --config configs/tiny.yaml --out_dir "$RUN" "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" \
  --model.device "$DEVICE" --model.dtype bf16 --data.max_train_tokens 60000 --data.max_eval_tokens 8000 \
  --window.context 512 --window.stride 256 --window.batch_size 16 --extract.shards 2 --index.factory Flat \
  --knn.k 256 --knn.store_ids 64 --memory.num_blocks 4 --train.epochs 3 --train.batch_size 1024 \
  --train.warmup_steps 20 --train.eval_every 40 --train.save_every 40 --train.val_positions 4000 \
  --train.bf16 true ${PIPELINE_ARGS:-} 2>&1 | tee -a "$LOG" | grep -v -E "Loading weights|%\||^\s*$"
PIPE_RC=${PIPESTATUS[0]}
[ "$PIPE_RC" -eq 0 ] || say "pipeline exited with $PIPE_RC"

# ----------------------------------------------------------------------------- 5. bench, small sizes
say "bench"
timeout "${BENCH_TIMEOUT:-300}" "$PY" -m mlpmem.cli bench --out_dir "$RUN" "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" \
  --model.device "$DEVICE" --model.dtype bf16 --bench.sizes 10000,100000,300000 --bench.real_keys 32768 \
  --bench.tokens 4096 --bench.train_steps 10 --bench.repeats 3 --bench.ivf_train_size 65536 ${BENCH_ARGS:-} 2>&1 \
  | tee -a "$LOG" | grep -v -E "Loading weights|%\||faiss.loader|swigfaiss|^\s*$"
BENCH_RC=${PIPESTATUS[0]}
[ "$BENCH_RC" -eq 0 ] || say "bench exited with $BENCH_RC"

# ----------------------------------------------------------------------------- 6. results
for f in "$RUN/eval/results.json" "$RUN/bench/bench.json" "$RUN/bench/bench.png" "$RUN/bench/bench.md" \
         "$RUN/memory/metrics.jsonl" "$RUN/timings.json"; do
  [ -f "$f" ] && cp "$f" "$OUT/$(basename "$(dirname "$f")")-$(basename "$f")"
done
cp "$LOG" "$OUT/"
say "done: pipeline rc=$PIPE_RC, bench rc=$BENCH_RC; files in $OUT"
[ "$PIPE_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
