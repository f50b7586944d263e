#!/usr/bin/env bash
# GRPO and RLOO in the IMDB miniature, offline on 2 CPU cores (see README.md here): the critic-free
# policy gradients at PPO's generated-token budget (8 iterations x 16 prompts x 4 samples), labelled
# by VADER (the ground truth: "-GT") and by the reward model of run_rlhf_miniature.sh, seeds 0 and 1.
# Then the frontier with every method of the miniature (the other scripts' runs under the same folder).
set -euo pipefail
out=${1:-outputs/imdb_mini}
rm_dir="$out/rm_runs/imdb_rm_mini/runs/rm"
test -d "$rm_dir/hf" || { echo "no reward model at $rm_dir/hf: run run_rlhf_miniature.sh first" >&2; exit 2; }
rm=("system.reward={name: learned_rm, path: $rm_dir/hf, batch_size: 32}")
for method in grpo rloo; do
  dpo-train -m experiment=imdb_${method}_mini logger=csv seed=0,1 hydra.sweep.dir="$out/${method}_gt"
  dpo-train -m experiment=imdb_${method}_mini logger=csv seed=0,1 "${rm[@]}" hydra.sweep.dir="$out/${method}_rm"
done
python experiments/imdb/frontier.py "$out" --out experiments/imdb/frontier.png --rm "$rm_dir" \
  --title "IMDB miniature: SmolLM2-135M, VADER reward, 2 seeds"
