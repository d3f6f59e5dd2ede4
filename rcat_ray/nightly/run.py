"""The nightly robustness-regression gate: tonight's candidate against the production (baseline) model.

The baseline's per-model table comes from the result store whenever its weights and the evaluation
settings are unchanged, so a normal night attacks only the candidate. The comparison is judged against
the gates (:mod:`rcat_ray.nightly.gates`); the verdict is written as JSON, appended to the history, sent to the
notifier, and returned as the exit code: 0 pass, 1 a gate failed, 2 the night could not run. A night
that cannot run leaves the history untouched.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rcat_ray.config import ModelConfig
from rcat_ray.core.atomic import write_file_atomic
from rcat_ray.core.attack_checks import describe_flags
from rcat_ray.errors import NightlyError
from rcat_ray.nightly.config import NightlyConfig
from rcat_ray.nightly.gates import GATE_METRICS, judge
from rcat_ray.nightly.history import append_night, read_history_checked
from rcat_ray.nightly.notify import deliver, make_notifier
from rcat_ray.store.result_store import now_iso

EXIT_PASS, EXIT_GATE_FAILED, EXIT_COULD_NOT_RUN = 0, 1, 2


@dataclass
class NightOutcome:
    verdict: dict[str, Any]
    exit_code: int
    verdict_path: Path
    report: Path | None


def newest_checkpoint(folder: str) -> ModelConfig:
    """The most recently written ``*.pt`` in a folder (ties: the later name), as a model source."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise NightlyError(f"candidate_dir {path} does not exist")
    files = [p for p in path.glob("*.pt") if p.is_file()]
    if not files:
        raise NightlyError(f"candidate_dir {path} holds no *.pt checkpoint")
    newest = max(files, key=lambda p: (p.stat().st_mtime_ns, p.name))
    return ModelConfig(source="checkpoint", name=newest.stem, label=f"candidate ({newest.name})", path=str(newest))


def _candidate(cfg: NightlyConfig) -> ModelConfig:
    if cfg.candidate is not None:
        if cfg.candidate.source == "checkpoint" and not Path(cfg.candidate.path or "").expanduser().is_file():
            raise NightlyError(f"candidate checkpoint not found: {cfg.candidate.path}")
        return cfg.candidate
    return newest_checkpoint(cfg.candidate_dir or "")


def _refuse_flagged(candidate: Any, cfg: NightlyConfig) -> None:
    """A candidate whose evaluation AutoAttack's checks distrust cannot be judged on it (unless accepted)."""
    flags = (candidate.sanity or {}).get("flags", [])
    refused = [f for f in flags if f not in cfg.gates.accept_flags]
    if refused:
        raise NightlyError(
            f"could not judge: the candidate's evaluation raised {describe_flags(candidate.sanity)}, so its robust "
            f"flags cannot be trusted; fix the model or the attack, or accept them with gates.accept_flags "
            f"({', '.join(refused)})"
        )


def run_nightly(cfg: NightlyConfig) -> NightOutcome:
    """Evaluate, compare, judge, record and notify one night. Raises on anything that prevents the night."""
    from rcat_ray.evaluate.config import CompareConfig
    from rcat_ray.evaluate.run import run_compare
    from rcat_ray.nightly.report import write_nightly_report

    date = cfg.date or dt.datetime.now(dt.UTC).date().isoformat()
    dt.date.fromisoformat(date)  # a malformed date is an input error, before any compute
    candidate = _candidate(cfg)
    compare_cfg = CompareConfig(
        **cfg.model_dump(include=set(CompareConfig.model_fields) - {"old", "new", "report"}),
        old=cfg.baseline,
        new=candidate,
    )
    outcomes, comparison, prepared = run_compare(compare_cfg)
    if comparison is None:
        raise NightlyError("an evaluation is incomplete (max_new_chunks); the night cannot be judged")
    _refuse_flagged(outcomes[1], cfg)
    judged = judge(comparison.summary, cfg.gates)
    run_id = f"{date}-{dt.datetime.now(dt.UTC).strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
    base_out, cand_out = outcomes
    verdict = {
        "pair": cfg.pair,
        "date": date,
        "run_id": run_id,
        "created_at": now_iso(),
        "passed": judged["passed"],
        "failing": judged["failing"],
        "gates": judged["gates"],
        "baseline": {
            "name": base_out.model_name,
            "fingerprint": prepared.plans[0].model.fingerprint,
            "chunks_computed": base_out.chunks_computed,
            "chunks_reused": base_out.chunks_cached,
        },
        "candidate": {
            "name": cand_out.model_name,
            "fingerprint": prepared.plans[1].model.fingerprint,
            "path": candidate.path,
            "chunks_computed": cand_out.chunks_computed,
            "chunks_reused": cand_out.chunks_cached,
        },
        "comparison": comparison.key,
        "store": cfg.store,
        "summary": dict(comparison.summary["metrics"]),
        "sanity": {"baseline": outcomes[0].sanity, "candidate": outcomes[1].sanity},
        "confirmed": comparison.confirmed,
    }
    metrics = comparison.summary["metrics"]
    row = {
        "run_id": run_id,
        "timestamp": verdict["created_at"],
        "pair": cfg.pair,
        "baseline": base_out.model_name,
        "baseline_fingerprint": verdict["baseline"]["fingerprint"],
        "candidate": cand_out.model_name,
        "candidate_fingerprint": verdict["candidate"]["fingerprint"],
        "candidate_path": candidate.path,
        "verdict": "pass" if judged["passed"] else "fail",
        "failing": ", ".join(judged["failing"]),
        "comparison": comparison.key,
        "n_clean": comparison.summary["n_clean"],
        "n_robust": comparison.summary["n_robust"],
        "baseline_chunks_computed": base_out.chunks_computed,
        "candidate_chunks_computed": cand_out.chunks_computed,
        **{f"{m}_{part}": metrics[m][part] for m in metrics for part in ("value", "ci_low", "ci_high")},
        **{f"gate_{g}": getattr(cfg.gates, g) for g in GATE_METRICS},
    }
    out = Path(cfg.out).expanduser() / run_id
    out.mkdir(parents=True, exist_ok=True)
    verdict_path = out / "verdict.json"
    write_file_atomic(verdict_path, json.dumps(verdict, indent=2, default=str))
    append_night(cfg.history, date, row)
    history, skipped = read_history_checked(cfg.history)
    report = write_nightly_report(cfg, history, verdict, prepared.store, out, skipped)
    verdict["report"] = str(report)
    verdict["history_skipped"] = skipped  # nights missing from the trends, with why
    write_file_atomic(verdict_path, json.dumps(verdict, indent=2, default=str))
    write_file_atomic(Path(cfg.out).expanduser() / "latest-verdict.json", json.dumps(verdict, indent=2, default=str))
    deliver(make_notifier(cfg.notify), verdict)
    return NightOutcome(verdict, EXIT_PASS if judged["passed"] else EXIT_GATE_FAILED, verdict_path, report)
