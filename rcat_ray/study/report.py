"""The study's outputs: one table over all pairs as Markdown, LaTeX and CSV, a JSON record, a forest plot of
RCAT's differences and an HTML page, written atomically with a manifest (config, versions, fingerprints)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rcat_ray.core.atomic import write_file_atomic
from rcat_ray.core.numbers import finite, percent, percent_ci
from rcat_ray.evaluate.paper_table import COLUMNS, PairTable, latex_escape, markdown_table, to_markdown
from rcat_ray.report.paper_view import paper_table_view
from rcat_ray.store.result_store import now_iso, package_versions
from rcat_ray.study.aggregate import COMPARED, PairResult
from rcat_ray.study.config import PAPER_RULE, StudyConfig

TITLES = [c[0] for c in COLUMNS]
_ROLE_NAMES = {"new": "new", "at": "AT", "pcat": "PCAT", "pct": "PCT"}


def _spread(v: dict[str, Any], seeds: int) -> str:
    """``mean [min, max]`` over seeds (a bare value for one seed or where every seed agrees)."""
    if v["mean"] is None:
        return "-"
    if seeds == 1 or v["min"] == v["max"]:
        return percent(v["mean"])
    return f"{percent(v['mean'])} [{percent(v['min'])}, {percent(v['max'])}]"


def _difference(d: dict[str, Any]) -> str:
    text = percent_ci(d["value"], d["ci_low"], d["ci_high"], sign=True)
    return f"{text} ({d['seeds_ci_excludes_0']}/{d['seeds']})" if d["value"] is not None else text


def result_rows(results: list[PairResult]) -> list[list[str]]:
    """pair, model, then each column's value over seeds."""
    rows = []
    for r in results:
        for i, (role, label) in enumerate(r.roles.items()):
            cells = [r.name if i == 0 else "", label]
            for title in TITLES:
                v = r.values[role].get(title)
                cells.append("-" if v is None else _spread(v, len(r.seeds)))
            rows.append(cells)
    return rows


def difference_rows(results: list[PairResult]) -> list[list[str]]:
    """pair, the row RCAT is compared with, then each column's seed-averaged difference."""
    rows = []
    for r in results:
        for i, (role, diffs) in enumerate(r.differences.items()):
            rows.append([r.name if i == 0 else "", r.roles[role], *(_difference(diffs[t]) for t in TITLES)])
    return rows


def summary_rows(summary: dict[str, Any]) -> list[list[str]]:
    """RCAT versus each row over pairs: pairs lower / higher / unclear, and the mean difference per column."""
    rows = []
    for role, columns in summary.items():
        cells = [_ROLE_NAMES.get(role, role)]
        for title in TITLES:
            c = columns[title]
            mean = percent(c["mean"], sign=True)
            cells.append(f"{c['lower']} / {c['higher']} / {c['unclear']} (mean {mean})")
        rows.append(cells)
    return rows


def choice_rows(cfg: StudyConfig, results: list[PairResult]) -> list[list[str]]:
    rows = []
    for r in results:
        cells = [r.name]
        for kind in cfg.methods:
            c = r.chosen[kind]
            flag = "" if c["meets_bar"] else " (below the bar)"
            cells.append(
                f"{c['label']}{flag}: val S-NFR {percent(c['val_s_nfr'])}, rob. acc {percent(c['val_rob_acc'])}"
            )
        rows.append(cells)
    return rows


def protocol_text(cfg: StudyConfig, validation: str) -> list[str]:
    f, t = cfg.finetune, cfg.test
    grids = []
    if "rcat" in cfg.methods:
        grids.append("RCAT (alpha, beta) " + " ".join(f"({a:g},{b:g})" for a, b in cfg.rcat_grid))
    if {"pct", "pcat"} & set(cfg.methods):
        grids.append("PCT/PCAT alpha 1, beta " + ", ".join(f"{b:g}" for b in cfg.pct_betas))
    a = t.attack
    rule = "the paper's rule (new better on clean and robust validation accuracy)"
    return [
        f"- Pairs: {rule if cfg.pairs == PAPER_RULE else 'listed'}.",
        f"- Methods: {', '.join(m.upper() for m in cfg.methods)}; grids: {'; '.join(grids) or '-'}.",
        f"- Fine-tuning: {f.epochs} epoch(s), global batch {f.batch_size}, {f.optimizer.name} lr {f.optimizer.lr:g}, "
        f"training attack {f.train_attack.kind} eps {f.train_attack.eps:g}, data {f.data.name} "
        f"{f.data.split}{'' if f.data.limit is None else f' (first {f.data.limit})'}; final seeds {list(cfg.seeds)}.",
        f"- Choice: per method, the lowest validation S-NFR among its trials that keep the new model's validation "
        f"robust accuracy minus {100 * cfg.tolerance:g} points (else the lowest S-NFR, flagged); {validation}.",
        f"- Test: {' + '.join(x.upper() for x in a.cascade)}, {a.n_iter} iterations, {a.norm} eps {a.eps:g}, "
        f"{t.data.name} {t.data.split}{'' if t.data.limit is None else f' (first {t.data.limit})'}"
        f"{'' if a.robust_samples is None else f', robust metrics on the first {a.robust_samples}'}.",
    ]


def to_markdown_text(cfg: StudyConfig, outcome: Any, tables: list[PairTable]) -> str:
    results: list[PairResult] = outcome.results
    seeds = len(cfg.seeds)
    validation = results[0].validation.get("description", "") if results else ""
    lines = [f"# Study {cfg.name}", "", *protocol_text(cfg, validation), ""]
    lines += ["## Models on the choice validation (%)", ""]
    lines += markdown_table(
        ["model", "clean acc", "robust acc", "N"],
        [[n, percent(a["acc"]), percent(a["rob_acc"]), str(a["n"])] for n, a in outcome.accuracy.items()],
    )
    lines += ["", f"Pairs studied: {', '.join(p.name for p in outcome.pairs)}.", "", "## Chosen weights", ""]
    lines += markdown_table(["pair", *(m.upper() for m in cfg.methods)], choice_rows(cfg, results))
    lines += ["", f"## Test results (%; mean [min, max] over {seeds} seed(s))", ""]
    lines += markdown_table(["pair", "model", *TITLES], result_rows(results))
    lines += [
        "",
        f"## RCAT minus each (points; mean over seeds [95% paired-bootstrap CI over the test samples]; "
        f"(k/{seeds}): seeds whose own paired CI excludes 0)",
        "",
    ]
    lines += markdown_table(["pair", "minus", *TITLES], difference_rows(results))
    lines += [
        "",
        f"## Over {len(results)} pair(s): RCAT lower / higher / unclear than each (CI of the seed mean excludes 0)",
        "",
    ]
    lines += markdown_table(["RCAT vs", *TITLES], summary_rows(outcome.summary))
    lines += [
        "",
        "## Timings (s)",
        "",
        *markdown_table(["phase", "s"], [[k, f"{v:.0f}"] for k, v in outcome.timings.items()]),
        "",
        "## Per pair and seed: the paper-style tables (%, 95% CIs)",
        "",
        to_markdown(tables),
    ]
    return "\n".join(lines)


def _latex_tabular(head: list[str], rows: list[list[str]]) -> list[str]:
    """A booktabs tabular of text rows; a rule above each pair's first row (the one that names the pair)."""
    out = [r"\begin{tabular}{ll" + "r" * (len(head) - 2) + "}", r"\toprule", " & ".join(head) + r" \\"]
    for cells in rows:
        if cells[0]:
            out.append(r"\midrule")
        out.append(" & ".join(latex_escape(c) for c in cells) + r" \\")
    return [*out, r"\bottomrule", r"\end{tabular}", ""]


def to_latex_text(results: list[PairResult]) -> str:
    """The results table and RCAT's differences (booktabs), the same cells as the Markdown."""
    return "\n".join(
        [
            *_latex_tabular(["pair", "model", *TITLES], result_rows(results)),
            "% RCAT minus each row: mean over seeds [95% paired-bootstrap CI] (seeds whose own CI excludes 0)",
            *_latex_tabular(["pair", "minus", *TITLES], difference_rows(results)),
        ]
    )


def to_csv_text(results: list[PairResult]) -> str:
    """Long format: one line per (pair, model, column, seed or mean) and per difference."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["pair", "kind", "model", "minus", "column", "seed", "value", "ci_low", "ci_high", "min", "max", "n"])
    for r in results:
        for role, label in r.roles.items():
            for title, v in r.values[role].items():
                head = [r.name, "value", label, "", title]
                for seed, x, (lo, hi) in zip(r.seeds, v["per_seed"], v["per_seed_ci"], strict=True):
                    w.writerow([*head, seed, x, lo, hi, "", "", v["n"]])
                w.writerow([*head, "mean", v["mean"], "", "", v["min"], v["max"], v["n"]])
        for role, diffs in r.differences.items():
            for title, d in diffs.items():
                head = [r.name, "difference", r.roles["rcat"], r.roles[role], title]
                for seed, x in zip(r.seeds, d["seed_cis"], strict=True):
                    w.writerow([*head, seed, x["value"], x["ci_low"], x["ci_high"], "", "", d["n"]])
                known = [x for x in d["per_seed"] if x is not None]
                spread = [min(known), max(known)] if known else ["", ""]
                w.writerow([*head, "mean", d["value"], d["ci_low"], d["ci_high"], *spread, d["n"]])
    return buf.getvalue()


def forest_figure(results: list[PairResult], columns: tuple[str, ...] = ("R-NFR", "robust error")) -> Figure:
    """RCAT minus each row per pair, seed-averaged with its CI: one panel per column, one line per pair."""
    lines = sum(len(r.differences) for r in results)
    fig = Figure(figsize=(5.0 * len(columns), 1.0 + 0.3 * lines), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    colours = {"new": "#7f7f7f", "at": "#1f4e9c", "pcat": "#2e8b57", "pct": "#c08a00"}
    for j, title in enumerate(columns):
        ax = fig.add_subplot(1, len(columns), j + 1)
        y, labels = 0, []
        for r in results:
            for role in (x for x in COMPARED if x in r.differences):
                d = r.differences[role][title]
                v, lo, hi = finite(d["value"]), finite(d["ci_low"]), finite(d["ci_high"])
                if v is not None:
                    err = [[0 if lo is None else (v - lo) * 100], [0 if hi is None else (hi - v) * 100]]
                    ax.errorbar(v * 100, -y, xerr=err, fmt="o", color=colours[role], capsize=3)
                labels.append(f"{r.name}: minus {r.roles[role]}")
                y += 1
        ax.axvline(0, color="#333333", linewidth=0.8)
        ax.set_yticks([-i for i in range(len(labels))], labels if j == 0 else [""] * len(labels), fontsize=8)
        ax.set_xlabel(f"RCAT minus row, {title} (points)")
        ax.grid(axis="x", alpha=0.3)
    return fig


def write_study(cfg: StudyConfig, outcome: Any, tables: list[PairTable]) -> list[Path]:
    """Every output of the study, each written atomically; returns the files."""
    from rcat_ray.report.render import render_page

    out = outcome.out
    out.mkdir(parents=True, exist_ok=True)
    results: list[PairResult] = outcome.results
    md = to_markdown_text(cfg, outcome, tables)
    record = {
        "name": cfg.name,
        "pairs": [p.name for p in outcome.pairs],
        "accuracy_on_validation": outcome.accuracy,
        "results": [
            {
                "pair": r.name,
                "roles": r.roles,
                "seeds": r.seeds,
                "chosen": r.chosen,
                "validation": r.validation,
                "sweep": r.sweep,
                "values": r.values,
                "differences": r.differences,
            }
            for r in results
        ],
        "over_pairs": outcome.summary,
        "timings_s": outcome.timings,
    }
    fig = forest_figure(results)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    seeds = len(cfg.seeds)
    validation = results[0].validation.get("description", "") if results else ""
    page = render_page(
        "study.html.j2",
        name=cfg.name,
        protocol=protocol_text(cfg, validation),
        models=[[n, percent(a["acc"]), percent(a["rob_acc"]), str(a["n"])] for n, a in outcome.accuracy.items()],
        methods=[m.upper() for m in cfg.methods],
        choices=choice_rows(cfg, results),
        columns=TITLES,
        results=result_rows(results),
        differences=difference_rows(results),
        summary=summary_rows(outcome.summary),
        seeds=seeds,
        n_pairs=len(results),
        per_seed_tables=[paper_table_view(t) for t in tables],
    )
    files = {
        "study.md": md,
        "study.tex": to_latex_text(results),
        "study.csv": to_csv_text(results),
        "study.json": json.dumps(record, indent=2, default=str),
        "differences.png": png.getvalue(),
        "report.html": page,
    }
    written = [write_file_atomic(out / name, data) for name, data in files.items()]
    manifest = {
        "created": now_iso(),
        "config": cfg.model_dump(mode="json"),
        "versions": package_versions(),
        "fingerprints": outcome.fingerprints,
        "sweeps": {r.name: r.sweep for r in results},
        "tables": [{"pair": t.name, "rows": {r.label: r.comparison_key for r in t.rows}} for t in tables],
        "files": [p.name for p in written],
    }
    written.append(write_file_atomic(out / "manifest.json", json.dumps(manifest, indent=2, default=str)))
    return written
