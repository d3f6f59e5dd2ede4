"""`rcat-ray study` end to end on digits: the paper's rule picks the pairs, a Tune sweep per pair chooses each
method's weights on validation, every choice is fine-tuned per seed and tested, one table over the pairs; a
rerun reuses everything."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import yaml

from rcat_ray.config import parse_config
from rcat_ray.errors import ConfigError
from rcat_ray.study.config import StudyConfig
from rcat_ray.study.pairs import admitted_pairs


def test_the_paper_rule_admits_pairs_better_on_both_accuracies() -> None:
    acc = {
        "a": {"acc": 0.80, "rob_acc": 0.40},
        "b": {"acc": 0.85, "rob_acc": 0.45},
        "c": {"acc": 0.90, "rob_acc": 0.42},  # cleaner than b but less robust
        "d": {"acc": 0.85, "rob_acc": 0.50},  # as clean as b: not strictly better
    }
    assert [p.name for p in admitted_pairs(acc)] == ["a -> b", "a -> c", "a -> d"]


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"pairs": [{"old": "m0", "new": "zz"}]}, "no model named 'zz'"),
        ({"pairs": [{"old": "m0", "new": "m0"}]}, "with itself"),
        ({"pairs": [{"old": "m0", "new": "m1"}, {"old": "m0", "new": "m1"}]}, "listed twice"),
        ({"methods": ["at", "pct"]}, "must include rcat"),
        ({"rcat_grid": [[0.9, 0.4]]}, "alpha \\+ beta <= 1"),
        ({"seeds": [0, 0]}, "seeds are listed twice"),
    ],
)
def test_bad_study_configs_are_refused_when_read(study_raw, over, match) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(StudyConfig, study_raw(**over))


def test_cli_refuses_a_bad_study_before_any_compute(study_yaml, tmp_path, no_compute, capsys) -> None:
    from rcat_ray.cli import main

    path = study_yaml(test={"data": {"name": "digits", "split": "test", "limit": 100_000}, "attack": {"eps": 0.1}})
    assert main(["study", "--config", str(path)]) == 2
    assert "test.data.limit is 100000" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_study_runs_the_protocol_over_the_admitted_pairs_and_a_rerun_reuses_it(ray_session, study_yaml, tmp_path):
    from rcat_ray.study.run import run_study

    cfg = parse_config(StudyConfig, yaml.safe_load(study_yaml().read_text()))
    outcome = run_study(cfg)
    out = tmp_path / "out"

    # the rule, read from the stored validation: every admitted pair is better on both accuracies
    acc = outcome.accuracy
    names = [p.name for p in outcome.pairs]
    assert names == [p.name for p in admitted_pairs(acc)] and names, acc
    for p in outcome.pairs:
        assert acc[p.new]["acc"] > acc[p.old]["acc"] and acc[p.new]["rob_acc"] > acc[p.old]["rob_acc"]

    # one row block per pair: old, new, AT, RCAT; values per seed match the per-seed tables' CSV
    csv = pd.read_csv(out / "study.csv")
    per_seed = pd.read_csv(out / "tables" / "table.csv")
    for r in outcome.results:
        assert list(r.roles) == ["old", "new", "at", "rcat"] and r.roles["rcat"] == "RCAT(0.5,0.4)"
        for seed in cfg.seeds:
            table = per_seed[(per_seed["pair"] == f"{r.name}, seed {seed}") & (per_seed["kind"] == "value")]
            for role, label in r.roles.items():
                for title, v in r.values[role].items():
                    want = table[(table["model"] == label) & (table["column"] == title)]["value"].item()
                    rows = csv[(csv["pair"] == r.name) & (csv["kind"] == "value") & (csv["seed"] == str(seed))]
                    got = rows[(rows["model"] == label) & (rows["column"] == title)]["value"].item()
                    assert got == pytest.approx(want) and v["per_seed"][cfg.seeds.index(seed)] == pytest.approx(want)
        d = r.differences["at"]["R-NFR"]
        assert d["value"] == pytest.approx(sum(d["per_seed"]) / len(d["per_seed"]))
        assert d["ci_low"] <= d["value"] <= d["ci_high"]
        chosen = r.chosen["rcat"]
        assert (chosen["alpha"], chosen["beta"]) == (0.5, 0.4)
    for name in ("study.md", "study.tex", "study.csv", "study.json", "differences.png", "report.html", "manifest.json"):
        assert (out / name).stat().st_size > 0, name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["name"] == "digits-study" and manifest["versions"]["torch"]
    assert set(manifest["fingerprints"]) >= {p.old for p in outcome.pairs} | {p.new for p in outcome.pairs}
    md = (out / "study.md").read_text()  # the table over pairs, then each pair and seed as a paper table
    assert all(f"### {p.name}, seed {s}" in md for p in outcome.pairs for s in cfg.seeds)
    tex = (out / "study.tex").read_text()  # the results and RCAT's differences, pairs named with an arrow
    assert tex.count(r"\begin{tabular}") == 2 and r"m0 $\rightarrow$ m1" in tex and "->" not in tex
    html = (out / "report.html").read_text()
    assert all(p.name.replace(">", "&gt;") in html for p in outcome.pairs)

    # a rerun: no trial, fine-tune or chunk is computed again, and the table is the same
    def stamps() -> dict[str, object]:
        """Trials by their results (restoring a finished Tune run rewrites the same files), the rest by mtime."""
        trials = {str(p): p.read_bytes() for p in (tmp_path / "ray_results").rglob("result.json")}
        files = [*(out / "finetuned").glob("*.pt"), *(tmp_path / "store").rglob("*.parquet")]
        return {**trials, **{str(p): os.stat(p).st_mtime_ns for p in files}}

    before, table = stamps(), (out / "study.csv").read_text()
    assert sum("result.json" in k for k in before) == 2 * len(outcome.pairs)
    again = run_study(cfg)
    assert stamps() == before
    assert (out / "study.csv").read_text() == table
    assert [p.name for p in again.pairs] == names


@pytest.mark.ray
@pytest.mark.slow
def test_an_interrupted_study_resumes_where_it_stopped(ray_session, study_yaml, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from rcat_ray.study.run import run_study

    pairs = [{"old": "m0", "new": "m1"}, {"old": "m0", "new": "m2"}]
    config = study_yaml(pairs=pairs)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rcat_ray.cli", "study", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    finetuned = tmp_path / "out" / "finetuned"
    deadline = time.monotonic() + 300
    try:  # Ctrl+C once the first pair's choices are being fine-tuned
        while len(list(finetuned.glob("*.pt"))) < 2:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no final fine-tune finished in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "run the same command again to resume" in out
    assert not (tmp_path / "out" / "study.md").exists()  # nothing claims to be the study's table
    done = {p: p.stat().st_mtime_ns for p in finetuned.glob("*.pt")}
    trials = {p: p.read_bytes() for p in (tmp_path / "ray_results").rglob("result.json")}
    assert len(done) >= 2 and len(trials) >= 2

    outcome = run_study(parse_config(StudyConfig, yaml.safe_load(config.read_text())))
    assert [p.name for p in outcome.pairs] == ["m0 -> m1", "m0 -> m2"]
    assert all(p.stat().st_mtime_ns == t for p, t in done.items()), "a finished fine-tune was trained again"
    assert all(p.read_bytes() == b for p, b in trials.items()), "a finished trial was run again"
    assert len(list(finetuned.glob("*.pt"))) == 2 * 2 * 2  # pairs x methods x seeds
