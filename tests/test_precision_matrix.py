"""The precision-and-strategy matrix (experiments/precision_matrix): its factors come from the
registries, its covering set holds every pair the full product holds, and each case of that set
trains (finite losses, trainable weights moved, frozen ones bit-identical, weights in the
precision's dtype) or is refused before weights load; the first step's loss under bf16-mixed is
within the stated tolerance of 32-true's. The full product's table is experiments/precision_matrix/results.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dpo.commands.cli import CONF_DIR
from dpo.systems import SYSTEMS
from dpo.systems.reference import REFERENCES

sys.path.insert(0, str(Path(__file__).parent.parent / "experiments" / "precision_matrix"))
import precision_matrix as matrix  # noqa: E402

COVERING = matrix.pairwise()


def test_the_matrix_is_built_from_the_registries_and_its_covering_set_holds_every_pair():
    """A system, reference or trainer config added later joins the matrix (or this test fails)."""
    product = matrix.full_product()
    assert {c.system for c in product} == set(SYSTEMS)
    assert {c.reference for c in product if c.system == "dpo"} == set(REFERENCES)
    trainers = {p.stem for p in (CONF_DIR / "trainer").glob("*.yaml")}
    assert set(matrix.TRAINERS) | set(matrix.SAME_AS) == trainers and set(matrix.SAME_AS.values()) <= set(trainers)
    trains = [c for c in product if not matrix.refused(c)]
    assert matrix.covered_pairs([c for c in COVERING if not matrix.refused(c)]) == matrix.covered_pairs(trains)
    assert {c.system for c in COVERING if matrix.refused(c)} == {k for k, s in SYSTEMS.items() if not s.shardable}
    assert len(COVERING) < len(product) / 5


RESULTS: dict[str, matrix.Result] = {}


@pytest.mark.slow
@pytest.mark.parametrize("case", COVERING, ids=lambda c: c.name)
def test_each_case_trains_or_is_refused_before_weights_load(case, tmp_path_factory):
    result = matrix.run_case(case, tmp_path_factory.getbasetemp() / "matrix")
    RESULTS[case.name] = result
    if matrix.refused(case):
        assert result.verdict == "refused" and "not a sharded (FSDP) strategy" in result.message, result.message
    else:
        assert result.verdict == "ok", result.message


@pytest.mark.slow
def test_the_first_step_loss_under_bf16_mixed_is_within_tolerance_of_fp32():
    """Runs after the cases above (same file, same worker); matrix.first_loss_tolerance gives each
    tolerance and its reason."""
    results = list(RESULTS.values())
    gaps = matrix.first_loss_gaps(results)
    assert {name.split("-")[0] for name in gaps} == {"dpo", "reward_model", "kto"}, sorted(RESULTS)
    assert matrix.over_tolerance(results) == {}, gaps
