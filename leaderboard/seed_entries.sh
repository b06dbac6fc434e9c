#!/usr/bin/env bash
# Re-seed the real-world leaderboard from scratch: build the release data (default build = flags only), write
# leaderboard/release.json from its test split, score the zoo flag-llava on it with the settings of its original
# entry, validate, and rebuild leaderboard.md / leaderboard.csv. About 5-8 minutes on an idle 2-core CPU once
# flag-llava is in the zoo cache (building it first takes much longer). Run from anywhere:
#     bash leaderboard/seed_entries.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=${WORK:-$(mktemp -d)}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

vqa-constraints build --out "$work/data"
vqa-constraints leaderboard release --data "$work/data" --out leaderboard/release.json
model=$(python -c "from harness.zoo import flag_llava; print(flag_llava.build())")
settings=(--split test --scoring both --batch-size 16 --max-new-tokens 24 --seed 0 --dtype float32 --device cpu)
vqa-constraints evaluate --model "$model" --data "$work/data" "${settings[@]}" --no-progress --out "$work/runs/flag-llava"
vqa-constraints leaderboard prepare "$work/runs/flag-llava" --out leaderboard/submissions \
    --model-name flag-llava-SmolLM2-135M --submitted-by "vqa-constraints maintainers" \
    --notes "zoo flag-llava (recipe ${model##*-}): SmolLM2-135M-Instruct + trained 16-token vision tower, CPU fp32. Stage 2 (visual instruction tuning) trained on flag questions about 136 of the 195 countries (listed in its config.json); only the other 59 are unseen" \
    --command "vqa-constraints build --out data/release && vqa-constraints zoo build flag-llava && vqa-constraints evaluate --model ~/.cache/vqa-constraints/zoo/$(basename "$model") --data data/release ${settings[*]} --out runs/flag-llava"
vqa-constraints leaderboard validate leaderboard/submissions/*.json
vqa-constraints leaderboard build leaderboard/submissions --out leaderboard
