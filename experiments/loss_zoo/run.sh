#!/usr/bin/env bash
# Every loss family of conf/loss on the default run's data (SmolLM2-135M, its VADER-scored pairs),
# a short run each: 20 steps of 8 pairs (half the default run), each loss at its conf/loss defaults,
# then the table (README.md here). ~160 s a run on 2 CPU cores; the weights each run writes
# (checkpoint, hf export: 2 GB) are deleted after it, the logs kept.
#   bash experiments/loss_zoo/run.sh [out]        # out: outputs/loss_zoo
set -euo pipefail
out=${1:-outputs/loss_zoo}
mkdir -p "$out"
short=(trainer.max_steps=20 callbacks.reward_eval.at_start=false logger=csv)
runs=(  # folder | overrides
  "dpo|loss=dpo" "cdpo|loss=cdpo" "robust_dpo|loss=robust_dpo" "ipo_sum|loss=ipo_sum"
  "ipo_length_norm|loss=ipo_length_norm" "sigmoid_norm|loss=sigmoid_norm" "hinge|loss=hinge"
  "exo_pair|loss=exo_pair" "discopop|loss=discopop" "aot|loss=aot" "aot_unpaired|loss=aot_unpaired"
  "nca_pair|loss=nca_pair" "bco_pair|loss=bco_pair" "sppo_hard|loss=sppo_hard" "apo_zero|loss=apo_zero"
  "apo_down|loss=apo_down" "ref_free_dpo|loss=ref_free_dpo" "simpo|loss=simpo" "cpo|loss=cpo" "orpo|loss=orpo"
  "sft|loss=sft" "sft_token_mean|loss=sft_token_mean" "unlikelihood|loss=unlikelihood" "rpo|loss=rpo"
  "mpo|loss=mpo" "dpo_forward_kl|loss=dpo loss.f_divergence_type=forward_kl"
  "dpo_js|loss=dpo loss.f_divergence_type=js_divergence" "ld_dpo|loss=dpo loss.ld_alpha=0.5"
  "wpo|loss=dpo loss.use_weighting=true" "kto|system=kto"
)
for run in "${runs[@]}"; do
  name=${run%%|*}
  dir="$out/$name"
  if [ -f "$dir/run.json" ] && grep -q '"finished"' "$dir/run.json"; then continue; fi
  # shellcheck disable=SC2086
  dpo-train ${run#*|} "${short[@]}" hydra.run.dir="$dir" > "$dir.log" 2>&1 || { echo "$name failed: $dir.log" >&2; exit 1; }
  rm -rf "$dir/checkpoints" "$dir/hf"
done
python experiments/loss_zoo/table.py "$out" --out experiments/loss_zoo/results.md
