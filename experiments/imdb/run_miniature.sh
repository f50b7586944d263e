#!/usr/bin/env bash
# The IMDB experiment in miniature, offline on 2 CPU cores (see README.md in this folder).
# 1. Best-of-N from the starting model: 16 samples per held-out opening, scored with VADER (2 seeds).
# 2. DPO (beta 0.05, 0.1 and 1) and the baselines (Preferred-FT, Unlikelihood), same pairs, same
#    evaluation, seeds 0 and 1 each (the frontier averages them, with error bars over seeds).
# 3. The frontier PNG from every evaluation point.
set -euo pipefail
out=${1:-outputs/imdb_mini}
mkdir -p "$out"
python - "$out/val_prompts.txt" <<'PY'
import json, sys
from dpo.data.sources import bundled_path
seen = dict.fromkeys(json.loads(line)["prompt"] for line in open(bundled_path("smollm2_vader_val.jsonl")))
open(sys.argv[1], "w").write("\n".join(seen) + "\n")
PY
for seed in 0 1; do
  bon="$out/bon/seed$seed"
  dpo-sample model=smollm2 prompts.file="$out/val_prompts.txt" n=16 batch_size=32 generation.max_new_tokens=32 \
    seed=$seed output="$bon/samples.jsonl"
  dpo-score input="$bon/samples.jsonl" output="$bon/scored.jsonl" reward=vader
  dpo-best-of-n input="$bon/scored.jsonl" ns="[1,2,4,8,16]" output="$bon/eval.jsonl"
done
common=(experiment=imdb_mini logger=csv trainer.limit_val_batches=1 seed=0,1)
dpo-train -m "${common[@]}" loss=dpo loss.beta=0.05,0.1,1 hydra.sweep.dir="$out/dpo"
dpo-train -m "${common[@]}" loss=sft hydra.sweep.dir="$out/pft"
dpo-train -m "${common[@]}" loss=unlikelihood loss.alpha=0.1 hydra.sweep.dir="$out/ul"
python experiments/imdb/frontier.py "$out" --out experiments/imdb/frontier.png \
  --title "IMDB miniature: SmolLM2-135M, VADER reward, 2 seeds"
# 4. Every run's curves and the frontier from the run folders (dpo-report; README "Dashboards").
dpo-report runs="[$out]" out=experiments/imdb/figures title="'IMDB miniature: SmolLM2-135M, VADER reward'"
