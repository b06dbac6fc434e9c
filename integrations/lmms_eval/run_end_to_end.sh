#!/usr/bin/env bash
# Run the vqa_constraints lmms-eval tasks end to end on CPU, through lmms-eval's own HF LLaVA class (llava_hf),
# and compare each question with `vqa-constraints evaluate` on the same model and build.
#
#   integrations/lmms_eval/run_end_to_end.sh MODEL_DIR DATA_DIR [WORK_DIR]
#
# lmms-eval gets its own venv (LMMS_VENV, default /tmp/lmms-eval-venv): it pins other versions than this project.
# The project's venv (.venv, or VQA_VENV) runs `evaluate` and the comparison.
set -euo pipefail

MODEL=$(realpath "${1:?usage: run_end_to_end.sh MODEL_DIR DATA_DIR [WORK_DIR]}")
DATA=$(realpath "${2:?usage: run_end_to_end.sh MODEL_DIR DATA_DIR [WORK_DIR]}")
WORK=$(realpath -m "${3:-/tmp/lmms-eval-e2e}")
REPO=$(cd "$(dirname "$0")/../.." && pwd)
LMMS_VENV=${LMMS_VENV:-/tmp/lmms-eval-venv}
VQA_VENV=${VQA_VENV:-$REPO/.venv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# `datasets` keys a local folder's cache by its name, not its content: a fresh cache per run reads this build.
export HF_DATASETS_CACHE="$WORK/hf-datasets"
rm -rf "$WORK" && mkdir -p "$WORK"

if [ ! -x "$LMMS_VENV/bin/lmms-eval" ]; then
  python3 -m venv "$LMMS_VENV"
  "$LMMS_VENV/bin/pip" install torch==2.13.0   # the CPU wheel first, where the index has one
  # lmms-eval 0.7.3's llava_hf imports decord without requiring it, and its evaluator needs filelock < 4 (filelock._api).
  "$LMMS_VENV/bin/pip" install lmms-eval decord "filelock<4"
fi

# From the repository root, the task folder as it is: utils.py imports nothing of this project, the build is named
# by VQA_CONSTRAINTS_DATASET_PATH, and the group's name (vqa_constraints_all) is no folder here. The planted model
# ships no chat template, so llava_hf gets the harness's prompt format as one (without it lmms-eval would add
# Vicuna's system prompt). --force_simple: lmms-eval 0.7 resolves llava_hf to its chat class, which renders with
# the processor's template (the planted model has none).
TEMPLATE=$("$LMMS_VENV/bin/python" "$REPO/integrations/lmms_eval/utils.py")
(cd "$REPO" && VQA_CONSTRAINTS_DATASET_PATH="$DATA" "$LMMS_VENV/bin/python" -m lmms_eval \
  --model llava_hf --force_simple \
  --model_args "pretrained=$MODEL,device=cpu,device_map=cpu,dtype=float32,chat_template=$TEMPLATE" \
  --tasks vqa_constraints_all --include_path integrations/lmms_eval --batch_size 1 \
  --log_samples --output_path "$WORK/lmms-eval-logs") 2>&1 | tee "$WORK/lmms-eval.log"

"$VQA_VENV/bin/vqa-constraints" evaluate --model "$MODEL" --data "$DATA" --scoring generate --dtype float32 \
  --device cpu --out "$WORK/evaluate-run"
"$VQA_VENV/bin/python" "$REPO/integrations/lmms_eval/compare.py" "$WORK/lmms-eval-logs" "$WORK/evaluate-run" --data "$DATA" \
  | tee "$WORK/comparison.txt"
