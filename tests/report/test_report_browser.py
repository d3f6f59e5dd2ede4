"""The three report pages opened in a real browser: headless Chromium from the Debian package ``chromium``,
driven by Playwright with that executable (no browser download). On each page every image loads, every
table is visible and the console stays free of errors.

The pages are built from the real store of test_report (digits, two trained MLPs, real attacks): the flip
report as is, the nightly page over three real comparisons as nights, the sweep page from those comparisons
as its trials and tables (no Tune run). With ``RCAT_RAY_SCREENSHOTS=<folder>`` a screenshot of each page is
written there (``make screenshots`` refreshes ``docs/report-*.png``).
"""

from __future__ import annotations

import os
import shutil
import types
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from rcat_ray.config import BootstrapConfig, parse_config
from rcat_ray.evaluate.comparison import Comparison, compare_stored
from rcat_ray.evaluate.paper_table import TableRow, build_pair_table
from rcat_ray.nightly.config import NightlyConfig
from rcat_ray.nightly.gates import judge
from rcat_ray.nightly.history import append_night, read_history_checked
from rcat_ray.nightly.report import write_nightly_report
from rcat_ray.report.flip_report import write_report
from rcat_ray.store.result_store import ResultStore
from rcat_ray.sweep.choice import choose_trial, pareto_front
from rcat_ray.sweep.config import SweepConfig
from rcat_ray.sweep.report import write_sweep_outputs
from tests.report.test_report import _build_store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium executable on PATH: install the Debian package chromium (make test does)",
)
SCREENSHOTS = os.environ.get("RCAT_RAY_SCREENSHOTS")
METRICS = ("acc", "rob_acc", "nfr", "r_nfr", "s_nfr")


@pytest.fixture(scope="module")
def comparisons(tmp_path_factory: pytest.TempPathFactory) -> tuple[ResultStore, dict[str, Comparison]]:
    """The store of test_report (one torch thread, as there) and three comparisons against its old model's
    table: new (the update), old itself (no flips) and the reversed pair (clean flips)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        store, update = _build_store(tmp_path_factory.mktemp("browser") / "store")
    finally:
        torch.set_num_threads(threads)
    boot = BootstrapConfig(n_resamples=100)
    same = compare_stored(store, update.old["key"], update.old["key"], boot)
    reverse = compare_stored(store, update.new["key"], update.old["key"], boot)
    return store, {"update": update, "same": same, "reverse": reverse}


@pytest.fixture(scope="module")
def browser() -> Any:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


def assert_page_renders(browser: Any, page_path: Path, screenshot: str | None = None) -> None:
    """Open ``page_path`` in the browser: every image decoded, every table visible, no console error."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"{r.url}: {r.failure}"))
    try:
        page.goto(page_path.as_uri(), wait_until="load")
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.naturalWidth])")
        assert images, f"{page_path} shows no image"
        assert [src for src, width in images if not width] == [], f"images that did not load in {page_path}"
        tables = page.locator("table")
        assert tables.count() > 0, f"{page_path} has no table"
        hidden = [i for i in range(tables.count()) if not tables.nth(i).is_visible()]
        assert hidden == [], f"tables not visible in {page_path}"
        assert errors == [], f"console errors in {page_path}"
        if SCREENSHOTS and screenshot:
            Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(SCREENSHOTS) / screenshot), full_page=True)
    finally:
        page.close()


def test_comparison_report_in_the_browser(comparisons, browser, tmp_path: Path) -> None:
    store, c = comparisons
    path = write_report(store, c["update"].key, tmp_path / "report", top_k=3)
    assert_page_renders(browser, path, "report-comparison.png")


def _night(c: Comparison, date: str, verdict: dict[str, Any]) -> dict[str, Any]:
    """A history row as the nightly run appends it, from a real comparison."""
    metrics = c.summary["metrics"]
    return {
        "run_id": f"run-{date}",
        "timestamp": f"{date}T02:30:00",
        "pair": "digits",
        "verdict": "pass" if verdict["passed"] else "fail",
        "comparison": c.key,
        **{f"{m}_{part}": metrics[m][part] for m in METRICS for part in ("value", "ci_low", "ci_high")},
    }


def test_nightly_report_in_the_browser(comparisons, browser, tmp_path: Path) -> None:
    store, c = comparisons
    model = {"source": "builtin", "name": "mlp"}
    cfg = NightlyConfig(
        pair="digits",
        baseline=model,
        candidate=model,
        attack={"eps": 0.1},
        data={"name": "digits"},
        history=str(tmp_path / "history"),
        out=str(tmp_path / "out"),
        gates={"max_nfr": 0.05, "max_r_nfr": 0.1, "per_class": [{"class": 3, "max_nfr": 0.2}]},
    )
    verdict = {}
    for date, which in (("2026-11-20", "same"), ("2026-11-21", "reverse"), ("2026-11-22", "update")):
        verdict = judge(c[which].summary, cfg.gates)
        append_night(cfg.history, date, _night(c[which], date, verdict))
    history, skipped = read_history_checked(cfg.history)
    fingerprints = {side: c["update"].summary[side]["fingerprint"] for side in ("old", "new")}
    side = {"name": "old", "fingerprint": fingerprints["old"], "chunks_computed": 0, "chunks_reused": 2}
    verdict = {
        **verdict,
        "date": "2026-11-22",
        "comparison": c["update"].key,
        "baseline": side,
        "candidate": {**side, "name": "new", "fingerprint": fingerprints["new"]},
    }
    path = write_nightly_report(cfg, history, verdict, store, tmp_path / "out", skipped)
    assert (path.parent / "flips" / "report.html").is_file()
    assert_page_renders(browser, path, "report-nightly.png")


def _trial(trial_id: str, alpha: float, beta: float, c: Comparison) -> dict[str, Any]:
    """A trial row with its choice metrics (val_*) and last per-epoch metrics from a real comparison."""
    settings = {"kind": "rcat", "alpha": alpha, "beta": beta, "lr": 0.01, "epochs": 2, "epochs_run": 2}
    row: dict[str, Any] = {"trial_id": trial_id, **settings, "judged": True}
    for m in METRICS:
        entry = c.summary["metrics"][m]
        row[f"val_{m}"] = row[f"epoch_val_{m}"] = entry["value"]
        row |= {f"val_{m}_ci_low": entry["ci_low"], f"val_{m}_ci_high": entry["ci_high"], f"val_{m}_n": entry["n"]}
    return row


def test_sweep_report_in_the_browser(comparisons, browser, tmp_path: Path) -> None:
    _, c = comparisons
    mlp = {"source": "builtin", "name": "mlp"}
    base = {"old": mlp, "new": mlp, "data": {"name": "digits", "split": "train"}, "train_attack": {"eps": 0.1}}
    cfg = parse_config(SweepConfig, {"base": base, "name": "digits", "out": str(tmp_path / "sweep")})
    trials = pd.DataFrame([_trial("t0", 0.5, 0.5, c["update"]), _trial("t1", 1.0, 0.0, c["same"])])
    new = c["update"].summary["metrics"]
    chosen = choose_trial(trials, new_rob_acc=new["rob_acc"]["value"], tolerance=1.0)
    trials = trials.assign(
        pareto_r_nfr=pareto_front(trials, maximise="val_rob_acc", minimise="val_r_nfr"),
        pareto_s_nfr=pareto_front(trials, maximise="val_rob_acc", minimise="val_s_nfr"),
        chosen=trials["trial_id"] == chosen["trial_id"],
    )
    rows = [
        TableRow("old", c["same"].summary, c["same"].flips, is_old=True),
        TableRow("new", c["update"].summary, c["update"].flips),
        TableRow("RCAT(0.5,0.5) trial t0", c["update"].summary, c["update"].flips),
        TableRow("RCAT(1,0) trial t1", c["same"].summary, c["same"].flips),
    ]
    chosen_label = {"t0": rows[2].label, "t1": rows[3].label}[chosen["trial_id"]]  # as sweep/run.py: the choice
    table = build_pair_table("digits, choice validation", rows, reference=chosen_label, n_bootstrap=50)
    validation = types.SimpleNamespace(
        source="choice", new=new, describe=lambda: "choice validation: APGD-CE, on N = 40 samples"
    )
    outcome = types.SimpleNamespace(
        out=tmp_path / "sweep",
        trials=trials,
        chosen=chosen,
        new_val_rob_acc=new["rob_acc"]["value"],
        validation=validation,
        validation_table=table,
        table=table,
        checkpoint=tmp_path / "sweep" / f"{chosen['trial_id']}.pt",
    )
    outcome.out.mkdir()
    path = write_sweep_outputs(cfg, outcome)
    text = path.read_text(encoding="utf-8")
    assert f"Paired differences, {chosen_label} minus each row" in text and "**" not in text
    assert_page_renders(browser, path, "report-sweep.png")
