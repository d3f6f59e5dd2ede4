"""Confirmed robustness flips: each flip re-checked by a stronger attack, stored beside the comparison, reused."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from rcat_ray.config import AttackConfig, BootstrapConfig, ComputeConfig, DataConfig
from rcat_ray.core.flips.confirmed import flip_ids
from rcat_ray.errors import ConfigError
from rcat_ray.evaluate.config import CompareConfig, TableConfig
from rcat_ray.evaluate.confirm import ConfirmPlan, stronger_attack
from rcat_ray.evaluate.run import run_compare, run_table

pytestmark = pytest.mark.ray

WEAK = AttackConfig(eps=0.15, n_iter=2, attacks=("apgd-ce",))
STRONG = AttackConfig(eps=0.15, n_iter=25, n_restarts=2, attacks=("apgd-ce", "apgd-dlr"))


def _cfg(store, **kw) -> CompareConfig:
    return CompareConfig(
        data=DataConfig(name="digits", split="test", limit=200),
        attack=WEAK,
        chunk_size=100,
        store=str(store),
        compute=ComputeConfig(num_workers=1, cpus_per_worker=1, threads_per_worker=1),
        old={"source": "builtin", "name": "mlp"},
        new={"source": "builtin", "name": "mlp"},
        bootstrap=BootstrapConfig(n_resamples=100),
        confirm=True,
        confirm_attack=STRONG,
        **kw,
    )


def test_flips_are_rechecked_by_the_stronger_attack_and_stored(ray_session, digits_models, tmp_path):
    old, new = digits_models
    _, comparison, prepared = run_compare(_cfg(tmp_path), old=old, new=new)
    rec = comparison.confirmed
    plain = comparison.summary["metrics"]
    ids = flip_ids(comparison.flips)
    n = plain["r_nfr"]["n"]
    assert rec["r_nfr_flips"] == len(ids["old"]) == round(plain["r_nfr"]["value"] * n)
    assert rec["r_pfr_flips"] == len(ids["new"])
    assert rec["re_attacked"] == {"old": len(ids["old"]), "new": len(ids["new"])}  # the flips only, not N
    assert rec["r_nfr_confirmed"]["value"] == pytest.approx((rec["r_nfr_flips"] - rec["r_nfr_dissolved"]) / n)
    assert rec["r_nfr_confirmed"]["value"] <= plain["r_nfr"]["value"]
    assert rec["r_nfr_dissolved"] > 0, "2 APGD iterations against 25 x 2 restarts must dissolve a flip"
    # each side's rows are exactly its flips; a dissolved flip is one the stronger attack broke the old model on
    plan = ConfirmPlan(comparison.key, STRONG)
    old_rows = pq.read_table(tmp_path / plan.side_path("old")).to_pandas()
    assert sorted(old_rows.sample_id) == ids["old"]
    assert int((~old_rows.robust.astype(bool)).sum()) == rec["r_nfr_dissolved"]
    assert sorted(pq.read_table(tmp_path / plan.side_path("new")).to_pandas().sample_id) == ids["new"]

    # the report shows the confirmed rates beside the plain ones
    from rcat_ray.report.flip_report import write_report

    text = write_report(prepared.store, comparison.key, tmp_path / "report").read_text(encoding="utf-8")
    assert "Confirmed robustness flips (apgd-ce → apgd-dlr, 25 iterations, 2 restart(s))" in text
    assert f'<td class="num">{rec["r_nfr_dissolved"]}</td>' in text

    # stored: a second run re-attacks nothing; with one side gone, only that side
    _, again, _ = run_compare(_cfg(tmp_path), old=old, new=new)
    assert again.confirmed["re_attacked"] == {} and again.confirmed["r_nfr_confirmed"] == rec["r_nfr_confirmed"]
    (tmp_path / plan.side_manifest("new")).unlink()
    _, resumed, _ = run_compare(_cfg(tmp_path), old=old, new=new)
    assert resumed.confirmed["re_attacked"] == {"new": len(ids["new"])}
    assert resumed.confirmed["r_pfr_confirmed"] == rec["r_pfr_confirmed"]


def test_the_confirming_attack_keeps_the_threat_model():
    assert stronger_attack(WEAK, None).cascade == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert stronger_attack(WEAK, None).n_restarts == 5 and stronger_attack(WEAK, None).eps == WEAK.eps
    with pytest.raises(ConfigError, match="threat model"):
        stronger_attack(WEAK, AttackConfig(eps=0.3))


def test_a_table_with_confirm_shows_r_nfr_confirmed(ray_session, digits_checkpoints, tmp_path):
    def ckpt(name: str) -> dict:
        return {"source": "checkpoint", "path": str(digits_checkpoints[name])}

    cfg = TableConfig(
        data=DataConfig(name="digits", split="test", limit=200),
        attack=WEAK,
        chunk_size=100,
        store=str(tmp_path / "store"),
        compute=ComputeConfig(num_workers=1, cpus_per_worker=1, threads_per_worker=1),
        bootstrap=BootstrapConfig(n_resamples=50),
        confirm=True,
        confirm_attack=STRONG,
        out=str(tmp_path / "table"),
        pairs=(
            {
                "name": "digits",
                "old": ckpt("old"),
                "new": ckpt("new"),
                "finetuned": ({"label": "RCAT(untrained)", "model": {"source": "builtin", "name": "mlp", "seed": 3}},),
            },
        ),
    )
    (table,) = run_table(cfg)
    markdown = (tmp_path / "table" / "table.md").read_text()
    assert "| R-NFR confirmed |" in markdown
    for row in table.rows[1:]:
        m = row.summary["metrics"]
        assert m["r_nfr_confirmed"]["value"] <= m["r_nfr"]["value"] and m["r_nfr_confirmed"]["n"] == m["r_nfr"]["n"]
    assert "r_nfr_confirmed" not in table.rows[0].summary["metrics"]  # old against itself: no flips
