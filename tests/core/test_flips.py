"""Tests of rcat_ray.core.flips: exact metric values, properties of the rates, the bootstrap, errors."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rcat_ray.core import flips
from rcat_ray.core.flips import (
    FLIP_SCHEMA,
    METRICS,
    ROBUST_METRICS,
    flip_table,
    format_summary,
    paired_difference,
    summarize,
)
from rcat_ray.errors import FlipInputError

RATES = tuple(m for m in METRICS if m != "relative_nfr")


def model_table(
    sample_ids: Sequence[int],
    labels: Sequence[int],
    clean_correct: Sequence[bool],
    robust: Sequence[bool | None],
) -> pa.Table:
    """Build a per-model table (docs/contracts.md §2.1) whose predictions and margins agree with the flags."""
    labels_np = np.asarray(labels, dtype=np.int32)
    correct = np.asarray(clean_correct, dtype=bool)
    attacked = np.array([r is not None for r in robust], dtype=bool)
    robust_np = np.array([bool(r) for r in robust], dtype=bool)
    wrong = ((labels_np + 1) % 10).astype(np.int32)
    clean_pred = np.where(correct, labels_np, wrong)
    adv_pred = np.where(robust_np, labels_np, wrong)
    clean_margin = np.where(correct, 1.0, -1.0).astype(np.float32)
    adv_margin = np.where(robust_np, 0.5, -0.5).astype(np.float32)
    broken_by = ["apgd-ce" if a and c and not r else None for a, c, r in zip(attacked, correct, robust_np, strict=True)]
    return pa.table(
        {
            "sample_id": pa.array(sample_ids, pa.int64()),
            "label": pa.array(labels_np, pa.int32()),
            "clean_pred": pa.array(clean_pred, pa.int32()),
            "clean_correct": pa.array(correct, pa.bool_()),
            "adv_pred": pa.array(adv_pred, pa.int32(), mask=~attacked),
            "robust": pa.array(robust_np, pa.bool_(), mask=~attacked),
            "clean_margin": pa.array(clean_margin, pa.float32()),
            "adv_margin": pa.array(adv_margin, pa.float32(), mask=~attacked),
            "perturbation_linf": pa.array(np.full(len(labels_np), 0.03, np.float32), mask=~attacked),
            "broken_by": pa.array(broken_by, pa.string()),
            "min_margin": pa.array(np.minimum(adv_margin, clean_margin), pa.float32(), mask=~attacked),
        }
    )


# The hand-computed case. Columns: c_old, c_new, r_old, r_new, label.
HAND = [
    (1, 1, 1, 1, 0),  # stays correct and robust
    (1, 0, 1, 0, 0),  # negative flip and robust negative flip (B-NFR)
    (1, 0, 0, 0, 1),  # negative flip only
    (0, 1, 0, 1, 1),  # positive flip and robust positive flip
    (1, 1, 1, 0, 0),  # robust negative flip only
    (0, 0, 0, 0, 1),
    (1, 1, 0, 0, 0),
    (0, 0, 0, 0, 1),
]
HAND_IDS = [40, 3, 17, 8, 25, 11, 30, 2]  # deliberately unsorted


def hand_tables() -> tuple[pa.Table, pa.Table]:
    """Old and new tables of HAND; the new table's rows are in a different order to exercise the join."""
    labels = [row[4] for row in HAND]
    old = model_table(HAND_IDS, labels, [bool(r[0]) for r in HAND], [bool(r[2]) for r in HAND])
    new = model_table(HAND_IDS, labels, [bool(r[1]) for r in HAND], [bool(r[3]) for r in HAND])
    return old, new.take(pa.array([7, 6, 5, 4, 3, 2, 1, 0]))


def values(summary_metrics: dict) -> dict[str, float | None]:
    """Metric key -> point value."""
    return {key: entry["value"] for key, entry in summary_metrics.items()}


# --------------------------------------------------------------------------------------------------
# flip_table
# --------------------------------------------------------------------------------------------------


def test_flip_table_schema_sorted_and_flags() -> None:
    old, new = hand_tables()
    table = flip_table(old, new)
    assert table.schema == FLIP_SCHEMA
    assert table.column("sample_id").to_pylist() == sorted(HAND_IDS)
    by_id = dict(zip(HAND_IDS, HAND, strict=True))
    for rec in table.to_pylist():
        c_old, c_new, r_old, r_new, label = by_id[rec["sample_id"]]
        assert rec["label"] == label
        assert rec["old_clean_correct"] == bool(c_old)
        assert rec["new_clean_correct"] == bool(c_new)
        assert rec["neg_flip"] == bool(c_old and not c_new)
        assert rec["pos_flip"] == bool(not c_old and c_new)
        assert rec["robust_neg_flip"] == bool(r_old and not r_new)
        assert rec["robust_pos_flip"] == bool(not r_old and r_new)
        assert rec["old_clean_margin"] == (1.0 if c_old else -1.0)
        assert rec["new_adv_margin"] == (0.5 if r_new else -0.5)


def test_flip_table_robust_flips_null_where_either_not_attacked() -> None:
    ids = [0, 1, 2, 3]
    labels = [0, 1, 0, 1]
    old = model_table(ids, labels, [True] * 4, [True, None, True, None])
    new = model_table(ids, labels, [True] * 4, [False, False, None, None])
    table = flip_table(old, new)
    assert table.column("robust_neg_flip").to_pylist() == [True, None, None, None]
    assert table.column("robust_pos_flip").to_pylist() == [False, None, None, None]
    assert table.column("old_robust").to_pylist() == [True, None, True, None]
    assert table.column("new_adv_margin").null_count == 2


def test_flip_table_accepts_castable_types_and_chunks() -> None:
    old, new = hand_tables()
    old = old.set_column(0, "sample_id", old.column("sample_id").cast(pa.int32()))
    new = pa.concat_tables([new.slice(0, 3), new.slice(3)])  # several chunks
    assert flip_table(old, new).equals(flip_table(*hand_tables()))


def test_different_sample_id_sets_raise() -> None:
    old = model_table([0, 1, 2, 3], [0, 0, 1, 1], [True] * 4, [True] * 4)
    new = model_table([0, 1, 2, 5, 6], [0, 0, 1, 1, 1], [True] * 5, [True] * 5)
    with pytest.raises(FlipInputError, match=r"1 id\(s\) only in old, 2 id\(s\) only in new"):
        flip_table(old, new)


def test_label_mismatch_raises_naming_an_id() -> None:
    old = model_table([5, 6, 7], [0, 1, 2], [True] * 3, [True] * 3)
    new = model_table([5, 6, 7], [0, 9, 2], [True] * 3, [True] * 3)
    with pytest.raises(FlipInputError, match=r"sample_id 6"):
        flip_table(old, new)


def test_missing_column_and_duplicates_raise() -> None:
    old, new = hand_tables()
    with pytest.raises(FlipInputError, match="missing column"):
        flip_table(old.drop_columns(["robust"]), new)
    duplicated = pa.concat_tables([old, old.slice(0, 1)])
    with pytest.raises(FlipInputError, match="duplicated sample_id"):
        flip_table(duplicated, pa.concat_tables([new, new.slice(0, 1)]))
    assert issubclass(FlipInputError, ValueError)


# --------------------------------------------------------------------------------------------------
# summarize: exact values
# --------------------------------------------------------------------------------------------------


def test_hand_computed_metrics() -> None:
    summary = summarize(flip_table(*hand_tables()), n_bootstrap=200)
    assert summary["n_clean"] == 8
    assert summary["n_robust"] == 8
    got = values(summary["metrics"])
    assert got == {
        "acc_old": 5 / 8,
        "acc": 4 / 8,
        "nfr": 2 / 8,
        "pfr": 1 / 8,
        "relative_nfr": pytest.approx(0.25 / ((5 / 8) * (4 / 8)), rel=1e-12),  # = 0.8
        "rob_acc_old": 3 / 8,
        "rob_acc": 2 / 8,
        "r_nfr": 2 / 8,
        "r_pfr": 1 / 8,
        "b_nfr": 1 / 8,
        "s_nfr": 3 / 8,
        "nfr_robust_subset": 2 / 8,  # every row attacked: the NFR itself
        "near_flip": 0.0,  # no robust sample's lowest margin (0.5) is below the threshold (0.5)
    }
    assert all(entry["n"] == 8 for entry in summary["metrics"].values())
    # tables stored before min_margin existed: the near-flip rate is unknown, not 0
    legacy = summarize(flip_table(*(t.drop_columns(["min_margin"]) for t in hand_tables())), n_bootstrap=200)
    assert legacy["metrics"]["near_flip"] == {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    assert {k: v for k, v in legacy["metrics"].items() if k != "near_flip"} == {
        k: v for k, v in summary["metrics"].items() if k != "near_flip"
    }
    assert list(summary["metrics"]) == list(METRICS)


def test_hand_computed_per_class() -> None:
    summary = summarize(flip_table(*hand_tables()), n_bootstrap=100, class_names=["cat", "dog"])
    cls0, cls1 = summary["per_class"]
    assert (cls0["class"], cls0["name"], cls0["n_clean"], cls0["n_robust"]) == (0, "cat", 4, 4)
    assert values(cls0["metrics"]) == {
        "acc_old": 1.0,
        "acc": 0.75,
        "nfr": 0.25,
        "pfr": 0.0,
        "relative_nfr": 1.0,  # 0.25 / (1 * 0.25)
        "rob_acc_old": 0.75,
        "rob_acc": 0.25,
        "r_nfr": 0.5,
        "r_pfr": 0.0,
        "b_nfr": 0.25,
        "s_nfr": 0.5,
        "nfr_robust_subset": 0.25,
        "near_flip": 0.0,
    }
    assert cls1["name"] == "dog"
    assert cls1["metrics"]["relative_nfr"]["value"] == pytest.approx(0.25 / (0.25 * 0.75))


def test_robust_metrics_use_only_the_attacked_subset() -> None:
    # 10 samples; old not attacked on 0-1, new not attacked on 2: robust set = samples 3..9 (7 rows).
    ids = list(range(10))
    labels = [i % 2 for i in ids]
    c_old = [True] * 10
    c_new = [True] * 9 + [False]
    r_old: list[bool | None] = [None, None, True, True, True, True, False, False, True, True]
    r_new: list[bool | None] = [False, False, None, False, True, True, True, False, True, False]
    summary = summarize(flip_table(model_table(ids, labels, c_old, r_old), model_table(ids, labels, c_new, r_new)))
    assert summary["n_clean"] == 10
    assert summary["n_robust"] == 7
    m = summary["metrics"]
    assert m["nfr"] == {**m["nfr"], "value": 0.1, "n": 10}
    # robust set rows 3..9: r_old T T T F F T T, r_new F T T T F T F
    assert m["rob_acc_old"]["value"] == 5 / 7
    assert m["rob_acc"]["value"] == 4 / 7
    assert m["r_nfr"]["value"] == 2 / 7  # rows 3, 9
    assert m["r_pfr"]["value"] == 1 / 7  # row 6
    assert m["b_nfr"]["value"] == 1 / 7  # row 9 also flips clean
    assert m["s_nfr"]["value"] == 2 / 7
    assert m["nfr_robust_subset"]["value"] == 1 / 7  # row 9, the only clean flip, is in the robust set
    assert m["s_nfr"]["value"] == pytest.approx(
        m["nfr_robust_subset"]["value"] + m["r_nfr"]["value"] - m["b_nfr"]["value"], abs=1e-15
    )
    assert all(m[key]["n"] == 7 for key in ROBUST_METRICS)
    assert all(m[key]["n"] == 10 for key in METRICS if key not in ROBUST_METRICS)
    per_class = {c["class"]: c for c in summary["per_class"]}
    assert (per_class[0]["n_clean"], per_class[0]["n_robust"]) == (5, 3)  # rows 4, 6, 8
    assert (per_class[1]["n_clean"], per_class[1]["n_robust"]) == (5, 4)  # rows 3, 5, 7, 9


def test_empty_robust_set_and_undefined_relative_nfr_are_null() -> None:
    ids = list(range(6))
    labels = [0, 0, 0, 1, 1, 1]
    old = model_table(ids, labels, [True, False, True, False, True, True], [None] * 6)
    new = model_table(ids, labels, [True] * 6, [None] * 6)  # err_new = 0 -> relative NFR undefined
    summary = summarize(flip_table(old, new), n_bootstrap=50, num_classes=3)
    json.dumps(summary, allow_nan=False)
    assert summary["n_robust"] == 0
    for key in ROBUST_METRICS:
        assert summary["metrics"][key] == {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    assert summary["metrics"]["relative_nfr"]["value"] is None
    assert summary["metrics"]["relative_nfr"]["n"] == 6
    absent = summary["per_class"][2]
    assert (absent["class"], absent["n_clean"], absent["n_robust"]) == (2, 0, 0)
    assert all(entry["value"] is None for entry in absent["metrics"].values())
    text = format_summary(summary)
    assert "R-NFR" in text
    assert "S-NFR" in text


def test_summary_json_and_layout() -> None:
    summary = summarize(flip_table(*hand_tables()), n_bootstrap=100, seed=3, num_classes=2)
    encoded = json.dumps(summary, allow_nan=False)
    assert json.loads(encoded) == summary
    assert set(summary) == {"n_clean", "n_robust", "near_margin", "bootstrap", "metrics", "per_class"}
    assert summary["bootstrap"] == {"n_resamples": 100, "confidence": 0.95, "seed": 3}
    for entry in summary["metrics"].values():
        assert set(entry) == {"value", "ci_low", "ci_high", "n"}
    assert [c["class"] for c in summary["per_class"]] == [0, 1]
    assert [c["name"] for c in summary["per_class"]] == ["0", "1"]


def test_no_bootstrap_gives_values_without_intervals() -> None:
    summary = summarize(flip_table(*hand_tables()), n_bootstrap=0)
    assert summary["metrics"]["nfr"] == {"value": 0.25, "ci_low": None, "ci_high": None, "n": 8}


def test_bad_arguments_raise() -> None:
    table = flip_table(*hand_tables())
    with pytest.raises(ValueError, match="confidence"):
        summarize(table, confidence=1.5)
    with pytest.raises(ValueError, match="n_bootstrap"):
        summarize(table, n_bootstrap=-1)
    with pytest.raises(FlipInputError, match="out of range"):
        summarize(table, num_classes=1)
    with pytest.raises(ValueError, match="class_names"):
        summarize(table, num_classes=2, class_names=["a"])
    with pytest.raises(ValueError, match="unknown metric"):
        paired_difference(table, table, "accuracy")


def test_format_summary_renders_percentages() -> None:
    text = format_summary(summarize(flip_table(*hand_tables()), n_bootstrap=100))
    lines = text.splitlines()
    nfr_line = next(line for line in lines if line.startswith("NFR "))
    assert "25.00" in nfr_line
    assert nfr_line.rstrip().endswith("8")
    assert "95% CI" in lines[0]
    assert "per class" in text


# --------------------------------------------------------------------------------------------------
# Properties over random flags
# --------------------------------------------------------------------------------------------------


@st.composite
def random_pair(draw: st.DrawFn, all_attacked: bool = False) -> pa.Table:
    """Draw a flip table over random flags (robust implies clean-correct), some rows maybe unattacked."""
    n = draw(st.integers(min_value=1, max_value=60))
    bits = st.lists(st.booleans(), min_size=n, max_size=n)
    c_old, c_new, keep_old, keep_new = draw(bits), draw(bits), draw(bits), draw(bits)
    attacked = [True] * n if all_attacked else draw(bits)
    labels = draw(st.lists(st.integers(min_value=0, max_value=3), min_size=n, max_size=n))
    r_old = [c and k if a else None for c, k, a in zip(c_old, keep_old, attacked, strict=True)]
    r_new = [c and k if a else None for c, k, a in zip(c_new, keep_new, attacked, strict=True)]
    ids = list(range(n))
    return flip_table(model_table(ids, labels, c_old, r_old), model_table(ids, labels, c_new, r_new))


def swap(table: pa.Table) -> pa.Table:
    """Rebuild the flip table of the reversed update from the per-model views of ``table``."""

    def view(prefix: str) -> pa.Table:
        return model_table(
            table.column("sample_id").to_pylist(),
            table.column("label").to_pylist(),
            table.column(f"{prefix}_clean_correct").to_pylist(),
            table.column(f"{prefix}_robust").to_pylist(),
        )

    return flip_table(view("new"), view("old"))


@settings(max_examples=60, deadline=None)
@given(random_pair())
def test_rates_in_unit_interval_and_ci_contains_value(table: pa.Table) -> None:
    summary = summarize(table, n_bootstrap=200, seed=1)
    json.dumps(summary, allow_nan=False)
    for group in [summary["metrics"], *(c["metrics"] for c in summary["per_class"])]:
        for key in RATES:
            entry = group[key]
            if entry["n"] == 0:
                assert entry["value"] is None
                continue
            assert 0.0 <= entry["value"] <= 1.0
            assert 0.0 <= entry["ci_low"] <= entry["ci_high"] <= 1.0
            assert entry["ci_low"] - 1e-12 <= entry["value"] <= entry["ci_high"] + 1e-12
        m = group
        if m["nfr"]["n"]:
            assert m["nfr"]["value"] - m["pfr"]["value"] == pytest.approx(
                m["acc_old"]["value"] - m["acc"]["value"], abs=1e-12
            )
        if m["r_nfr"]["n"]:
            assert m["r_nfr"]["value"] - m["r_pfr"]["value"] == pytest.approx(
                m["rob_acc_old"]["value"] - m["rob_acc"]["value"], abs=1e-12
            )
            assert m["b_nfr"]["value"] <= min(m["r_nfr"]["value"], m["s_nfr"]["value"])


@settings(max_examples=60, deadline=None)
@given(random_pair(all_attacked=True))
def test_s_nfr_identity_when_all_rows_attacked(table: pa.Table) -> None:
    summary = summarize(table, n_bootstrap=20)
    for m in [summary["metrics"], *(c["metrics"] for c in summary["per_class"])]:
        assert m["s_nfr"]["n"] == m["nfr"]["n"]
        expected = m["nfr"]["value"] + m["r_nfr"]["value"] - m["b_nfr"]["value"]
        assert m["s_nfr"]["value"] == pytest.approx(expected, abs=1e-12)


def test_s_nfr_identity_on_one_n_when_fewer_samples_were_attacked() -> None:
    """robust_samples < N: NFR over all rows does not fit S-NFR's N; NFR on the robust set does, and its
    interval is bootstrapped on the same resamples as S-NFR's."""
    ids = list(range(12))
    labels = [i % 3 for i in ids]
    c_old = [True] * 12
    c_new = [False, False, False, False, True, True, True, True, True, True, True, True]  # 4 clean flips
    r_old: list[bool | None] = [None, None, None, True, True, True, False, True, None, None, None, None]
    r_new: list[bool | None] = [None, None, None, False, False, True, True, True, None, None, None, None]
    summary = summarize(flip_table(model_table(ids, labels, c_old, r_old), model_table(ids, labels, c_new, r_new)))
    m = summary["metrics"]
    assert (summary["n_clean"], summary["n_robust"]) == (12, 5)
    assert (m["nfr"]["value"], m["nfr"]["n"]) == (4 / 12, 12)
    sub = m["nfr_robust_subset"]
    assert (sub["value"], sub["n"]) == (1 / 5, 5)  # rows 3..7: only row 3 flips clean
    assert sub["ci_low"] <= sub["value"] <= sub["ci_high"]
    assert m["s_nfr"]["n"] == m["r_nfr"]["n"] == m["b_nfr"]["n"] == sub["n"]
    assert m["s_nfr"]["value"] == pytest.approx(sub["value"] + m["r_nfr"]["value"] - m["b_nfr"]["value"], abs=1e-15)
    assert m["s_nfr"]["value"] != pytest.approx(m["nfr"]["value"] + m["r_nfr"]["value"] - m["b_nfr"]["value"])
    assert "NFR (robust set)" in format_summary(summary)


@settings(max_examples=60, deadline=None)
@given(random_pair())
def test_s_nfr_identity_on_the_robust_set(table: pa.Table) -> None:
    summary = summarize(table, n_bootstrap=20)
    for m in [summary["metrics"], *(c["metrics"] for c in summary["per_class"])]:
        sub = m["nfr_robust_subset"]
        assert sub["n"] == m["s_nfr"]["n"] == m["r_nfr"]["n"]
        if sub["n"]:
            expected = sub["value"] + m["r_nfr"]["value"] - m["b_nfr"]["value"]
            assert m["s_nfr"]["value"] == pytest.approx(expected, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(random_pair())
def test_swapping_old_and_new_swaps_flip_rates(table: pa.Table) -> None:
    forward = values(summarize(table, n_bootstrap=0)["metrics"])
    backward = values(summarize(swap(table), n_bootstrap=0)["metrics"])
    for a, b in [("nfr", "pfr"), ("r_nfr", "r_pfr"), ("acc", "acc_old"), ("rob_acc", "rob_acc_old")]:
        assert forward[a] == backward[b]
        assert forward[b] == backward[a]


# --------------------------------------------------------------------------------------------------
# Bootstrap behaviour
# --------------------------------------------------------------------------------------------------


def coin_table(n: int, seed: int = 0) -> pa.Table:
    """About half the samples flip negatively, the rest stay correct; every sample attacked."""
    rng = np.random.default_rng(seed)
    c_new = rng.random(n) < 0.5
    ids = list(range(n))
    labels = [i % 3 for i in ids]
    return flip_table(
        model_table(ids, labels, [True] * n, [True] * n),
        model_table(ids, labels, c_new.tolist(), c_new.tolist()),
    )


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    table = coin_table(300)
    first = summarize(table, n_bootstrap=300, seed=7)
    assert summarize(table, n_bootstrap=300, seed=7) == first
    other = summarize(table, n_bootstrap=300, seed=8)
    assert other["metrics"]["nfr"]["value"] == first["metrics"]["nfr"]["value"]
    assert (other["metrics"]["nfr"]["ci_low"], other["metrics"]["nfr"]["ci_high"]) != (
        first["metrics"]["nfr"]["ci_low"],
        first["metrics"]["nfr"]["ci_high"],
    )


def test_interval_narrows_with_more_samples() -> None:
    def width(n: int) -> float:
        entry = summarize(coin_table(n), n_bootstrap=500)["metrics"]["nfr"]
        return entry["ci_high"] - entry["ci_low"]

    small, large = width(100), width(10_000)
    assert large < small / 5  # the width shrinks like 1/sqrt(N): ratio about 10
    assert small == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 100), rel=0.25)


def test_blocked_index_draws_give_a_valid_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    table = coin_table(1000)
    unblocked = summarize(table, n_bootstrap=400)["metrics"]["nfr"]
    monkeypatch.setattr(flips.bootstrap, "_MAX_BLOCK_ELEMENTS", 3001)  # 3 resamples per block, ragged last block
    blocked = summarize(table, n_bootstrap=400)["metrics"]["nfr"]
    assert summarize(table, n_bootstrap=400)["metrics"]["nfr"] == blocked
    assert blocked["value"] == unblocked["value"]
    assert blocked["ci_low"] == pytest.approx(unblocked["ci_low"], abs=0.02)
    assert blocked["ci_high"] == pytest.approx(unblocked["ci_high"], abs=0.02)


def test_ten_thousand_rows_ten_classes_summarises_every_class() -> None:
    rng = np.random.default_rng(0)
    n = 10_000
    c_old, c_new = rng.random(n) < 0.8, rng.random(n) < 0.85
    r_old, r_new = c_old & (rng.random(n) < 0.6), c_new & (rng.random(n) < 0.6)
    ids, labels = list(range(n)), (np.arange(n) % 10).tolist()
    table = flip_table(
        model_table(ids, labels, c_old.tolist(), r_old.tolist()),
        model_table(ids, labels, c_new.tolist(), r_new.tolist()),
    )
    summary = summarize(table, n_bootstrap=1000, num_classes=10)
    assert len(summary["per_class"]) == 10
    assert sum(c["n_clean"] for c in summary["per_class"]) == n
    overall = summary["metrics"]["nfr"]["value"]
    assert overall == pytest.approx(float(np.mean(c_old & ~c_new)))


# --------------------------------------------------------------------------------------------------
# paired_difference
# --------------------------------------------------------------------------------------------------


def test_paired_difference_of_identical_tables_is_zero() -> None:
    table = coin_table(500)
    for metric in METRICS:
        result = paired_difference(table, table, metric, n_bootstrap=200)
        assert result == {"metric": metric, "value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 500}


def test_paired_difference_detects_more_negative_flips() -> None:
    n = 200
    ids, labels = list(range(n)), [i % 2 for i in range(n)]
    old = model_table(ids, labels, [True] * n, [True] * n)
    wrong_a = [i < 40 for i in range(n)]  # a flips 40 samples
    wrong_b = [i < 10 for i in range(n)]  # b flips 10 of those
    new_a = model_table(ids, labels, [not w for w in wrong_a], [not w for w in wrong_a])
    new_b = model_table(ids, labels, [not w for w in wrong_b], [not w for w in wrong_b])
    flips_a, flips_b = flip_table(old, new_a), flip_table(old, new_b)
    result = paired_difference(flips_a, flips_b, "nfr", n_bootstrap=1000, seed=0)
    assert result["value"] == pytest.approx(0.15)
    assert 0.0 < result["ci_low"] < 0.15 < result["ci_high"]
    reverse = paired_difference(flips_b, flips_a, "r_nfr")
    assert reverse["value"] == pytest.approx(-0.15)
    assert reverse["ci_high"] < 0.0
    # Pairing matters: the paired interval is much narrower than the two marginal ones combined.
    marginal = summarize(flips_a)["metrics"]["nfr"]
    assert result["ci_high"] - result["ci_low"] < marginal["ci_high"] - marginal["ci_low"]
    assert paired_difference(flips_a, flips_b, "nfr", seed=0) == result


def test_paired_difference_robust_set_is_the_intersection_and_ids_must_match() -> None:
    ids, labels = list(range(6)), [0] * 6
    old = model_table(ids, labels, [True] * 6, [True] * 6)
    new_a = model_table(ids, labels, [True] * 6, [False, True, True, True, None, None])
    new_b = model_table(ids, labels, [True] * 6, [None, True, True, False, True, True])
    result = paired_difference(flip_table(old, new_a), flip_table(old, new_b), "r_nfr", n_bootstrap=50)
    assert result["n"] == 3  # samples 1, 2, 3
    assert result["value"] == pytest.approx(0 / 3 - 1 / 3)
    other = flip_table(old.slice(0, 5), new_a.slice(0, 5))
    with pytest.raises(FlipInputError, match="only in flips_a"):
        paired_difference(flip_table(old, new_a), other, "nfr")


def test_near_flips_are_both_robust_samples_close_to_breaking() -> None:
    """A near-flip: old and new both withstand the attack, but the new model's lowest margin under attack is
    below the threshold. Its rate is over the samples attacked for both models, as R-NFR's."""
    ids, labels = list(range(6)), [0, 1, 0, 1, 0, 1]
    old = model_table(ids, labels, [True] * 6, [True, True, True, True, False, None])
    new = model_table(ids, labels, [True] * 6, [True, True, True, False, True, None])
    low = pa.array([0.2, 0.7, 0.49, -0.3, 0.1, None], pa.float32())
    flips = flip_table(*(t.drop_columns(["min_margin"]).append_column("min_margin", low) for t in (old, new)))
    assert flips.column("new_min_margin").to_pylist()[:2] == pytest.approx([0.2, 0.7])
    summary = summarize(flips, n_bootstrap=200)
    near = summary["metrics"]["near_flip"]
    assert (near["value"], near["n"], summary["near_margin"]) == (2 / 5, 5, 0.5)  # rows 0 and 2
    assert near["ci_low"] <= near["value"] <= near["ci_high"]
    assert summarize(flips, n_bootstrap=0, near_margin=0.25)["metrics"]["near_flip"]["value"] == 1 / 5
    # the other metrics do not depend on the margins, intervals included
    plain = summarize(flip_table(old, new), n_bootstrap=200)
    for key in METRICS:
        if key != "near_flip":
            assert summary["metrics"][key] == plain["metrics"][key]
