#!/usr/bin/env bash
# Anthropic HH single-turn dialogue (paper Sec. 6.2, Fig. 3 left) on a GPU cluster: SFT Pythia-2.8B
# on the chosen responses (HH has no SFT data of its own, so this model is also the paper's
# Preferred-FT), DPO (beta 0.1) from it, then the GPT-4-judged win rate against
# the preferred (chosen) responses of the test set across temperatures. Needs 1 x 80 GB GPU per
# training job and an OpenAI-compatible judge with its key in $OPENAI_API_KEY.
set -euo pipefail
out=outputs
# The judge: the paper used gpt-4-0314, which is no longer served. Name a dated snapshot your endpoint
# serves (JUDGE_MODEL=...); absolute win rates drift with the judge, so compare policies judged by one
# model and report which. The prompt is the paper's App. C.2 wording (conf/template/paper_*.yaml).
judge_model=${JUDGE_MODEL:-gpt-4.1-2025-04-14}
dpo-train experiment=hh_sft run_name=sft
sft=$out/hh_sft/runs/sft/hf
dpo-train experiment=hh_dpo model.pretrained=$sft run_name=dpo
# Single-turn test dialogues; answers stop at the next "\n\nHuman:" (data=hh's response.stop).
common=(data=hh data.source.options.single_turn=true template=paper_dialogue judge=api "judge.model=$judge_model"
        n_prompts=256 "temperatures=[0.25,0.5,0.75,1.0]"
        "policies={preferred_ft: $sft, dpo: $out/hh_dpo/runs/dpo/hf, pythia: EleutherAI/pythia-2.8b}"
        "few_shot={pythia: 2}")   # the paper's Pythia-2.8B baseline is 2-shot: two train dialogues before each prompt
dpo-eval "${common[@]}" dry_run=true run_name=win_rates
dpo-eval "${common[@]}" completions=$out/eval/runs/win_rates/completions.jsonl run_name=win_rates
# Best of N (Sec. 6.2, App. D.1): a reward model on the HH pairs; N samples of the Preferred-FT model
# per evaluation prompt (the ones dpo-eval chose above, prompts.jsonl) at T=1; the best by the reward
# model for each N up to 128, judged against the chosen responses as the policies were.
dpo-train experiment=hh_rm model.pretrained=$sft run_name=rm
bon=$out/best_of_n
dpo-sample data=hh model.pretrained=$sft prompts.file=$out/eval/runs/win_rates/prompts.jsonl n=128 \
  output=$bon/samples.jsonl
dpo-score input=$bon/samples.jsonl output=$bon/scored.jsonl reward=learned_rm reward.path=$out/hh_rm/runs/rm/hf
dpo-best-of-n input=$bon/scored.jsonl "ns=[1,4,16,64,128]" output=$bon/eval.jsonl completions=$bon/picks.jsonl
dpo-eval data=hh data.source.options.single_turn=true template=paper_dialogue judge=api "judge.model=$judge_model" \
  n_prompts=256 "temperatures=[1.0]" completions=$bon/picks.jsonl run_name=best_of_n
