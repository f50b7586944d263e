#!/usr/bin/env bash
# Regenerates the default run's pairs (dpo/data/files/smollm2_vader_*.jsonl) with the pipeline:
# SmolLM2-135M-Instruct completes the first 256 bundled review openings 4 times (32 tokens,
# temperature 1), VADER scores prompt + completion, dpo-pair keeps pairs with a gap >= 0.1 and
# holds out 1/8 of the openings. About 5 minutes on 2 CPU cores (sampling: 258 s).
set -euo pipefail
out=${1:-outputs/default_pairs}
mkdir -p "$out"
head -256 dpo/data/files/review_prompts.txt > "$out/prompts.txt"
dpo-sample model=smollm2 prompts.file="$out/prompts.txt" n=4 batch_size=32 generation.max_new_tokens=32 \
  output="$out/samples.jsonl"
dpo-score input="$out/samples.jsonl" output="$out/scored.jsonl" reward=vader
dpo-pair input="$out/scored.jsonl" output_dir="$out/pairs" min_margin=0.1 val_fraction=0.125
