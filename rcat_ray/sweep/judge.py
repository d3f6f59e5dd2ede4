"""Judging a sweep's finished trials: which validation the choice reads.

By default every trial that ran all its epochs is written as a model and evaluated, with old and new, through
the flip engine with a test-strength attack on the head of the validation split (``SweepConfig.choice``):
the cheap per-epoch validation rewards models the test attack then breaks. ``choice.enabled: false``
judges on the last per-epoch validation instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch

from rcat_ray.config import AttackConfig, EvaluationSettings, ModelConfig
from rcat_ray.core.models import LoadedModel
from rcat_ray.core.progress import log as progress_log
from rcat_ray.core.sources import selection_size
from rcat_ray.core.validation import per_model_table
from rcat_ray.errors import ConfigError, SweepFailedError
from rcat_ray.evaluate.config import EvaluateConfig
from rcat_ray.evaluate.paper_table import TableRow
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.finetune.inputs import Parents
from rcat_ray.finetune.sets import validation_setup
from rcat_ray.sweep.config import SweepConfig
from rcat_ray.sweep.trials import completed_trials, write_trial_model

#: The metrics the choice reads from each comparison against the old model (``val_<metric>`` columns,
#: each with ``_ci_low``, ``_ci_high`` and ``_n``).
CHOICE_METRICS = ("s_nfr", "r_nfr", "nfr", "rob_acc", "acc")


@dataclass
class ChoiceValidation:
    """Which validation the choice rule read: the samples (and their N), the attack, and the new model's
    metrics on them (its robust accuracy is the rule's bar).

    ``source`` is ``"choice"`` (the test-strength attack through the flip engine, values with bootstrap
    CIs) or ``"per-epoch"`` (the cheap validation of each trial's last epoch; ``choice.enabled: false``).
    ``rows`` are the stored comparisons against the old model (old, new, every judged trial) behind the
    validation table; ``labels`` maps trial ids to their row labels.
    """

    source: Literal["choice", "per-epoch"]
    attack: AttackConfig
    data: dict[str, Any]  # the split's description (dataset, split, N, sample-id range, fingerprint)
    n: int
    new: dict[str, dict[str, Any]]  # metric -> {"value", "ci_low", "ci_high", "n"}
    rows: list[TableRow] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def new_rob_acc(self) -> float:
        return float(self.new["rob_acc"]["value"])

    def describe(self) -> str:
        """One line for reports and logs: which validation, which attack, on how many samples."""
        a = self.attack
        what = "choice validation" if self.source == "choice" else "per-epoch validation (last epoch)"
        attacks = " + ".join(x.upper() for x in a.cascade)
        return (
            f"{what}: {attacks}, {a.n_iter} iterations, {a.norm} eps {a.eps:g}, on N = {self.n} samples "
            f"({self.data.get('dataset')} {self.data.get('split')} split, sample ids {self.data.get('sample_id_min')}"
            f"-{self.data.get('sample_id_max')})"
        )

    def to_dict(self) -> dict[str, Any]:
        """What best.yaml records about the validation that chose."""
        return {
            "source": self.source,
            "description": self.describe(),
            "samples": self.n,
            "data": self.data,
            "attack": self.attack.model_dump(mode="json"),
            "new_model": {f"val_{m}": v for m, v in self.new.items()},
        }


def choice_settings(cfg: SweepConfig) -> EvaluationSettings:
    """Where and how finished trials are judged: the head of the base data's val split (the part the training
    split never sees), with ``choice.attack``, else APGD-CE + APGD-DLR, 50 iterations, at the test eps when
    the sweep has test settings (the choice is judged on the threat model it is tested on), else the training eps."""
    ch = cfg.choice
    data = cfg.base.data.model_copy(update={"split": "val", "offset": 0, "limit": ch.samples})
    eps = cfg.test.attack.eps if cfg.test is not None else cfg.base.train_attack.eps
    attack = ch.attack or AttackConfig(eps=eps, attacks=("apgd-ce", "apgd-dlr"), n_iter=50)
    # adversarial images are for reports on test data; the validation tables only need their rows
    return EvaluationSettings(
        data=data,
        attack=attack,
        chunk_size=ch.chunk_size,
        store=cfg.base.store,
        compute=cfg.compute,
        save_adversarial=False,
    )


def check_choice_inputs(cfg: SweepConfig) -> int | None:
    """Refuse, before any trial trains, a choice validation that asks for more validation samples than there are:
    a smaller N than requested would silently widen every CI the choice rests on. Rows are counted from the
    files' metadata (no image is decoded); returns the count, None when it is off."""
    if not cfg.choice.enabled:
        return None
    data = choice_settings(cfg).data
    n = selection_size(data)
    if n < cfg.choice.samples:
        raise ConfigError(
            f"choice.samples is {cfg.choice.samples} but the val split of {data.name} holds {n} "
            "samples; lower choice.samples or raise base.data.val_size"
        )
    return n


def new_model_val_rob_acc(base: FinetuneConfig, new: LoadedModel) -> float:
    """The new model's robust accuracy on the per-epoch validation (cheap attack): the bar of the rule when
    ``choice.enabled`` is false."""
    val_split, val_attack = validation_setup(base)
    table = per_model_table(new.module.eval(), val_split, val_attack, new.num_classes, torch.device("cpu"))
    return float(table.column("robust").to_numpy(zero_copy_only=False).astype(bool).mean())


def _metric_columns(summaries: list[dict[str, Any] | None]) -> dict[str, Any]:
    """``val_<m>``, ``val_<m>_ci_low``, ``val_<m>_ci_high``, ``val_<m>_n`` from comparison summaries (None for a
    trial that was not judged)."""
    cols: dict[str, Any] = {}
    for m in CHOICE_METRICS:
        entries = [(s or {}).get("metrics", {}).get(m, {}) for s in summaries]
        for part in ("value", "ci_low", "ci_high"):
            name = f"val_{m}" if part == "value" else f"val_{m}_{part}"
            cols[name] = [float("nan") if e.get(part) is None else float(e[part]) for e in entries]
        cols[f"val_{m}_n"] = pd.array([e.get("n") for e in entries], dtype="Int64")
    return cols


def judge_on_choice_validation(
    cfg: SweepConfig, trials: pd.DataFrame, parents: Parents, out: Path
) -> tuple[pd.DataFrame, ChoiceValidation]:
    """Write every completed trial's model under ``<out>/trials/`` and evaluate old, new and each of them with
    the choice settings through the flip engine (Ray Data, the result store: old and new are attacked
    once and reused by fingerprint); each trial gets its comparison against the old model as ``val_*``."""
    from rcat_ray.evaluate.comparison import compare_stored
    from rcat_ray.evaluate.run import raise_if_incomplete, run_evaluate
    from rcat_ray.sweep.choice import trial_label

    done = completed_trials(cfg, trials)
    if not done.any():
        raise SweepFailedError(
            f"none of the {len(trials)} trials ran all its epochs without error; there is no model to judge"
        )
    settings = choice_settings(cfg)
    folder = out / "trials"
    paths: dict[str, Path] = {}
    labels: dict[str, str] = {}
    for _, row in trials[done].iterrows():
        tid = str(row["trial_id"])
        paths[tid] = write_trial_model(cfg, row, parents, folder)
        labels[tid] = f"{trial_label(row)} {tid}"
    a = settings.attack
    progress_log.info(
        f"[sweep {cfg.name}] judging {len(paths)} finished trial(s) against old and new: "
        f"{' + '.join(x.upper() for x in a.cascade)}, {a.n_iter} iterations, eps {a.eps:g}, "
        f"on {settings.data.limit} validation samples"
    )
    models = (
        cfg.base.old,
        cfg.base.new,
        *(ModelConfig(source="checkpoint", name=p.stem, label=labels[t], path=str(p)) for t, p in paths.items()),
    )
    eval_cfg = EvaluateConfig(**{k: getattr(settings, k) for k in EvaluationSettings.model_fields}, models=models)
    outcomes, prepared = run_evaluate(eval_cfg)
    raise_if_incomplete(outcomes)
    plans, names = prepared.plans, list(prepared.split.class_names)
    comps = [compare_stored(prepared.store, plans[0].key, p.key, cfg.bootstrap, class_names=names) for p in plans]

    old_label, new_label = cfg.base.old.display_name or "old", cfg.base.new.display_name or "new"
    if old_label == new_label:
        old_label, new_label = f"{old_label} (old)", f"{new_label} (new)"
    row_labels = [old_label, new_label, *labels.values()]
    rows = [
        TableRow(label, c.summary, c.flips, is_old=i == 0, comparison_key=c.key)
        for i, (label, c) in enumerate(zip(row_labels, comps, strict=True))
    ]
    judged = dict(zip(paths, zip(comps[2:], plans[2:], strict=True), strict=True))
    ids = [str(t) for t in trials["trial_id"]]
    trials = trials.assign(
        judged=[t in judged for t in ids],
        model=[str(paths[t]) if t in paths else None for t in ids],
        val_table=[judged[t][1].key if t in judged else None for t in ids],
        val_comparison=[judged[t][0].key if t in judged else None for t in ids],
        **_metric_columns([judged[t][0].summary if t in judged else None for t in ids]),
    )
    new_metrics = {m: dict(comps[1].summary["metrics"][m]) for m in CHOICE_METRICS}
    validation = ChoiceValidation(
        "choice", a, prepared.split.describe(), len(prepared.split), new_metrics, rows, labels
    )
    return trials, validation


def judge_on_epochs(cfg: SweepConfig, trials: pd.DataFrame, parents: Parents) -> tuple[pd.DataFrame, ChoiceValidation]:
    """``choice.enabled: false``: the rule reads each trial's last per-epoch validation, as it used to (no
    CIs; the bar is the new model's robust accuracy under the same cheap attack)."""
    val_split, val_attack = validation_setup(cfg.base)
    new_rob = new_model_val_rob_acc(cfg.base, parents.new)
    n = len(val_split)
    cols: dict[str, Any] = {"judged": trials.get("epoch_val_s_nfr", pd.Series(index=trials.index)).notna()}
    for m in CHOICE_METRICS:
        values = trials.get(f"epoch_val_{m}", pd.Series(float("nan"), index=trials.index)).astype(float)
        cols[f"val_{m}"] = values
        cols[f"val_{m}_n"] = pd.array([n if pd.notna(v) else None for v in values], dtype="Int64")
    new = {"rob_acc": {"value": new_rob, "ci_low": None, "ci_high": None, "n": n}}
    validation = ChoiceValidation("per-epoch", val_attack, val_split.describe(), n, new)
    return trials.assign(**cols), validation
