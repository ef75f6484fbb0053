"""bench/quant_table.py's paired evidence for an accuracy miss: discordant images and the
exact McNemar p-value, cross-checked against scipy's binomial test."""
import os
import random
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import quant_table  # noqa: E402

stats = pytest.importorskip("scipy.stats", reason="scipy comes with scikit-learn")


def _cell(rows: list[str]) -> dict:
    return {"draws": [{"right": r} for r in rows]}


def test_discordant_images_are_counted_draw_against_draw():
    a = _cell(["1100", "1111"])
    b = _cell(["1010", "0000"])
    only_a, only_b, _ = quant_table.paired(a, b)
    assert (only_a, only_b) == (1 + 4, 1 + 0)
    assert quant_table.paired(b, a)[:2] == (only_b, only_a)


@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_p_equals_scipys_two_sided_binomial_test(seed):
    rng = random.Random(seed)
    n = rng.choice([40, 359])
    rows_a = ["".join(rng.choice("01") for _ in range(n)) for _ in range(3)]
    rows_b = ["".join(c if rng.random() < 0.9 else "10"[int(c)] for c in r) for r in rows_a]
    only_a, only_b, p = quant_table.paired(_cell(rows_a), _cell(rows_b))
    want = stats.binomtest(only_a, only_a + only_b, 0.5, alternative="two-sided").pvalue if only_a + only_b else 1.0
    assert p == pytest.approx(want, rel=1e-9)


def test_no_discordant_images_is_p_one():
    assert quant_table.paired(_cell(["101"]), _cell(["101"])) == (0, 0, 1.0)
