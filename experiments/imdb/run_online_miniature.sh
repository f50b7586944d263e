#!/usr/bin/env bash
# Online and iterative DPO in the IMDB miniature, offline on 2 CPU cores (see README.md here):
# online DPO (fresh pairs from the current policy every iteration, fixed reference) and iterative
# DPO (2 rounds; each samples from the round's starting policy, then makes it the reference),
# labelled by VADER (the ground truth: "-GT") and by the reward model of run_rlhf_miniature.sh (learned
# from the same VADER-labelled pairs DPO trains on), seeds 0 and 1; PPO's generated-token budget.
# Then the frontier with every method of the miniature (the other scripts' runs under the same folder).
set -euo pipefail
out=${1:-outputs/imdb_mini}
rm_dir="$out/rm_runs/imdb_rm_mini/runs/rm"
test -d "$rm_dir/hf" || { echo "no reward model at $rm_dir/hf: run run_rlhf_miniature.sh first" >&2; exit 2; }
common=(experiment=imdb_online_dpo_mini logger=csv seed=0,1 system.rounds=null,2)
dpo-train -m "${common[@]}" hydra.sweep.dir="$out/online_gt"
dpo-train -m "${common[@]}" "system.reward={name: learned_rm, path: $rm_dir/hf, batch_size: 32}" \
  hydra.sweep.dir="$out/online_rm"
python experiments/imdb/frontier.py "$out" --out experiments/imdb/frontier.png --rm "$rm_dir" \
  --title "IMDB miniature: SmolLM2-135M, VADER reward, 2 seeds"
