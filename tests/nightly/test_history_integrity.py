"""A damaged night of the nightly history is named (with its file and error) in the trends and the report,
never silently dropped: real Parquet files on a local folder, no Ray."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rcat_ray.nightly.config import NightlyConfig
from rcat_ray.nightly.history import append_night, read_history, read_history_checked
from rcat_ray.nightly.report import write_nightly_report
from rcat_ray.report import flip_report as report_mod
from rcat_ray.store.result_store import ResultStore

NIGHTS = ("2026-11-20", "2026-11-21", "2026-11-22", "2026-11-23")


def _history(root: Path) -> dict[str, Path]:
    paths = {}
    for i, date in enumerate(NIGHTS):
        row = {"run_id": f"run-{i}", "timestamp": f"{date}T02:30:00", "pair": "p", "verdict": "pass"}
        row |= {"nfr_value": 0.01 * (i + 1), "nfr_ci_low": 0.0, "nfr_ci_high": 0.05}
        paths[date] = Path(append_night(str(root), date, row))
    return paths


def test_a_damaged_night_is_named_with_its_error(tmp_path, caplog):
    root = tmp_path / "history"
    paths = _history(root)
    truncated, garbage = paths["2026-11-21"], paths["2026-11-23"]
    truncated.write_bytes(truncated.read_bytes()[:-20])
    garbage.write_bytes(b"not a parquet file at all")
    (paths["2026-11-22"].parent / ".tmp-0123-run-9.parquet").write_bytes(b"a write in flight")  # not a night yet
    caplog.set_level(logging.WARNING, logger="rcat_ray")
    df, skipped = read_history_checked(str(root))
    assert df["run_id"].tolist() == ["run-0", "run-2"] and df["date"].tolist() == ["2026-11-20", "2026-11-22"]
    assert [(s["date"], s["path"]) for s in skipped] == [("2026-11-21", str(truncated)), ("2026-11-23", str(garbage))]
    assert all(s["error"] for s in skipped)
    for s in skipped:
        assert s["date"] in caplog.text and s["path"] in caplog.text
    assert read_history(str(root)).equals(df)


def test_a_night_whose_columns_do_not_fit_is_named(tmp_path):
    """A file that reads but whose column has another type would stop the whole history: it is one night."""
    import pyarrow as pa

    root = tmp_path / "history"
    _history(root)
    bad = pa.table({"run_id": ["x"], "n_clean": ["many"]})  # n_clean is int64 in the history
    ResultStore(str(root)).put_table("date=2026-11-24/x.parquet", bad)
    df, skipped = read_history_checked(str(root))
    assert len(df) == len(NIGHTS) and [s["date"] for s in skipped] == ["2026-11-24"]


def test_the_nightly_report_shows_the_missing_nights(tmp_path, monkeypatch):
    root = tmp_path / "history"
    paths = _history(root)
    paths["2026-11-22"].write_bytes(paths["2026-11-22"].read_bytes()[:100])
    history, skipped = read_history_checked(str(root))

    def flips_report(store, key, out, **kwargs):  # tonight's flip report is not what this test is about
        Path(out).mkdir(parents=True, exist_ok=True)
        return Path(out) / "report.html"

    monkeypatch.setattr(report_mod, "write_report", flips_report)
    model = {"source": "builtin", "name": "mlp"}
    cfg = NightlyConfig(
        pair="p",
        baseline=model,
        candidate=model,
        attack={"eps": 0.1},
        data={"name": "digits"},
        history=str(root),
        out=str(tmp_path / "out"),
    )
    side = {"name": "m", "fingerprint": "f", "chunks_computed": 0, "chunks_reused": 1}
    verdict = {"passed": True, "failing": [], "gates": [], "date": "2026-11-24", "comparison": "c"}
    verdict |= {"baseline": side, "candidate": side}
    out = tmp_path / "out"
    page = write_nightly_report(cfg, history, verdict, ResultStore(tmp_path / "store"), out, skipped).read_text()
    assert "1 night(s) missing from the trends" in page
    assert "2026-11-22" in page and str(paths["2026-11-22"]) in page and skipped[0]["error"][:20] in page
    assert (out / "trends.png").stat().st_size > 0
    clean = write_nightly_report(cfg, history, verdict, ResultStore(tmp_path / "store"), tmp_path / "o2").read_text()
    assert "missing from the trends" not in clean


@pytest.mark.parametrize("path", ["date=2026-11-20/a.parquet", "a.parquet"])
def test_night_date_from_its_folder(path):
    from rcat_ray.nightly.history import _night_date

    assert _night_date(f"/h/{path}") == ("2026-11-20" if "date=" in path else "?")
