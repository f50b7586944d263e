"""The benchmark compares like with like: our fp32 per-step losses equal TRL's DPOTrainer's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "experiments" / "bench_trl"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    pytest.importorskip("trl")
    sys.path.insert(0, str(BENCH))
    import bench as module

    work = tmp_path_factory.mktemp("bench")
    module.make_assets(work, n_pairs=module.BATCH * 3, sizes={"tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2}})
    yield module, work
    sys.path.remove(str(BENCH))


@pytest.mark.slow
def test_fp32_losses_match_trl_step_for_step(bench):
    """Same model, pairs, tokenization, optimizer, clipping and order: the two trainers do the same work.

    Step 1 is ln 2 in both. Later steps agree to fp32 rounding, which Adam amplifies: a weight
    whose gradient is near 0 moves by about lr * sign(g), so rounding noise in g becomes an
    lr-sized step (lr 1e-5 here). The gradients themselves are checked to 1e-5 against the full
    forward in tests/test_packing.py::test_gradients_equal_the_full_forward.
    """
    module, work = bench
    theirs = module.run_trl(work, "tiny", steps=3)["losses"]
    ours = module.run_ours(work, "tiny", steps=3, levers=module.OURS["ours_separate"])["losses"]
    assert len(theirs) == len(ours) == 3 and theirs[0] == pytest.approx(0.6931472, abs=1e-6)
    assert ours[1] == pytest.approx(theirs[1], abs=2e-6) and ours == pytest.approx(theirs, abs=1e-5)
    # Prefix sharing (padding-free, the default) is exact, not an approximation. The precomputed
    # reference equals the live one: tests/test_reference.py and the pinned runs of tests/test_train.py.
    exact = module.run_ours(work, "tiny", steps=3, levers=module.OURS["ours_exact"])["losses"]
    assert exact == pytest.approx(theirs, abs=1e-5)


def test_token_count_covers_both_rows(bench):
    module, work = bench
    counts = module.tokens_per_step(work, 3)
    assert len(counts) == 3 and all(8 * 2 * (64 + 32) <= c <= 8 * 2 * (192 + 128 + 1) for c in counts)


@pytest.mark.slow
def test_trl_best_does_the_same_work_as_trl(bench):
    """trl_best (precomputed reference log-probs, parallel tokenization) changes TRL's speed, not its
    losses: step for step equal to TRL's defaults."""
    module, work = bench
    default = module.run_trl(work, "tiny", steps=3)["losses"]
    best = module.run_trl(work, "tiny", steps=3, best=True)["losses"]
    assert best == pytest.approx(default, abs=1e-5)
