#!/usr/bin/env bash
# Judge-human agreement (the paper's Sec. 6.4) in miniature, offline on 2 CPU cores (README.md in
# this folder): the default run's 157 held-out pairs (dpo/data/files/smollm2_vader_val.jsonl) with
# their VADER labels standing in for human labels, judged by
#   1. VADER itself (a check of the machinery: it must agree with its own labels),
#   2. the IMDB miniature's learned reward model (experiment=imdb_rm_mini's export; its held-out
#      accuracy on these pairs is the same number, measured by dpo-train),
#   3. the local LM judge (SmolLM2-135M-Instruct, both orders, template=positive).
#   bash experiments/judge_agreement/run.sh [out] [reward model hf folder]
set -euo pipefail
out=${1:-outputs/judge_agreement}
rm_hf=${2:-outputs/imdb_mini/rm_runs/imdb_rm_mini/runs/rm/hf}   # experiments/imdb/run_rlhf_miniature.sh
here=experiments/judge_agreement
export HF_HUB_OFFLINE=1 WANDB_MODE=offline
common=(data=smollm2_reviews split=val agreement=true n_prompts=1000 template=positive)
dpo-eval "${common[@]}" judge=reward reward@judge.reward=vader hydra.run.dir="$out/vader"
dpo-eval "${common[@]}" judge=reward reward@judge.reward=learned_rm "judge.reward.path=$rm_hf" \
  hydra.run.dir="$out/reward_model"
dpo-eval "${common[@]}" judge=local hydra.run.dir="$out/local"
for judge in vader reward_model local; do
  cp "$out/$judge/agreement.jsonl" "$here/agreement_$judge.jsonl"
  tail -n 1 "$out/$judge/agreement.md" > "$here/row_$judge.md"
done
{ head -n 2 "$out/vader/agreement.md"; cat "$here"/row_{vader,reward_model,local}.md; } > "$here/agreement.md"
rm "$here"/row_*.md
cat "$here/agreement.md"
