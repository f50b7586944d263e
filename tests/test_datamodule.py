"""The data module: tokenized cache (hits, misses, one build under concurrency), grouping, samples."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from tests_helpers import tiny_data_config

from conftest import bundled_spec
from dpo.data import cache
from dpo.data.batch import Layout
from dpo.data.datamodule import PreferenceDataModule
from dpo.data.samplers import GlobalBatchSampler
from dpo.data.sources import SourceSpec

FIXTURES = Path(__file__).parent / "fixtures"


def make(tokenizer, cache_dir, source=None, max_length=64, **kwargs):
    config = tiny_data_config(
        source or bundled_spec(max_rows=64), max_length=max_length, eval_batch_size=4,
        cache_dir=cache_dir and str(cache_dir), **kwargs,
    )  # fmt: skip
    return PreferenceDataModule(tokenizer, config, pairs=True, layout=Layout.separate)


def test_second_setup_is_a_cache_hit_with_identical_data(tmp_path, bpe_tokenizer):
    first = make(bpe_tokenizer, tmp_path)
    first.setup()
    assert first.cache_hits == {"train": False, "val": False}
    second = make(bpe_tokenizer, tmp_path)
    second.setup()
    assert second.cache_hits == {"train": True, "val": True}
    assert second.datasets["train"].items == first.datasets["train"].items
    assert second.stats == first.stats


def test_changed_length_tokenizer_or_file_is_a_miss(tmp_path, bpe_tokenizer, bundled_rows):
    from dpo.models.load import train_bpe_tokenizer

    make(bpe_tokenizer, tmp_path).setup()
    longer = make(bpe_tokenizer, tmp_path, max_length=65)
    longer.setup()
    assert longer.cache_hits["train"] is False
    other_tok = train_bpe_tokenizer([r.chosen for r in bundled_rows[:200]], 300)
    retok = make(other_tok, tmp_path)
    retok.setup()
    assert retok.cache_hits["train"] is False
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    source = SourceSpec("fields", {"train": str(data), "val": str(data)}, None)
    make(bpe_tokenizer, tmp_path, source=source, batch_size=1).setup()
    data.write_text('{"prompt": "a", "chosen": "bb", "rejected": "c"}\n')
    os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = make(bpe_tokenizer, tmp_path, source=source, batch_size=1)
    changed.setup()
    assert changed.cache_hits["train"] is False
    assert len(changed.datasets["train"].items[0].chosen_ids) == len(bpe_tokenizer("bb")["input_ids"]) + 1


def test_concurrent_jobs_tokenize_once(tmp_path):
    """Two jobs (or ranks) asking for the same split at once: one builds, the other reads."""
    calls = []

    def build():
        calls.append(1)
        time.sleep(0.3)
        return [], [], {"n": 0}

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_build(tmp_path, "k", build))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(r[3] for r in results) == [False, True]


def test_group_by_prompt_keeps_a_prompts_pairs_together(tmp_path, bpe_tokenizer):
    source = SourceSpec(
        "shp", {"train": "train", "val": "validation"}, path=str(FIXTURES / "shp"), options={"min_score_ratio": 1.0}
    )
    dm = make(bpe_tokenizer, tmp_path, source=source, group_by_prompt=True)
    dm.setup()
    groups = dm.datasets["train"].groups
    assert groups == [0, 0, 0, 1]
    sampler = GlobalBatchSampler(groups, micro=1, group_by_prompt=True, seed=3)
    for epoch in range(3):  # every epoch: a permutation with each group contiguous
        sampler.set_epoch(epoch)
        order = [groups[i] for i in sampler]
        assert sorted(order) == sorted(groups)
        assert order in ([0, 0, 0, 1], [1, 0, 0, 0])
    assert dm.stats["train"]["prompts"] == 2 and dm.stats["train"]["pairs"] == 4


def test_samples_show_the_rendered_text_with_token_counts(tmp_path, bpe_tokenizer):
    dm = make(bpe_tokenizer, None)
    dm.setup()
    sample = dm.samples(1)[0]
    first = dm.datasets["train"].items[0]
    assert f"prompt ({len(first.prompt_ids)} tok)" in sample and "Review the drama" in sample
    assert f"rejected ({len(first.rejected_ids)} tok)" in sample
    assert dm.stats["train"]["rows"] == 64 and "response_len_p95" in dm.stats["train"]


def test_global_batches_are_the_same_rows_for_any_world_size_and_accumulation():
    """Step s trains on the same rows with 1 x 8, 2 ranks x 4, 4 accumulation x 2, 2 ranks x 2 accum x 2."""
    groups = list(range(50))

    def steps(micro, world, accumulate):
        per_rank = []
        for rank in range(world):
            sampler = GlobalBatchSampler(groups, micro, world, rank, accumulate, seed=7)
            sampler.set_epoch(1)
            per_rank.append(list(sampler))
            assert len(per_rank[-1]) == len(sampler)
        n_steps = len(per_rank[0]) // (micro * accumulate)
        chunk = micro * accumulate
        return [sorted(i for r in per_rank for i in r[s * chunk : (s + 1) * chunk]) for s in range(n_steps)]

    reference = steps(8, 1, 1)
    assert len(reference) == 6  # 50 // 8; the incomplete global batch is dropped
    for micro, world, accumulate in ((4, 2, 1), (2, 1, 4), (2, 2, 2)):
        assert steps(micro, world, accumulate) == reference
    shuffled = GlobalBatchSampler(groups, 8, seed=7)
    assert shuffled.order(0) != shuffled.order(1) and sorted(shuffled.order(0)) == groups


def test_skip_batches_resumes_mid_epoch():
    sampler = GlobalBatchSampler(list(range(40)), micro=4, accumulate=2, seed=1)
    full = list(sampler)
    sampler.skip_batches = 3
    assert list(sampler) == full[12:]
    assert list(sampler) == full  # the skip applies once


def test_a_split_whose_pairs_are_all_identical_is_refused_and_a_few_are_counted(tmp_path, bpe_tokenizer, caplog):
    """Issue 23: chosen == rejected in every row trained silently (DPO's gradient is 0 for such a pair)."""
    import json

    import pytest

    from dpo.data.sources import DataError

    def source(rows: list[dict]) -> SourceSpec:
        path = tmp_path / f"pairs{len(list(tmp_path.glob('*.jsonl')))}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return SourceSpec("fields", {"train": str(path), "val": str(path)}, None)

    same = [{"prompt": f"Review {i}:", "chosen": " Fine film.", "rejected": " Fine film."} for i in range(8)]
    with pytest.raises(DataError, match=r"pairs0.jsonl: every pair of the train split has the same chosen"):
        make(bpe_tokenizer, None, source(same)).setup("fit")
    one = [*same[:1], *({**r, "rejected": " Dull."} for r in same[1:])]
    with caplog.at_level("WARNING"):
        make(bpe_tokenizer, None, source(one)).setup("fit")
    assert "1 of 8 train pairs have the same chosen and rejected tokens (e.g. pairs [0])" in caplog.text
