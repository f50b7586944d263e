"""The bundled data files are exactly what the generator writes."""

from __future__ import annotations

import json

from dpo.data import synthetic


def test_bundled_files_match_the_generator():
    for name, n, seed in ((synthetic.TRAIN_FILE, 2000, 0), (synthetic.VAL_FILE, 256, 1)):
        on_disk = [json.loads(line) for line in (synthetic.FILES_DIR / name).read_text(encoding="utf-8").splitlines()]
        assert on_disk == synthetic.make_rows(n, seed), f"{name} differs from `python -m dpo.data.synthetic`"


def test_pairs_are_distinct_and_chosen_is_positive():
    rows = synthetic.make_rows(200, seed=5)
    assert all(r["chosen"] != r["rejected"] and r["chosen"] and r["rejected"] for r in rows)
    assert all(any(w in r["chosen"] for w in synthetic._POS_ADJ + ["loved", "best", "smiling"]) for r in rows)
