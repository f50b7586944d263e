#!/usr/bin/env bash
# Reddit TL;DR summarization (paper Sec. 6.2, Fig. 2 right) on a GPU cluster: SFT, DPO, Preferred-FT,
# then the GPT-4-judged win rate against the human reference summaries across temperatures.
# Assumes one node of 8 x 80 GB GPUs per training job (conf/experiment/tldr_*.yaml say why) and an
# OpenAI-compatible judge endpoint with its key in $OPENAI_API_KEY. Add hydra/launcher=slurm (and
# `-m`) to submit through submitit; every stage resumes if requeued (run_name keeps its folder).
set -euo pipefail
out=outputs
# The judge: the paper used gpt-4-0314, which is no longer served. Name a dated snapshot your endpoint
# serves (JUDGE_MODEL=...); absolute win rates drift with the judge, so compare policies judged by one
# model and report which. The prompt is the paper's App. C.2 wording (conf/template/paper_*.yaml).
judge_model=${JUDGE_MODEL:-gpt-4.1-2025-04-14}
# 1. The reference: the paper started from trlx's public GPT-J SFT model (CarperAI/openai_summarize_tldr_sft),
#    the default here. TLDR_SFT=ours retrains it with experiment=tldr_sft (App. B's optimizer, not trlx's).
if [ "${TLDR_SFT:-trlx}" = ours ]; then
  dpo-train experiment=tldr_sft run_name=sft
  sft=$out/tldr_sft/runs/sft/hf
else
  sft=CarperAI/openai_summarize_tldr_sft
fi
# 2. DPO (beta 0.5) and Preferred-FT (SFT on the preferred summary of each comparison), from the SFT model.
dpo-train experiment=tldr_dpo model.pretrained=$sft run_name=dpo
dpo-train experiment=tldr_dpo model.pretrained=$sft loss=sft run_name=preferred_ft task_name=tldr_pft
# 3. Win rates against the reference summaries (CarperAI/openai_summarize_tldr, its test split),
#    256 prompts, T in {0, .25, .5, .75, 1}, the judge with the paper's prompt (C). Dry run first:
ppo=CarperAI/openai_summarize_tldr_ppo   # trlx's public GPT-J PPO policy: the paper's PPO baseline
gptj=EleutherAI/gpt-j-6b                 # the base model zero-shot, on the same TL;DR prompt format
policies="{sft: $sft, dpo: $out/tldr_dpo/runs/dpo/hf, preferred_ft: $out/tldr_pft/runs/preferred_ft/hf, ppo: $ppo, gptj: $gptj}"
common=(data=tldr_sft data.source.splits.val=test template=paper_summary_c judge=api "judge.model=$judge_model"
        n_prompts=256 "policies=$policies")
dpo-eval "${common[@]}" dry_run=true run_name=win_rates
dpo-eval "${common[@]}" completions=$out/eval/runs/win_rates/completions.jsonl run_name=win_rates
# -> outputs/eval/runs/win_rates/{results.md,win_rate.png,judgments.jsonl}
# 4. Out of distribution (Sec. 6.3, Table 1): the TL;DR policies summarise CNN/DailyMail test articles
#    (in the TL;DR prompt format, data=cnn_dailymail) at T 0 and 0.25, judged against the reference
#    highlights with the same prompt.
cnndm=(data=cnn_dailymail template=paper_summary_c judge=api "judge.model=$judge_model" n_prompts=256
       "temperatures=[0.0,0.25]" "policies={dpo: $out/tldr_dpo/runs/dpo/hf, ppo: $ppo}")
dpo-eval "${cnndm[@]}" dry_run=true run_name=cnndm
dpo-eval "${cnndm[@]}" completions=$out/eval/runs/cnndm/completions.jsonl run_name=cnndm
# 5. Best of N (App. D.1): a reward model on the comparisons; N samples of the SFT model per evaluation
#    prompt (prompts.jsonl of stage 3) at T=1; the best by the reward model for each N up to 128,
#    judged against the reference summaries.
dpo-train experiment=tldr_rm model.pretrained=$sft run_name=rm
bon=$out/best_of_n
dpo-sample data=tldr_sft model.pretrained=$sft prompts.file=$out/eval/runs/win_rates/prompts.jsonl n=128 \
  output=$bon/samples.jsonl
dpo-score input=$bon/samples.jsonl output=$bon/scored.jsonl reward=learned_rm reward.path=$out/tldr_rm/runs/rm/hf
dpo-best-of-n input=$bon/scored.jsonl "ns=[1,4,16,64,128]" output=$bon/eval.jsonl completions=$bon/picks.jsonl
dpo-eval data=tldr_sft data.source.splits.val=test template=paper_summary_c judge=api "judge.model=$judge_model" \
  n_prompts=256 "temperatures=[1.0]" completions=$bon/picks.jsonl run_name=best_of_n
