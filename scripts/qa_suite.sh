#!/usr/bin/env bash
# The MLP Memory authors' downstream checks through lm-eval, with and without the memory: knowledge QA (NQ-open,
# TriviaQA, WebQuestions, TruthfulQA, HotpotQA closed book; greedy answers, exact match) and general ability
# (HellaSwag, ARC). Needs a machine that reaches the Hugging Face Hub (the datasets); not measurable offline.
#   bash scripts/qa_suite.sh RUN_DIR [LAM] [extra lm-eval flags]
# RUN_DIR: a run whose memory and eval exist (the base model is read from its config); LAM: the memory's weight
# (default: the one `mlpmem eval` tuned for perplexity; the authors used 0.5-0.75 for QA).
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:?usage: bash scripts/qa_suite.sh RUN_DIR [LAM] [lm-eval flags]}; shift
lam=${1:-}; [ $# -gt 0 ] && shift
model=$(.venv/bin/python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['model']['name'])" \
  "$run/memory/config.yaml")
[ -d "$run/finetune/model" ] && model=$run/finetune/model  # the fine-tuned base the memory was trained on
tasks=nq_open,triviaqa,webqs,truthfulqa_gen,truthfulqa_mc2,hotpotqa_closedbook,hellaswag,arc_easy,arc_challenge
common=(--tasks "$tasks" --include_path configs/lm_eval --batch_size auto "$@")
.venv/bin/mlpmem-lm-eval --model mlpmem --model_args "pretrained=$model,memory=$run/memory/best,lam=0" \
  --output_path "$run/lm_eval/base" "${common[@]}"
.venv/bin/mlpmem-lm-eval --model mlpmem \
  --model_args "pretrained=$model,memory=$run/memory/best${lam:+,lam=$lam}" \
  --output_path "$run/lm_eval/memory" "${common[@]}"
