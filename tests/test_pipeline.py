"""The sample -> score -> pair pipeline, Best-of-N, and the KL of sampled completions, on tiny models."""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from dpo.commands.best_of_n import best_of_n, best_of_n_kl
from dpo.commands.pair import make_pairs
from dpo.config.settings import ConfigError
from dpo.maths.logprobs import sequence_kl
from dpo.models.completions import completion_batch, completion_kl
from dpo.models.sampling import cut_at_eos
from dpo.runtime.io import read_jsonl, write_jsonl


def test_pairs_respect_margin_and_ties():
    completions = ["great", "good", "bad", "bad ", "great"]
    rewards = [0.9, 0.5, 0.5, -0.8, 0.9]
    counts: Counter = Counter()
    pairs = make_pairs(completions, rewards, 0.0, "skip", random.Random(0), counts)
    # 10 candidates: (0,4) identical text, (1,2) an exact tie -> skipped; the rest kept, higher reward chosen.
    assert counts == Counter({"kept": 8, "identical": 1, "tie": 1})
    assert all(rewards[c] > rewards[r] for c, r in pairs)
    counts = Counter()
    pairs = make_pairs(completions, rewards, 0.5, "skip", random.Random(0), counts)
    assert all(rewards[c] - rewards[r] >= 0.5 for c, r in pairs)
    # Gaps below 0.5: (0,1), (0,2), (1,4), (2,4) at 0.4 and the tie (1,2); kept: the four gaps >= 1.3.
    assert counts["below_margin"] == 5 and counts["kept"] == 4
    counts = Counter()
    pairs = make_pairs(completions, rewards, 0.0, "random", random.Random(0), counts)
    assert counts["tie_random"] == 1 and counts["kept"] == 9 and ((1, 2) in pairs or (2, 1) in pairs)
    with pytest.raises(ConfigError, match="ties must be"):
        make_pairs(completions, rewards, 0.0, "first", random.Random(0), Counter())


def test_best_of_n_picks_the_argmax():
    rewards = [[0.1, 0.7, 0.3, 0.9], [0.5, 0.2, 0.8, 0.0]]
    mean, picks = best_of_n(rewards, 2)
    assert picks == [1, 0] and mean == pytest.approx((0.7 + 0.5) / 2)
    mean, picks = best_of_n(rewards, 4)
    assert picks == [3, 2] and mean == pytest.approx((0.9 + 0.8) / 2)
    assert best_of_n_kl(1) == 0 and best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)
    with pytest.raises(ValueError, match="fewer than N=8"):
        best_of_n(rewards, 8)


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 7, 2], eos_id=2, pad_id=0) == [5, 6, 2]
    assert cut_at_eos([5, 6, 0, 0], eos_id=2, pad_id=0) == [5, 6]


def test_exact_kl_is_zero_for_equal_models_and_matches_brute_force():
    """Vocabulary of 3, one prompt token, two generated tokens: the KL is summed by hand."""
    torch.manual_seed(0)
    p_logits = torch.randn(1, 3, 3)
    q_logits = torch.randn(1, 3, 3)
    labels = torch.tensor([[-100, 1, 2]])  # positions 0 and 1 predict the generated tokens
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    brute = sum(float((p[0, t] * (p[0, t].log() - q[0, t].log())).sum()) for t in (0, 1))
    assert sequence_kl(p_logits, q_logits, labels).item() == pytest.approx(brute, rel=1e-5)
    assert sequence_kl(p_logits, p_logits, labels).item() == 0


def test_completion_kl_on_a_tiny_model(tiny_model):
    """Policy = reference: exact KL and Monte-Carlo estimate are 0; a perturbed policy gives KL > 0."""
    tiny_model.eval()
    batch = completion_batch([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=0)
    assert batch["labels"].tolist()[1] == [-100, 11, 12, 13, -100]  # right padding is not scored

    def ref(ids, mask):
        return tiny_model(input_ids=ids, attention_mask=mask).logits

    kl, kl_mc, logps, n = completion_kl(tiny_model, ref, batch)
    assert torch.all(kl == 0) and torch.all(kl_mc == 0) and n.tolist() == [2.0, 3.0]

    def shifted(ids, mask):
        return tiny_model(input_ids=ids, attention_mask=mask).logits + torch.linspace(0, 3, 512)

    kl, kl_mc, _, _ = completion_kl(tiny_model, shifted, batch)
    assert torch.all(kl > 0)


def test_sample_score_pair_on_a_tiny_model(tmp_path, exported_tiny):
    from dpo.commands.pair import pair
    from dpo.commands.sample import sample
    from dpo.commands.score import score
    from dpo.rewards.registry import REWARDS

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("This movie\nI watched this film\nThe acting in this drama\n")
    base = {"paths": {"cache_dir": str(tmp_path / "cache")}, "seed": 0}
    model = {"pretrained": exported_tiny, "revision": None, "dtype": "float32", "trust_remote_code": False,
             "tokenizer": {"pretrained": None}}  # fmt: skip
    cfg = OmegaConf.create(base | {
        "model": model, "prompts": {"file": str(prompts), "field": "prompt", "split": "train", "max_prompts": None},
        "n": 4, "batch_size": 5, "output": str(tmp_path / "samples.jsonl"),
        "generation": {"max_new_tokens": 6, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
    })  # fmt: skip
    samples = sample(cfg)
    rows = read_jsonl(samples, {"prompt": str, "completions": list})
    assert [len(r["completions"]) for r in rows] == [4, 4, 4]
    meta = json.loads((tmp_path / "samples.jsonl.meta.json").read_text())
    assert meta["model"]["pretrained"] == exported_tiny and meta["generation"]["max_new_tokens"] == 6
    # A deterministic reward: the completion's length in characters.
    REWARDS["length"] = lambda: lambda texts: [float(len(t)) for t in texts]
    try:
        scored = score(OmegaConf.create({"paths": base["paths"]} | {
            "input": str(samples), "output": str(tmp_path / "scored.jsonl"), "include_prompt": False,
            "batch_size": 4, "reward": {"name": "length"},
        }))  # fmt: skip
    finally:
        del REWARDS["length"]
    rows = read_jsonl(scored, {"rewards": list})
    assert all(r["rewards"] == [float(len(c)) for c in r["completions"]] for r in rows)
    out = pair(OmegaConf.create({"input": str(scored), "output_dir": str(tmp_path / "pairs"), "min_margin": 1.0,
                                 "ties": "skip", "val_fraction": 0.34, "seed": 0}))  # fmt: skip
    train = read_jsonl(out / "train.jsonl", {"prompt": str, "chosen": str, "rejected": str})
    assert all(len(p["chosen"]) - len(p["rejected"]) >= 1 for p in train)
    meta = json.loads((out / "pairs.meta.json").read_text())
    assert meta["prompts"] == {"train": 2, "val": 1}


def test_bad_input_names_file_and_row(tmp_path):
    from dpo.commands.pair import pair

    bad = tmp_path / "scored.jsonl"
    bad.write_text(
        '{"prompt": "a", "completions": ["x", "y"], "rewards": [1.0, 0.0]}\n{"prompt": "b", "completions": ["x"]}\n'
    )
    cfg = {"input": str(bad), "output_dir": str(tmp_path / "p"), "min_margin": 0.0, "ties": "skip", "val_fraction": 0.0,
           "seed": 0}  # fmt: skip
    with pytest.raises(ValueError, match=r"scored.jsonl:2: missing key 'rewards'"):
        pair(OmegaConf.create(cfg))
    bad.write_text('{"prompt": "a", "completions": ["x", "y"], "rewards": [1.0]}\n')
    with pytest.raises(ValueError, match=r"scored.jsonl:1: 2 completions but 1 rewards"):
        pair(OmegaConf.create(cfg))
    assert not (tmp_path / "p").exists()  # nothing written before the input was checked


def test_frontier_collects_a_fake_two_run_sweep_and_best_of_n(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    sweep = tmp_path / "multirun"
    for job, loss in (
        ("0", {"name": "dpo", "nll_weight": 0.0, "beta": 0.1}),
        ("1", {"name": "sft", "nll_weight": 0.0}),
    ):
        (sweep / job / "eval").mkdir(parents=True)
        (sweep / job / "config.yaml").write_text(yaml.safe_dump({"loss": loss}))
        rows = [{"step": s, "reward": 0.1 * s, "kl": 0.5 * s, "kl_mc": 0.4 * s, "tokens": 30, "n": 8} for s in (0, 10)]
        (sweep / job / "eval" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bon = tmp_path / "bon" / "eval.jsonl"
    bon.parent.mkdir()
    bon.write_text(json.dumps({"method": "best_of_n", "n": 4, "step": 0, "reward": 0.3, "kl": best_of_n_kl(4)}) + "\n")
    out = tmp_path / "frontier.png"
    script = Path(__file__).parent.parent / "experiments" / "imdb" / "frontier.py"
    proc = subprocess.run([sys.executable, str(script), str(sweep), str(bon.parent), "--out", str(out)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines()]
    assert sorted({p["label"] for p in points}) == ["Best-of-N", "DPO b=0.1", "Preferred-FT"]
    assert len(points) == 5 and "DPO b=0.1" in proc.stdout


def test_runs_that_differ_only_in_their_seed_are_one_frontier_point_with_bars_over_seeds(tmp_path):
    """`-m seed=0,1,2` of one setting: dpo-report and experiments/imdb/frontier.py draw their mean,
    with the standard error over seeds (reward and KL) beside the per-sample one; a run of another
    setting (loss.beta) stays its own point even with another seed."""
    import yaml

    from dpo.report.figures import frontier_points, over_seeds

    sweep = tmp_path / "multirun"
    jobs = [(seed, 0.1, 0.2 + 0.1 * seed, 1.0 + seed) for seed in (0, 1, 2)] + [(5, 1.0, 0.9, 4.0)]
    for i, (seed, beta, reward, kl) in enumerate(jobs):
        run = sweep / str(i)
        (run / "eval").mkdir(parents=True)
        (run / ".hydra").mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "loss": {"name": "dpo", "beta": beta}}))
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["experiment=imdb_mini", f"seed={seed}",
                                                                       f"loss.beta={beta}"]))  # fmt: skip
        (run / "eval" / "eval.jsonl").write_text(json.dumps({"step": 8, "reward": reward, "kl": kl}) + "\n")
        samples = [{"reward": reward + d} for d in (-0.1, 0.1)]  # per-sample s.e. 0.1 each
        (run / "eval" / "step000008.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    points = over_seeds(frontier_points([sweep]))
    by_label = {p["label"]: p for p in points}
    assert sorted(by_label) == ["DPO b=0.1", "DPO b=1"]
    seeded = by_label["DPO b=0.1"]
    assert seeded["seeds"] == 3 and seeded["seed"] == [0, 1, 2]
    assert seeded["reward"] == pytest.approx(0.3) and seeded["kl"] == pytest.approx(2.0)
    assert seeded["reward_se_seeds"] == pytest.approx(0.1 / 3**0.5)  # the s.e. of 0.2, 0.3, 0.4
    assert seeded["kl_se_seeds"] == pytest.approx(1 / 3**0.5)
    assert seeded["reward_se"] == pytest.approx(3**0.5 * 0.1 / 3)
    assert by_label["DPO b=1"]["seeds"] == 1 and by_label["DPO b=1"]["reward"] == 0.9
    from dpo.commands.report_figures import report

    assert (tmp_path / "fig" / "frontier.png") in report([sweep], tmp_path / "fig")


def test_best_of_n_of_two_sampling_seeds_is_one_frontier_point_with_bars_over_seeds(tmp_path):
    """dpo-best-of-n keeps the seed dpo-sample drew with (from the scored file's metadata) on each
    row, so the miniature's Best-of-N at seeds 0 and 1 averages into one point per N; a file
    without that metadata has no seed and stays its own point."""
    from omegaconf import OmegaConf

    from dpo.commands.best_of_n import run
    from dpo.report.figures import frontier_points, over_seeds

    rewards = {0: [[0.1, 0.5], [0.3, -0.1]], 1: [[0.4, 0.2], [0.0, 0.2]]}
    for seed, rows in rewards.items():
        folder = tmp_path / "bon" / f"seed{seed}"
        scored = write_jsonl(folder / "scored.jsonl", [{"prompt": f"P{i}", "completions": ["a", "b"], "rewards": r}
                                                                  for i, r in enumerate(rows)])
        (folder / "scored.jsonl.meta.json").write_text(json.dumps({"samples_meta": {"seed": seed}}))
        run(OmegaConf.create({"input": str(scored), "ns": [1, 2], "output": str(folder / "eval.jsonl")}))
        assert {r["seed"] for r in read_jsonl(folder / "eval.jsonl", {"seed": int})} == {seed}
    points = {p["step"]: p for p in over_seeds(frontier_points([tmp_path / "bon"]))}
    assert sorted(points) == [1, 2] and points[2]["seeds"] == 2 and points[2]["seed"] == [0, 1]
    assert points[1]["reward"] == pytest.approx((0.2 + 0.2) / 2)  # seed 0: (0.1 + 0.3) / 2; seed 1: (0.4 + 0) / 2
    assert points[2]["reward"] == pytest.approx((0.4 + 0.3) / 2)  # best of 2: (0.5 + 0.3) / 2, (0.4 + 0.2) / 2
    assert points[2]["reward_se_seeds"] == pytest.approx(0.05)
    (tmp_path / "bon" / "seed1" / "scored.jsonl.meta.json").unlink()
    run(OmegaConf.create({"input": str(tmp_path / "bon" / "seed1" / "scored.jsonl"), "ns": [1, 2],
                          "output": str(tmp_path / "bon" / "seed1" / "eval.jsonl")}))  # fmt: skip
    assert all(p["seeds"] == 1 for p in over_seeds(frontier_points([tmp_path / "bon"])))


@pytest.mark.parametrize("name", ["sample", "score", "pair", "best_of_n"])
def test_pipeline_configs_compose_and_name_their_required_inputs(tmp_path, name):
    from hydra import compose, initialize_config_dir

    from dpo.commands.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(name, overrides=[f"paths.output_dir={tmp_path}"])
    missing = OmegaConf.missing_keys(cfg)
    assert missing == ({"input"} if name != "sample" else {"model.pretrained"})
    if name == "score":
        assert cfg.reward.name == "vader"


def test_sample_takes_imdb_prefixes_from_a_data_config(tmp_path, exported_tiny):
    """`dpo-sample data=imdb`: the prompts are the 2-8 token review prefixes of the data set (the
    paper's App. C.1), cut with the model's tokenizer."""
    from hydra import compose, initialize_config_dir

    from conftest import FIXTURES
    from dpo.commands.cli import CONF_DIR
    from dpo.commands.sample import load_prompts, sample

    overrides = ["data=imdb", f"data.source.path={FIXTURES / 'imdb'}", f"model.pretrained={exported_tiny}",
                 f"output={tmp_path / 's.jsonl'}", f"paths.cache_dir={tmp_path}", f"paths.output_dir={tmp_path}",
                 "n=2", "prompts.max_prompts=3",
                 "generation.max_new_tokens=4"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("sample", overrides=overrides)
    from dpo.models.load import load_tokenizer

    tokenizer = load_tokenizer(exported_tiny)
    prompts = load_prompts(cfg, tokenizer)
    assert len(prompts) == 3
    assert all(2 <= len(tokenizer(p, add_special_tokens=False)["input_ids"]) <= 8 for p in prompts), prompts
    rows = read_jsonl(sample(cfg), {"prompt": str, "completions": list})
    assert [r["prompt"] for r in rows] == prompts and all(len(r["completions"]) == 2 for r in rows)


def test_read_jsonl_keeps_a_line_separator_inside_a_string(tmp_path):
    """Regression: a sampled completion holding U+2028 (written unescaped, ensure_ascii=False) split
    its row in two under str.splitlines, and the frontier script failed on the half rows."""
    from dpo.runtime.io import read_jsonl, write_jsonl

    path = write_jsonl(tmp_path / "rows.jsonl", [{"completion": "one\u2028two\x85three"}, {"completion": "b"}])
    assert [r["completion"] for r in read_jsonl(path, {"completion": str})] == ["one\u2028two\x85three", "b"]


def pair_config(tmp_path, rows: list, **extra):
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return OmegaConf.create({"input": str(scored), "output_dir": str(tmp_path / "p"), "min_margin": 0.0,
                             "ties": "skip", "val_fraction": 0.0, "seed": 0} | extra)  # fmt: skip


@pytest.mark.parametrize("rewards", ["[Infinity, 0.0]", "[NaN, 0.0]", "[true, 0.0]", '["1", 0.0]'])
def test_pair_and_best_of_n_refuse_rewards_that_are_not_finite_numbers(tmp_path, rewards):
    """Issue 23: dpo-pair wrote Infinity into train.jsonl; dpo-best-of-n accepted NaN rewards."""
    from dpo.commands.best_of_n import run
    from dpo.commands.pair import pair
    from dpo.data.sources import DataError

    cfg = pair_config(tmp_path, ['{"prompt": "a", "completions": ["x", "y"], "rewards": ' + rewards + "}"])
    with pytest.raises(DataError, match=r"scored.jsonl:1: 'rewards' must be a list of finite numbers"):
        pair(cfg)
    with pytest.raises(DataError, match=r"scored.jsonl:1: 'rewards' must be a list of finite numbers"):
        run(OmegaConf.create({"input": cfg.input, "ns": [1], "output": str(tmp_path / "bon.jsonl")}))
    assert not (tmp_path / "p").exists() and not (tmp_path / "bon.jsonl").exists()


@pytest.mark.parametrize(("completions", "rewards", "extra", "cause"), [
    (["x", "x"], [1.0, 0.0], {}, r"1 were identical completions \(sample with temperature > 0"),
    (["x", " "], [1.0, 0.0], {}, r"1 had an empty completion"),
    (["x", "y"], [0.5, 0.4], {"min_margin": 0.5}, r"1 had a reward gap below min_margin=0.5 \(lower min_margin\)"),
    (["x", "y"], [0.5, 0.5], {}, r"1 were exact reward ties, skipped under ties=skip"),
])  # fmt: skip
def test_no_surviving_pair_names_what_dropped_them(tmp_path, completions, rewards, extra, cause):
    """Issue 23: "no pair survived" blamed min_margin whatever the cause."""
    from dpo.commands.pair import pair
    from dpo.data.sources import DataError

    with pytest.raises(DataError, match=r"no training pair survived: " + cause):
        pair(pair_config(tmp_path, [{"prompt": "a", "completions": completions, "rewards": rewards}], **extra))


def test_jsonl_and_prompt_readers_name_a_binary_file(tmp_path):
    from dpo.data.sources import DataError
    from dpo.runtime.io import read_prompts

    for path, where in ((tmp_path / "weights.bin", r": not UTF-8 text \(byte 0\)"),
                        (tmp_path / "weights.jsonl", r":1: not valid UTF-8 \(invalid start byte at byte 0\)")):
        path.write_bytes(b"\x80\x04\x95\xff\x00binary")
        with pytest.raises(DataError, match=rf"{path.name}{where}"):
            read_prompts(path)


@pytest.mark.parametrize(("override", "message"), [
    ("prompts.max_prompts=0", r"prompts.max_prompts=0 must be a whole number >= 1 \(null: every prompt\)"),
    ("prompts.max_prompts=-1", r"prompts.max_prompts=-1 must be a whole number >= 1 \(null: every prompt\)"),
    ("generation.temperature=-1", r"generation needs temperature >= 0 \(0: greedy\)"),
    ("generation.top_p=0", r"0 < top_p <= 1, got temperature=1.0, top_k=0, top_p=0.0$"),
])  # fmt: skip
def test_sample_refuses_settings_it_used_to_misread_before_weights_load(tmp_path, monkeypatch, override, message):
    """Issue 23: max_prompts=0 sampled every prompt, -1 dropped the last; a negative temperature sampled greedily."""
    from hydra import compose, initialize_config_dir

    import dpo.commands.sample
    from dpo.commands.cli import CONF_DIR

    monkeypatch.setattr(dpo.commands.sample, "load_policy", lambda *a, **k: pytest.fail("weights loaded"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Review it:\nWhat a film\n")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("sample", overrides=[f"paths.output_dir={tmp_path}", "model.pretrained=unused",
                                           f"prompts.file={prompts}", override])  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        dpo.commands.sample.sample(cfg)


def test_an_append_after_a_torn_line_keeps_every_whole_row(tmp_path):
    """Issue 23: eval.jsonl was appended non-atomically; a kill mid-append left a torn line that crashed
    the resumed run's first evaluation. The torn line (never a row) is cut off by the next append."""
    from dpo.runtime.io import append_jsonl

    log = tmp_path / "eval.jsonl"
    append_jsonl(log, {"step": 0, "kl": 0.0})
    with log.open("a") as f:
        f.write('{"step": 4, "kl": 0.3')  # killed mid-write
    append_jsonl(log, {"step": 4, "kl": 0.25})
    assert read_jsonl(log, {"step": int, "kl": float}) == [{"step": 0, "kl": 0.0}, {"step": 4, "kl": 0.25}]


def test_a_reward_model_export_is_refused_as_a_policy_before_its_weights_load(tmp_path, exported_tiny_rm):
    """Issue 23: a reward model's export was accepted as a sampling policy (a random LM head on its trunk)."""
    from dpo.models.load import ModelConfig, ModelLoadError, load_policy

    with pytest.raises(ModelLoadError, match=r"holds a reward model \(GPT2ForSequenceClassification\), not a causal"):
        load_policy(ModelConfig(exported_tiny_rm))


def test_valid_inputs_with_a_bom_and_crlf_are_read(tmp_path):
    """The fuzz round's one refused valid input: a JSONL file saved with a BOM (and CRLF line ends)."""
    path = tmp_path / "scored.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "a", "rewards": [1.0]}).encode() + b"\r\n")
    assert read_jsonl(path, {"prompt": str}) == [{"prompt": "a", "rewards": [1.0]}]


def test_best_of_n_beyond_the_samples_and_an_unknown_reward_are_one_line_errors(tmp_path):
    """Two raw tracebacks of the fuzz round (experiments/fuzz/cases.md)."""
    from dpo.commands.best_of_n import run
    from dpo.commands.score import score
    from dpo.data.sources import DataError

    scored = tmp_path / "s.jsonl"
    scored.write_text(json.dumps({"prompt": "a", "completions": ["x", "y"], "rewards": [1.0, 0.0]}) + "\n")
    with pytest.raises(DataError, match=r"s.jsonl:1: 2 samples, fewer than the largest N in ns=\[8\]"):
        run(OmegaConf.create({"input": str(scored), "ns": [8], "output": str(tmp_path / "b.jsonl")}))
    with pytest.raises(ConfigError, match=r"reward: unknown reward 'nope'"):
        score(OmegaConf.create({"input": str(scored), "output": str(tmp_path / "o.jsonl"), "reward": {"name": "nope"},
                                "include_prompt": True, "batch_size": 4}))  # fmt: skip


@pytest.mark.parametrize(("name", "content", "message"), [
    ("run/csv/metrics.csv", "step,train/loss\n0,0.69\n1,oops\n", r"metrics.csv:3: not Lightning's metrics CSV"),
    ("run/csv/metrics.csv", "step,train/loss\n0,0.69,7\n", r"metrics.csv:2: not Lightning's metrics CSV \(a row of"),
    ("run/.hydra/overrides.yaml", "- a: [", r"overrides.yaml: not Hydra's overrides list"),
    ("run/eval/eval.jsonl", '{"step": 0, "kl": 0.1, "reward": 0.5}\n{"step": 4, "kl"', r"eval.jsonl:2: not valid JSON"),
    ("run/eval/eval.jsonl", '{"step": 0, "reward": 0.5}\n', r"eval.jsonl:1: missing key 'kl'"),
    ("bon/eval.jsonl", b"\xff\xfe\x00", r"eval.jsonl:1: not valid UTF-8"),
])  # fmt: skip
def test_dpo_report_names_the_malformed_file_in_one_line(tmp_path, name, content, message):
    """Issue 23: a malformed metrics.csv, eval.jsonl, results.jsonl or overrides file was a raw traceback."""
    import re
    import subprocess
    import sys

    path = tmp_path / name
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if name.startswith("run/") and not name.endswith("metrics.csv"):
        (tmp_path / "run" / "csv").mkdir(exist_ok=True)
        (tmp_path / "run" / "csv" / "metrics.csv").write_text("step,train/loss\n0,0.69\n")
        (tmp_path / "run" / "config.yaml").write_text("system: {kind: dpo}\nloss: {name: dpo, beta: 0.1}\n")
    proc = subprocess.run([sys.executable, "-m", "dpo.commands.report_figures", f"runs=[{tmp_path}]",
                           f"out={tmp_path / 'f'}", f"paths.log_dir={tmp_path / 'logs'}"], capture_output=True,
                          text=True)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out[-2000:]
    assert len(out.strip().splitlines()) == 1 and re.search(message, out), out


def test_dpo_dashboard_names_a_malformed_spec_file(tmp_path):
    from tests_helpers import run_entry

    from dpo.commands.dashboard import main

    spec = tmp_path / "dash.json"
    spec.write_text('{"spec": {"entity": "me"')
    rc, out = run_entry(main, f"spec={spec}", "publish=true", cwd=tmp_path)
    assert rc == 1 and re.search(r"spec=.*dash.json is not a spec dpo-dashboard wrote \(JSONDecodeError", out), out


def test_dpo_report_and_dpo_dashboard_are_hydra_commands_whose_mistakes_are_one_line(tmp_path):
    """Issue 23: every command on the same Hydra front (dpo.commands.cli.entry): an unknown key, a missing
    folder, a wrong type end in one line and exit status 1; nothing is written."""
    from tests_helpers import run_entry

    from dpo.commands import dashboard
    from dpo.commands import report_figures as report

    logs = f"paths.log_dir={tmp_path / 'logs'}"
    for main, args, message in [
        (report.main, [logs], r"required config value\(s\) not set: \['runs'\]"),
        (report.main, [logs, "runs=[]"], r"runs=\[\] must be a folder or a list of folders"),
        (report.main, [logs, f"runs=[{tmp_path / 'none'}]"], r"runs: no such folder: .*none"),
        (report.main, [logs, f"runs={tmp_path / 'logs'}"], r"no run logs \(csv/metrics.csv\)"),
        (dashboard.main, [logs, "colour=red"], r"Could not override 'colour'"),
        (dashboard.main, [logs, "project=dpo", "group=g"], r"set entity=\.\.\."),
        (dashboard.main, [logs, "entity=a", "project=b", "group=g", "publish=maybe"], r"publish"),
    ]:  # fmt: skip
        (tmp_path / "logs").mkdir(exist_ok=True)
        rc, out = run_entry(main, *args, cwd=tmp_path)
        assert rc == 1 and "Traceback" not in out and re.search(message, out), (args, out)
    assert not (tmp_path / "figures").exists() and not (tmp_path / "dashboard.json").exists()
