"""GenerationSamples: left padding, greedy determinism, files written; gradient checkpointing is exact."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import FAST, compose_config, shrink
from dpo.commands.train import train
from dpo.models.sampling import left_pad


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_greedy_samples_are_written_and_match_plain_generate(tmp_path):
    cfg = shrink(
        compose_config(
            [
                *FAST,
                "trainer.max_steps=2",
                "callbacks.samples.temperature=0",
                "callbacks.samples.n_prompts=3",
                "callbacks.samples.max_new_tokens=6",
            ],
            tmp_path,
        )
    )
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "samples" / "step000002.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == rows[0]["completion"]


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    def losses(name, *extra):
        cfg = shrink(
            compose_config([*FAST, "trainer.max_steps=3", "trainer.log_every_n_steps=1", *extra], tmp_path / name)
        )
        train(cfg)
        rows = list(csv.DictReader((tmp_path / name / "csv" / "metrics.csv").open()))
        return [float(r["train/loss"]) for r in rows if r.get("train/loss")]

    plain, checkpointed = losses("plain"), losses("ckpt", "model.gradient_checkpointing=true")
    assert len(plain) == 3 and checkpointed == pytest.approx(plain, abs=1e-6)


@pytest.mark.parametrize("loss", ["dpo", "sft"])
def test_reward_kl_eval_logs_reward_and_exact_kl(tmp_path, loss):
    """At step 0 the policy is the reference: KL exactly 0. After training it is > 0, also for
    Preferred-FT (loss=sft), which has no reference of its own: the callback keeps a frozen copy."""
    cfg = shrink(
        compose_config(
            [
                *FAST, f"loss={loss}", "callbacks=reward_eval", "trainer.max_steps=3", "optim.optimizer.lr=1e-2",
                "callbacks.reward_eval.n_prompts=3", "callbacks.reward_eval.samples_per_prompt=2",
                "callbacks.reward_eval.generation.max_new_tokens=5", "callbacks.reward_eval.every_n_steps=2",
            ],
            tmp_path,
        )
    )  # fmt: skip
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "eval" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 3]
    assert rows[0]["kl"] == 0 and rows[0]["kl_mc"] == 0 and rows[0]["n"] == 6
    assert rows[-1]["kl"] > 0 and all(-1 <= r["reward"] <= 1 for r in rows)  # VADER compound
    samples = [json.loads(x) for x in (tmp_path / "eval" / "step000003.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(s["kl"] >= 0 for s in samples)
    logged = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    assert sum(1 for r in logged if r.get("eval/kl")) == 3


def test_evaluation_prompts_come_from_a_data_source_when_one_is_given(tmp_path, bpe_tokenizer):
    """callbacks.reward_eval.prompt_source (experiment=imdb_dpo: IMDB's test split, 2-8 token
    prefixes, as the authors evaluated): the evaluation samples those prompts, read when the
    callback is built and tokenized as the pairs' prompts, not the held-out pairs' prompts."""
    from conftest import FIXTURES
    from dpo.data.formats import load_rows
    from dpo.data.sources import SourceSpec
    from dpo.evaluation.reward_kl import RewardKLEval
    from dpo.runtime.io import DataError

    options = {"prefix_unit": "tokens", "prefix_min_words": 2, "prefix_max_words": 8, "seed": 0, "strip_html": True}
    source = {"format": "imdb", "path": str(FIXTURES / "imdb"), "splits": {"test": "test"}, "options": options}
    callback = RewardKLEval(str(tmp_path), {"name": "vader"}, n_prompts=1, prompt_source=source,
                            tokenizer=bpe_tokenizer)  # fmt: skip
    rows, _ = load_rows(SourceSpec(**source), "test", tokenizer=bpe_tokenizer)
    every = list(dict.fromkeys(r.prompt for r in rows))
    assert len(every) == 2 and len(callback.prompt_texts) == 1 and set(callback.prompt_texts) <= set(every)
    again = RewardKLEval(str(tmp_path), {"name": "vader"}, n_prompts=1, prompt_source=source, tokenizer=bpe_tokenizer)
    assert again.prompt_texts == callback.prompt_texts  # the same draw for the same seed
    with pytest.raises(DataError, match=r"prompt_split='validation': prompt_source.splits has \['test'\]"):
        RewardKLEval(str(tmp_path), {"name": "vader"}, prompt_source=source, prompt_split="validation",
                     tokenizer=bpe_tokenizer)  # fmt: skip

    cfg = shrink(compose_config([*FAST, "callbacks=reward_eval", "trainer.max_steps=1",
                                 "callbacks.reward_eval.n_prompts=2",
                                 "callbacks.reward_eval.generation.max_new_tokens=3",
                                 "callbacks.reward_eval.prompt_source=" + json.dumps(source).replace('"', ""),
                                 "callbacks.reward_eval.prompt_split=test"], tmp_path))  # fmt: skip
    train(cfg)
    samples = [json.loads(x) for x in (tmp_path / "eval" / "step000000.jsonl").read_text().splitlines()]
    reviews = [" ".join((r.prompt + r.chosen).split()) for r in load_rows(SourceSpec(**{**source, "options": {}}),
                                                                          "test")[0]]  # fmt: skip
    prompts = {" ".join(s["prompt"].split()) for s in samples}
    assert len(prompts) == 2 and all(any(r.startswith(p) for r in reviews) for p in prompts), prompts


def test_the_paper_scale_imdb_experiments_score_the_classifier_probability(tmp_path):
    """The paper's IMDB reward is the classifier's probability of the positive class (Fig. 2's axis
    runs from about 0.4 to 1): the evaluation's reward, PPO-GT's and dpo-score's hf_classifier."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF_DIR

    for name in ("imdb_dpo", "imdb_baselines", "imdb_ppo_gt"):
        cfg = compose_config([f"experiment={name}"], tmp_path)
        assert cfg.callbacks.reward_eval.reward.output == "prob", name
        assert cfg.reward.output == "prob", name
    assert compose_config(["experiment=imdb_ppo_gt"], tmp_path).system.reward is None  # PPO-GT: the reward group
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        score = compose("score", overrides=["reward=hf_classifier"])
    assert score.reward.output == "prob"


def test_evaluation_prompts_from_a_sorted_split_are_a_seeded_draw_not_its_head(tmp_path):
    """IMDB's test split holds its negative reviews first: the first n prompts would all be
    negative openings. source_prompts draws n at random with the callback's seed instead."""
    from dpo.evaluation.reward_kl import source_prompts
    from dpo.runtime.io import write_jsonl

    rows = [{"prompt": f"{kind} opening {i}", "chosen": " more", "rejected": " less"}
            for kind in ("negative", "positive") for i in range(20)]  # fmt: skip
    write_jsonl(tmp_path / "test.jsonl", rows)
    source = {"format": "fields", "path": None, "splits": {"test": str(tmp_path / "test.jsonl")}, "options": {}}
    drawn = source_prompts(source, "test", 10, None, seed=0)
    assert len(set(drawn)) == 10 and {p.split()[0] for p in drawn} == {"negative", "positive"}
    assert source_prompts(source, "test", 10, None, seed=0) == drawn
    assert source_prompts(source, "test", 10, None, seed=1) != drawn
    assert source_prompts(source, "test", 50, None) == [r["prompt"] for r in rows]  # all of them, in file order
