"""How far the demo's robustness flips can be trusted: AutoAttack's sanity flags, confirmed flips, attack noise
and near-flips, measured on the outputs of ``rcat-ray demo`` through the real CLI (subprocesses, timed).

Runs, on the demo's store (its tables are reused; only what is new is computed):
  1. ``compare --confirm`` old -> new and old -> RCAT: the flips re-attacked by AutoAttack's standard cascade
     with 5 APGD-CE restarts, and the seconds that took (the cost of confirming, against the flips' count);
  2. ``compare --seeds 0,1`` old -> new: both models attacked again with seed 1 (seed 0's tables are the demo's),
     the attack noise per model and per flip rate, and the seconds one more seed costs;
  3. from the same outputs: the sanity flags of every table and the near-flip rate at the default margin.

    .venv/bin/python bench/flip_trust.py [--demo-out demo-out] [--out bench/results/flip_trust.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def cli(*args: str) -> tuple[dict, float]:
    """Run ``rcat-ray ARGS --json`` and return its JSON and wall seconds."""
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "rcat_ray.cli", *args, "--json"], check=False, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"rcat-ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout), seconds


def pct(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    ci = "" if entry.get("ci_low") is None else f" [{100 * entry['ci_low']:.2f}, {100 * entry['ci_high']:.2f}]"
    return f"{100 * entry['value']:.2f}{ci}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-out", default="demo-out")
    ap.add_argument("--out", default="bench/results/flip_trust.md")
    args = ap.parse_args()
    demo = Path(args.demo_out)
    models = demo / "models"
    old = next(models.glob("old-*.pt"))
    new = next(models.glob("new-*.pt"))
    rcat = next(p for p in sorted(models.glob("*.pt")) if "rcat" in p.name.lower())
    common = [
        "--data",
        "fashion_mnist",
        "--split",
        "test",
        "--limit",
        "5000",
        "--eps",
        "0.1",
        "--attacks",
        "apgd-ce,apgd-dlr",
        "--n-iter",
        "50",
        "--chunk-size",
        "250",
        "--store",
        str(demo / "store"),
        "--workers",
        "2",
        "--cpus-per-worker",
        "1",
        "--threads-per-worker",
        "1",
    ]
    lines = [f"# Trusting the demo's robustness flips (`bench/flip_trust.py`, {time.strftime('%Y-%m-%d')})", ""]
    lines += [f"Models: old `{old.name}`, new `{new.name}`, RCAT `{rcat.name}`; {' '.join(common[:12])}.", ""]

    confirmed = {}
    for name, path in (("new", new), ("RCAT", rcat)):
        out, seconds = cli("compare", *common, "--old", str(old), "--new", str(path), "--confirm")
        confirmed[name] = (out, seconds)

    lines += ["## Sanity flags (AutoAttack's checks, per table)", ""]
    for name, (out, _) in confirmed.items():
        for t in out["tables"]:
            flags = (t.get("sanity") or {}).get("flags")
            lines.append(
                f"- {t['model']} (compared as {'old' if t is out['tables'][0] else name}): "
                f"flags {flags if flags is not None else 'not recorded'}; record {json.dumps(t.get('sanity'))}"
            )
    lines += ["", "## Confirmed robustness flips (AutoAttack standard, APGD-CE 5 restarts, 100 iterations)", ""]
    lines += [
        "| old -> | R-NFR | R-NFR confirmed | flips held / all | R-PFR | R-PFR confirmed | flips held / all "
        "| samples re-attacked | seconds (call) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (out, seconds) in confirmed.items():
        c, m = out["confirmed"], out["summary"]["metrics"]
        again = sum((c.get("re_attacked") or {}).values())
        lines.append(
            f"| {name} | {pct(m['r_nfr'])} | {pct(c['r_nfr_confirmed'])} | "
            f"{c['r_nfr_flips'] - c['r_nfr_dissolved']} / {c['r_nfr_flips']} | {pct(m['r_pfr'])} | "
            f"{pct(c['r_pfr_confirmed'])} | {c['r_pfr_flips'] - c['r_pfr_dissolved']} / {c['r_pfr_flips']} | "
            f"{again} of {m['r_nfr']['n']} | {seconds:.0f} |"
        )
    lines += ["", "## Near-flips (both withstood; new model's lowest margin under attack below 0.5)", ""]
    for name, (out, _) in confirmed.items():
        s = out["summary"]
        lines.append(
            f"- old -> {name}: near-flips {pct(s['metrics']['near_flip'])} % of {s['metrics']['near_flip']['n']}"
            f" (R-NFR {pct(s['metrics']['r_nfr'])} %), margin {s['near_margin']}"
        )

    out, seconds = cli("compare", *common, "--old", str(old), "--new", str(new), "--seeds", "0,1")
    lines += ["", f"## Attack noise, seeds 0 and 1 (one more seed for both models: {seconds:.0f} s)", ""]
    for t in out["tables"]:
        a = t.get("attack_noise") or {}
        lines.append(
            f"- {t['model']}: {a.get('disagree')} of {a.get('n')} attacked samples change their robust flag "
            f"({100 * (a.get('rate') or 0):.2f} %); robust accuracy per seed "
            f"{[round(100 * x, 2) for x in a.get('rob_acc_per_seed', [])]}, both {100 * (a.get('rob_acc') or 0):.2f}"
        )
    noise = out["summary"].get("attack_noise") or {}
    lines += [
        "",
        "| metric | seed 0 | seed 1 | ensemble (robust under both) | samples whose flag changes |",
        "|---|---|---|---|---|",
    ]
    for key, e in (noise.get("metrics") or {}).items():
        ens = out["summary"]["metrics"][key]
        lines.append(
            f"| {key} | {100 * e['per_seed'][0]:.2f} | {100 * e['per_seed'][1]:.2f} | {pct(ens)} | "
            f"{e['unstable']} of {e['n']} ({100 * e['unstable_rate']:.2f} %) |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
