"""The paper-style table: values, best per column, paired differences of RCAT, and the three formats."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from rcat_ray.core.flips import flip_table, summarize
from rcat_ray.evaluate.paper_table import TableRow, build_pair_table, latex_escape, to_csv, to_latex, to_markdown
from tests.core.test_flips import model_table

N = 400


def _flags(rng, p_clean, p_robust):
    c = rng.random(N) < p_clean
    r = c & (rng.random(N) < p_robust)
    return c, r


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    ids, labels = list(range(N)), (np.arange(N) % 10).tolist()
    c_old, r_old = _flags(rng, 0.8, 0.6)
    old = model_table(ids, labels, c_old.tolist(), r_old.tolist())
    # "new": better on average, but flips many of the old model's robust samples
    c_new, r_new = _flags(rng, 0.85, 0.65)
    # "RCAT": the new model, but keeping the old model's robust samples robust
    c_rcat, r_rcat = c_new | r_old, r_new | r_old
    models = {
        "old": old,
        "new": model_table(ids, labels, c_new.tolist(), r_new.tolist()),
        "RCAT(0.5,0.4)": model_table(ids, labels, c_rcat.tolist(), r_rcat.tolist()),
    }
    rows = []
    for label, table in models.items():
        flips = flip_table(old, table)
        rows.append(TableRow(label, summarize(flips, n_bootstrap=200), flips, is_old=label == "old"))
    return build_pair_table("toy", rows, n_bootstrap=200), (c_old, r_old, c_new, r_new, c_rcat, r_rcat)


def test_reference_is_rcat_and_differences_are_paired(pair):
    table, (_c_old, r_old, c_new, r_new, c_rcat, _r_rcat) = pair
    assert table.reference == "RCAT(0.5,0.4)"
    by = {(d["minus"], d["column"]): d for d in table.differences}
    r_nfr_new = np.mean(r_old & ~r_new)
    assert by[("new", "R-NFR")]["value"] == pytest.approx(0.0 - r_nfr_new)
    assert by[("new", "R-NFR")]["ci_high"] < 0  # RCAT removes every robust flip: CI excludes 0
    err = by[("new", "clean error")]
    assert err["value"] == pytest.approx((1 - c_rcat.mean()) - (1 - c_new.mean()))
    assert err["ci_low"] <= err["value"] <= err["ci_high"]
    assert ("old", "NFR") not in by and ("old", "clean error") in by


def test_markdown_marks_the_best_and_prints_differences(pair):
    table, _ = pair
    md = to_markdown([table])
    rcat_line = next(line for line in md.splitlines() if line.startswith("| RCAT"))
    assert "**0.00" in rcat_line  # zero R-NFR is the best of its column
    assert "Paired differences, RCAT(0.5,0.4) minus each row" in md
    assert "*" in md.split("Paired differences")[1]


def test_latex_and_csv(pair):
    table, _ = pair
    tex = to_latex([table])
    assert r"\begin{tabular}" in tex and r"\textbf{" in tex and "&" in tex
    rows = list(csv.DictReader(io.StringIO(to_csv([table]))))
    kinds = {r["kind"] for r in rows}
    assert kinds == {"value", "difference"}
    nfr_new = next(r for r in rows if r["kind"] == "value" and r["model"] == "new" and r["column"] == "NFR")
    assert float(nfr_new["value"]) == pytest.approx(table.rows[1].summary["metrics"]["nfr"]["value"])


def test_latex_escapes_what_latex_would_misprint():
    assert latex_escape("Rice2020_Overfitting -> Hendrycks2019: 5% & #1") == (
        r"Rice2020\_Overfitting $\rightarrow$ Hendrycks2019: 5\% \& \#1"
    )
    assert latex_escape("a<b>c") == r"a\textless{}b\textgreater{}c"  # bare < and > print as other glyphs
