"""A sweep's trials: the settings each one trains with (grid, random or Optuna), and the table of what they
reported. Ray-free: Tune's results are read through their attributes only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from rcat_ray.config import parse_config
from rcat_ray.errors import SweepFailedError
from rcat_ray.finetune.checkpoints import write_final
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.finetune.inputs import Parents
from rcat_ray.sweep.config import SweepConfig
from rcat_ray.sweep.search_space import expand, paper_grid, random_trials

TRIAL_KEYS = ("kind", "alpha", "beta", "train_eps", "lr", "epochs")


def trial_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The flat trial settings (kind, alpha, beta, ...) from a grid/random trial or an Optuna suggestion."""
    if "trial" in config:
        t = config["trial"]
        return {**t["loss"], **{k: t[k] for k in ("train_eps", "lr", "epochs") if k in t}}
    out = {k: config[k] for k in ("kind", "train_eps", "lr", "epochs") if k in config}
    if out.get("kind") == "rcat":
        out.update(alpha=config["rcat_alpha"], beta=config["rcat_beta"])
    elif out.get("kind") in ("pct", "pcat"):
        out.update(alpha=1.0, beta=config["pct_beta"])
    return out


def apply_trial(base: FinetuneConfig, settings: dict[str, Any], name: str) -> FinetuneConfig:
    """The fine-tuning config of one trial: the base with the trial's loss, eps, lr and epochs."""
    loss = base.loss.model_dump()
    loss.update({k: settings[k] for k in ("kind", "alpha", "beta") if k in settings})
    raw = base.model_dump(mode="json")
    raw["loss"] = loss
    if "train_eps" in settings:
        raw["train_attack"]["eps"] = settings["train_eps"]
    if "lr" in settings:
        raw["optimizer"]["lr"] = settings["lr"]
    if "epochs" in settings:
        raw["epochs"] = settings["epochs"]
    raw["name"] = name
    raw["output"] = None  # every trial writes its own files (<out>/<name>-<identity>.pt), never the base's path
    return parse_config(FinetuneConfig, raw)


def optuna_space(cfg: SweepConfig):
    """Optuna's define-by-run space: RCAT's beta is drawn below 1 - alpha, so the simplex is never left."""
    sp = cfg.space

    def space(trial: Any) -> None:
        kind = trial.suggest_categorical("kind", list(sp.losses))
        # per-kind parameter names: Optuna keeps one distribution per name (log scale for PCT's beta only)
        if kind == "rcat":
            a = trial.suggest_float("rcat_alpha", sp.alpha_range[0], min(sp.alpha_range[1], 1.0))
            hi = min(sp.beta_range[1], 1.0 - a)
            trial.suggest_float("rcat_beta", min(sp.beta_range[0], hi), hi)
        elif kind in ("pct", "pcat"):
            trial.suggest_float("pct_beta", sp.pct_beta_range[0], sp.pct_beta_range[1], log=True)
        for key in ("train_eps", "lr", "epochs"):
            choices = getattr(sp, key)
            if choices:
                trial.suggest_categorical(key, list(choices))

    return space


def planned_trials(cfg: SweepConfig) -> list[dict[str, Any]] | None:
    """The trials of grid and random search (None for Optuna, which proposes them as it goes)."""
    sp = cfg.space
    if cfg.mode == "grid":
        losses = paper_grid(sp.losses, sp.rcat_grid, sp.pct_betas)
    elif cfg.algorithm == "random":
        losses = random_trials(
            sp.losses,
            cfg.num_samples,
            cfg.seed,
            alpha_range=sp.alpha_range,
            beta_range=sp.beta_range,
            pct_beta_range=sp.pct_beta_range,
        )
    else:
        return None
    return expand(losses, train_eps=sp.train_eps, lr=sp.lr, epochs=sp.epochs)


def trial_table(results: Any) -> pd.DataFrame:
    """One row per trial: its settings, its last per-epoch metrics, epochs run, and its Tune checkpoint.

    The loop reports its cheap validation as ``val_*``; here those become ``epoch_val_*``, so that ``val_*``
    always means what the choice rule read (see :class:`ChoiceValidation`) and a report can show both.
    """
    rows = []
    for r in results:
        metrics = r.metrics or {}
        cfg = r.config or {}
        settings = trial_settings(cfg) if cfg else {}
        ck_path = metrics.get("checkpoint_path") or (r.checkpoint.path if r.checkpoint else None)
        rows.append(
            {
                "trial_id": metrics.get("trial_id"),
                **{k: settings.get(k) for k in TRIAL_KEYS},
                "epochs_run": metrics.get("training_iteration"),
                "node_id": metrics.get("node_id"),
                **{
                    f"epoch_{k}" if k.startswith("val_") else k: v
                    for k, v in metrics.items()
                    if k.startswith(("val_", "train_loss"))
                },
                "checkpoint": ck_path,
                "error": str(r.error) if r.error else None,
            }
        )
    return pd.DataFrame(rows).sort_values("trial_id", kind="mergesort").reset_index(drop=True)


def raise_if_all_failed(trials: pd.DataFrame) -> None:
    """A sweep whose every trial errored has no metrics to choose on: say why, with the first trial's error."""
    failed = trials["error"].notna() if "error" in trials else pd.Series(False, index=trials.index)
    has_metrics = pd.Series(False, index=trials.index)
    for column in ("epoch_val_s_nfr", "val_s_nfr"):
        if column in trials:
            has_metrics |= trials[column].notna()
    if len(trials) and not (has_metrics & ~failed).any():
        first = trials[failed].iloc[0] if failed.any() else trials.iloc[0]
        error = str(first.get("error") or "no trial reported validation metrics").strip()
        lines = [line for line in error.splitlines() if line.strip()]
        # Ray wraps the trial's exception in a traceback; its last line is the error itself
        raise SweepFailedError(f"all {len(trials)} trials failed; the first ({first['trial_id']}): {lines[-1]}")


def completed_trials(cfg: SweepConfig, trials: pd.DataFrame) -> pd.Series:
    """Trials that ran all their epochs without error and left a checkpoint. A trial ASHA stopped is not
    judged: it is a partly trained model, and not spending the strong attack on it is ASHA's point."""
    done = []
    for _, row in trials.iterrows():
        planned = row.get("epochs")
        planned = int(planned) if planned is not None and pd.notna(planned) else cfg.base.epochs
        runs = row.get("epochs_run")
        done.append(
            pd.isna(row.get("error")) and pd.notna(row.get("checkpoint")) and pd.notna(runs) and int(runs) >= planned
        )
    return pd.Series(done, index=trials.index, dtype=bool)


def trial_config(cfg: SweepConfig, row: pd.Series, out: Path | None = None) -> FinetuneConfig:
    """The fine-tuning config a trial ran with (named ``<sweep>-<trial id>``), writing into ``out`` if given."""
    settings = {k: row[k] for k in TRIAL_KEYS if k in row and pd.notna(row[k])}
    trial_cfg = apply_trial(cfg.base, settings, name=f"{cfg.name}-{row['trial_id']}")
    return trial_cfg if out is None else trial_cfg.model_copy(update={"out": str(out)})


def write_trial_model(cfg: SweepConfig, row: pd.Series, parents: Parents, out: Path) -> Path:
    """A trial's final Tune checkpoint as a self-describing model checkpoint (with its manifest) in ``out``,
    so the flip engine loads it like any other model, fingerprinted by its weights."""
    from rcat_ray.sweep.ray_tune import trial_state

    trial_cfg = trial_config(cfg, row, out)
    state = trial_state(row["checkpoint"])
    return write_final(trial_cfg, state, list(state.get("history", [])), parents).checkpoint
