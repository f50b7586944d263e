#!/usr/bin/env bash
# The RLHF baseline of the IMDB miniature, offline on 2 CPU cores (see README.md in this folder):
# 1. a reward model on the same VADER-labelled pairs DPO trains on (experiment=imdb_rm_mini);
# 2. PPO-GT (PPO against VADER itself) and PPO (against the learned reward model), the adaptive KL
#    controller with target KL 2 and 4 nats (PPO: 4), seeds 0 and 1 each (one reward model: seed
#    0's), evaluated as the DPO runs are (31 held-out openings x 2, VADER and the exact KL);
# 3. the frontier with every method of the miniature (run_miniature.sh's runs under the same folder).
set -euo pipefail
out=${1:-outputs/imdb_mini}
common=(logger=csv trainer.limit_val_batches=0 seed=0,1)
dpo-train experiment=imdb_rm_mini logger=csv run_name=rm paths.log_dir="$out/rm_runs"
rm_dir="$out/rm_runs/imdb_rm_mini/runs/rm"
dpo-train -m experiment=imdb_ppo_gt_mini "${common[@]}" system.kl_target=2,4 hydra.sweep.dir="$out/ppo_gt"
dpo-train -m experiment=imdb_ppo_mini "${common[@]}" system.reward.path="$rm_dir/hf" \
  hydra.sweep.dir="$out/ppo"
python experiments/imdb/frontier.py "$out" --out experiments/imdb/frontier.png --rm "$rm_dir" \
  --title "IMDB miniature: SmolLM2-135M, VADER reward, 2 seeds"
