"""Judging a comparison against the nightly gates: which thresholds hold, on which evidence.

A max gate (NFR, R-NFR, S-NFR) fails only when the lower end of the metric's CI lies above the threshold,
a min gate (accuracy, robust accuracy) only when the upper end lies below it: a candidate is not blocked by
noise, only by evidence (``judge_on: value`` compares point estimates instead). A gate whose metric has no
samples is reported as not judged and does not fail the night.
"""

from __future__ import annotations

from typing import Any

from rcat_ray.nightly.config import GatesConfig

#: gate key -> (summary metric, direction)
GATE_METRICS: dict[str, tuple[str, str]] = {
    "max_nfr": ("nfr", "max"),
    "max_r_nfr": ("r_nfr", "max"),
    "max_s_nfr": ("s_nfr", "max"),
    "max_near_flip": ("near_flip", "max"),
    "min_acc": ("acc", "min"),
    "min_rob_acc": ("rob_acc", "min"),
}


def _judge_one(name: str, scope: str, threshold: float, metric: dict[str, Any], judge_on: str) -> dict[str, Any]:
    key, direction = GATE_METRICS[name]
    if judge_on == "value":
        evidence = metric["value"]
    else:  # the CI end that has to cross the threshold for the evidence to say "regressed"
        evidence = metric["ci_low"] if direction == "max" else metric["ci_high"]
    if evidence is None:
        passed = None
    else:
        passed = evidence <= threshold if direction == "max" else evidence >= threshold
    return {
        "gate": name,
        "scope": scope,
        "metric": key,
        "threshold": threshold,
        "judged_on": judge_on,
        "evidence": evidence,
        "value": metric["value"],
        "ci_low": metric["ci_low"],
        "ci_high": metric["ci_high"],
        "n": metric["n"],
        "passed": passed,
    }


def judge(summary: dict[str, Any], gates: GatesConfig) -> dict[str, Any]:
    """The verdict of one comparison summary: every gate's evidence and outcome, and the failing ones."""
    results = []
    for name in GATE_METRICS:
        threshold = getattr(gates, name)
        if threshold is not None:
            results.append(
                _judge_one(name, "overall", threshold, summary["metrics"][GATE_METRICS[name][0]], gates.judge_on)
            )
    per_class = {c["class"]: c for c in summary.get("per_class", [])}
    for cg in gates.per_class:
        cls = per_class.get(cg.class_index)
        if cls is None:
            raise ValueError(f"per-class gate for class {cg.class_index}, which the data does not have")
        for name in GATE_METRICS:
            threshold = getattr(cg, name)
            if threshold is not None:
                results.append(
                    _judge_one(
                        name,
                        f"class {cg.class_index} ({cls['name']})",
                        threshold,
                        cls["metrics"][GATE_METRICS[name][0]],
                        gates.judge_on,
                    )
                )
    failing = [f"{r['gate']} [{r['scope']}]" for r in results if r["passed"] is False]
    return {"passed": not failing, "failing": failing, "gates": results}
