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


def test_pooled_folds_equal_one_evaluation_over_all_their_images():
    """Folds of different sizes, pooled: accuracy, KL and the per-image record must be what
    scoring the concatenated held-out images directly gives (computed here from the raw
    per-image data, not from the fold summaries)."""
    rng = random.Random(0)
    sizes, draws = [5, 7, 4], 2
    per_image = {}  # (row, method, draw) -> list of (right, kl) over all images, fold after fold
    folds = []
    for n in sizes:
        fp32 = [rng.random() < 0.9 for _ in range(n)]
        res = {"spec": "s", "params": 1, "calib_images": 8, "calib_draws": draws, "test_size": n,
               "train_acc_reported": 0.9 + rng.random() / 20,
               "rows": {"FP32": {m: {"correct": sum(fp32), "acc": 100 * sum(fp32) / n, "kl": 0.0}
                                 for m in quant_table.METHODS}}}
        per_image.setdefault(("FP32",), []).extend(fp32)
        res["rows"]["W4A4"] = {}
        for m in quant_table.METHODS:
            ds = []
            for k in range(draws):
                img = [(rng.random() < 0.8, rng.random()) for _ in range(n)]
                per_image.setdefault(("W4A4", m, k), []).extend(img)
                c = sum(r for r, _ in img)
                ds.append({"correct": c, "acc": 100 * c / n, "kl": sum(v for _, v in img) / n,
                           "right": "".join("1" if r else "0" for r, _ in img)})
            res["rows"]["W4A4"][m] = {"acc": sum(d["acc"] for d in ds) / draws, "kl": sum(d["kl"] for d in ds) / draws,
                                      "avg_weight_bits": 4.0, "avg_act_bits": 4.0, "draws": ds}
        folds.append(res)
    p = quant_table.pooled(folds)
    total = sum(sizes)
    assert p["test_size"] == total and p["folds"] == 3
    assert p["rows"]["FP32"]["mptq"]["acc"] == pytest.approx(100 * sum(per_image[("FP32",)]) / total)
    assert p["train_acc_reported"] == pytest.approx(sum(f["train_acc_reported"] * n for f, n in zip(folds, sizes)) / total)
    for m in quant_table.METHODS:
        cell = p["rows"]["W4A4"][m]
        for k in range(draws):
            img = per_image[("W4A4", m, k)]
            assert cell["draws"][k]["right"] == "".join("1" if r else "0" for r, _ in img)
            assert cell["draws"][k]["kl"] == pytest.approx(sum(v for _, v in img) / total)
        want_acc = sum(100 * sum(r for r, _ in per_image[("W4A4", m, k)]) / total for k in range(draws)) / draws
        assert cell["acc"] == pytest.approx(want_acc)
        want_kl = sum(sum(v for _, v in per_image[("W4A4", m, k)]) / total for k in range(draws)) / draws
        assert cell["kl"] == pytest.approx(want_kl)
    # the pooled cells feed the same target checks as one fold's
    assert {c["target"] for c in quant_table.check("s, 3 folds pooled", p)} >= {"mptq KL < minmax KL at every setting"}


def test_the_training_cache_is_keyed_by_the_files_training_runs():
    """The cached digits models are stale when code training runs changes (the model's
    ops, the training loop, the fake-quant check it calls), not when a calibration method
    or the CLI does: those never touch the trained weights."""
    modules = quant_table.training_modules()
    for used in ("vitdsl.train", "vitdsl.ops.attention", "vitdsl.ops.conv", "vitdsl.builder", "vitdsl.quant.fake"):
        assert used in modules and os.path.exists(modules[used])
    for unused in ("vitdsl.quant.mptq", "vitdsl.quant.gptq", "vitdsl.quant.mixed", "vitdsl.quant.sqb", "vitdsl.cli"):
        assert unused not in modules
