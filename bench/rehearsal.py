"""A rehearsal at the paper's ImageNet size (issue 17, point 4): 50,000 JPEGs through the real commands.

For each size N (``--sizes``, default 2,000 and 50,000: the small one is the reference that shows whether
anything grows with N) the rehearsal runs, on a fresh result store, every stage as the ``rcat-ray`` command a
user types, in a subprocess, nothing patched:

0. ``images``: an ImageFolder of N synthetic JPEGs (``--px`` 256 x 256, a class-coloured gradient with noise,
   ``--classes`` 10 class folders), written in parallel by one process per CPU (not measured: not the
   product). ``val/`` holds them (the test split, as ImageNet's validation set) and ``train`` is a link to it
   (the fine-tune's train split: its first N - ``--val-size`` images; the last ``--val-size`` are its val
   split). With ``--keep DIR`` the folders are kept in DIR and reused by later runs (stores are always fresh);
1. ``prepare``: ``rcat-ray data prepare`` of the test split (row groups of ``--chunk-size``, what an evaluation
   reads) and of the training selection (``--config`` the fine-tune's config: row groups of 16, as the
   fine-tune prepares it): every image decoded, resized to 256 and cropped to 224 once, stored as uint8;
2. ``evaluate``: ``rcat-ray evaluate`` of the old and new models (``--arch`` tiny_convnet checkpoints written by
   the project's ``save_checkpoint``, trained for ``--old-steps`` 15 and ``--new-steps`` 40 Adam steps on 200
   synthetic images drawn as the folder's are, so that they classify some images, disagree on some, and the
   attack has correctly classified images to work on) on the test split, 2 actors, APGD-CE with ``--n-iter`` 1
   iteration, Linf 4/255, on the first ``--robust-samples`` 5,000 images (clean predictions on all: the paper
   attacks a subset too; at 224 px APGD's element-wise work costs about 25 ms of CPU an image even for this
   model, so attacking all 50,000 twice would take most of an hour), chunk ``--chunk-size`` 250, adversarial
   images not kept (``save_adversarial: false``: kept, they are float32, 600 kB an image, 30 GB a model at
   N = 50,000);
3. ``finetune``: ``rcat-ray finetune``, RCAT (0.5, 0.4) + FGSM-RS, one epoch on 2 Ray Train workers, global
   batch ``--batch-size`` 128, per-epoch validation on ``--val-samples`` images (APGD-CE, ``--n-iter``);
4. ``compare``: ``rcat-ray compare`` old -> fine-tuned with its HTML report (the fine-tuned model is evaluated
   on the test split; the old model's table comes from the store);
5. ``nightly``: ``rcat-ray nightly``: production = new, candidate = the fine-tuned model, loose gates (both
   tables from the store: no chunk attacked); exit 0 (passed) or 1 (a gate failed) both mean the gate ran.

Reported per stage and N (``bench/_measure.py``: VmHWM from /proc every 0.2 s): wall time, the driver's peak RSS
(the ``rcat-ray`` process), the largest Ray worker's peak RSS (and which worker), the store's size on disk after
the stage, and for the fine-tune the bytes each worker read in the epoch as a fraction of the training set's
stored bytes; then, per stage, the peaks at the largest N over the smallest (what grew with N). The table goes
to ``bench/results/rehearsal.md`` (``--results``; ``--no-write`` for none).

    .venv/bin/python bench/rehearsal.py --keep /var/tmp/rehearsal        # 2,000 then 50,000 (see below)
    .venv/bin/python bench/rehearsal.py --sizes 500 --no-write           # a smoke run, a few minutes

Disk: the 50,000 JPEGs take about 1.1 GB (23 kB each), and the store about 15 GB (two prepared selections of
about 7.5 GB each: uint8 3x224x224 is 150 kB an image, and noisy pixels do not compress). Time: about 25-30
minutes for 2,000 and 50,000 on an idle 2-CPU machine (estimated from smoke runs on a loaded machine); after
each size but the last the run prints a rough estimate for the largest one, so a run that would take too
long can be stopped early (Ctrl+C; the image folders in ``--keep`` are reused next time).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import (
    bench_env,
    du,
    git_commit,
    machine_line,
    mib,
    rcat_ray_command,
    run_measured,
    short_title,
    write_image_folder,
    write_parents,
    write_section,
)

REPO = Path(__file__).resolve().parents[1]
RCAT_RAY = rcat_ray_command()
EPS = 4 / 255
SHAPE = (3, 224, 224)
ROW_NBYTES = 3 * 224 * 224
STAGES = ("images", "prepare", "evaluate", "finetune", "compare", "nightly")


def image_folder(keep: Path, n: int, args) -> tuple[Path, float]:
    """The ImageFolder of ``n`` images (``root/val/<class>/*.JPEG``, ``root/train`` -> ``val``): reused when a
    folder written with the same settings is there; (root, seconds spent writing it, 0 when reused)."""
    root = keep / f"imagefolder-{n}-{args.px}px-{args.classes}c"
    stamp = root / "complete.json"
    settings = {"n": n, "px": args.px, "classes": args.classes, "seed": 0}
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return root, 0.0
    shutil.rmtree(root, ignore_errors=True)
    t = time.perf_counter()
    write_image_folder(root / "val", n, size=args.px, classes=args.classes, processes=args.processes)
    (root / "train").symlink_to("val")
    stamp.write_text(json.dumps(settings))
    return root, time.perf_counter() - t


def configs(args, root: Path, work: Path, parents: tuple[Path, Path]) -> dict[str, Path]:
    """The YAML configs of the stages (what a user would write), in ``work``."""
    import yaml

    attack = {"norm": "Linf", "eps": EPS, "attacks": ["apgd-ce"], "n_iter": args.n_iter, "seed": 0}
    tested = {**attack, "robust_samples": args.robust_samples or None}
    settings = {
        "data": {"name": "imagenet", "root": str(root), "split": "test"},
        "attack": tested,
        "chunk_size": args.chunk_size,
        "store": str(work / "store"),
        "save_adversarial": False,
        "compute": {"num_workers": args.workers, "cpus_per_worker": 1, "threads_per_worker": 1},
    }
    old, new = ({"source": "checkpoint", "path": str(p)} for p in parents)
    finetuned = str(work / "finetuned" / "rcat.pt")
    cfgs = {
        "evaluate": {**settings, "models": [{**old, "label": "old"}, {**new, "label": "new"}]},
        "finetune": {
            "old": old,
            "new": new,
            "data": {"name": "imagenet", "root": str(root), "split": "train", "val_size": args.val_size},
            "loss": {"kind": "rcat", "alpha": 0.5, "beta": 0.4},
            "train_attack": {"kind": "fgsm-rs", "eps": EPS},
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "epochs": 1,
            "batch_size": args.batch_size,
            "validation": {"samples": args.val_samples, "attack": attack},
            "compute": {"num_workers": args.workers, "threads_per_worker": 1},
            "max_failures": 0,
            "store": str(work / "store"),
            "storage": str(work / "ray_results"),
            "output": finetuned,
        },
        "compare": {
            **settings,
            "old": {**old, "label": "old"},
            "new": {"source": "checkpoint", "path": finetuned, "label": "RCAT"},
            "bootstrap": {"n_resamples": 1000},
            "report": str(work / "report"),
        },
        "nightly": {
            **settings,
            "pair": "rehearsal",
            "baseline": {**new, "label": "production"},
            "candidate": {"source": "checkpoint", "path": finetuned, "label": "candidate"},
            "gates": {"max_nfr": 0.5, "max_r_nfr": 0.5, "max_s_nfr": 0.5, "judge_on": "ci"},
            "bootstrap": {"n_resamples": 1000},
            "history": str(work / "history"),
            "out": str(work / "nightly-out"),
            "notify": {"kind": "stdout"},
        },
    }
    paths = {}
    for name, cfg in cfgs.items():
        paths[name] = work / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return paths


def last_json(log: Path) -> dict | list | None:
    """The JSON document a ``--json`` command printed last in its log (stdout and stderr are one file)."""
    text = log.read_text()
    for start in [i for i, ch in enumerate(text) if ch in "{[" and (i == 0 or text[i - 1] == "\n")][::-1]:
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0]
        except json.JSONDecodeError:
            continue
    return None


def run_size(args, n: int, keep: Path) -> list[dict]:
    root, gen_s = image_folder(keep, n, args)
    work = keep / f"run-{n}"
    shutil.rmtree(work, ignore_errors=True)  # a fresh store each run
    work.mkdir(parents=True)
    parents = write_parents(
        work / "models", args.arch, SHAPE, args.classes, train_steps=(args.old_steps, args.new_steps), px=args.px
    )
    paths = configs(args, root, work, parents)
    store = work / "store"
    note = f"{du(root) / 2**30:.2f} GiB of JPEGs" + (" (reused)" if not gen_s else "")
    rows = [
        {
            "stage": "images",
            "n": n,
            "wall_s": gen_s,
            "cpu_s": 0.0,
            "idle_s": gen_s,
            "returncode": 0,
            "driver_peak": None,
            "worker_peak": None,
            "store": None,
            "note": note,
        }
    ]
    print(f"[N={n:,}] images: {rows[0]['note']}, {gen_s:.0f} s", flush=True)
    train_rows = n - args.val_size
    commands = {
        "prepare": [
            [
                RCAT_RAY,
                "data",
                "prepare",
                "--data",
                "imagenet",
                "--data-root",
                str(root),
                "--split",
                "test",
                "--store",
                str(store),
                "--rows-per-group",
                str(args.chunk_size),
                "--json",
            ],
            [
                RCAT_RAY,
                "data",
                "prepare",
                "--config",
                str(paths["finetune"]),
                "--store",
                str(store),
                "--rows-per-group",
                "16",
                "--json",
            ],
        ],
        "evaluate": [[RCAT_RAY, "evaluate", "--config", str(paths["evaluate"]), "--json"]],
        "finetune": [[RCAT_RAY, "finetune", "--config", str(paths["finetune"])]],
        "compare": [[RCAT_RAY, "compare", "--config", str(paths["compare"]), "--json"]],
        "nightly": [[RCAT_RAY, "nightly", "--config", str(paths["nightly"]), "--json"]],
    }
    for stage in STAGES[1:]:
        row = {
            "stage": stage,
            "n": n,
            "wall_s": 0.0,
            "cpu_s": 0.0,
            "returncode": 0,
            "driver_peak": 0,
            "worker_peak": None,
            "worker_title": None,
            "note": "",
        }
        notes = []
        for i, cmd in enumerate(commands[stage]):
            log = work / f"{stage}-{i}.log"
            m = run_measured(cmd, cwd=work, env=bench_env(), log=log)
            s = m.summary()
            row["wall_s"] += m.wall_s
            row["cpu_s"] += m.cpu_s
            row["driver_peak"] = max(row["driver_peak"], m.driver_peak)
            if s["worker_peak"] and s["worker_peak"] > (row["worker_peak"] or 0):
                row["worker_peak"], row["worker_title"] = s["worker_peak"], s["worker_title"]
            if m.returncode not in ((0, 1) if stage == "nightly" else (0,)):  # nightly: 1 = a gate failed
                row["returncode"], row["failed"] = m.returncode, True
                row["error"] = log.read_text()[-3000:]
                break
            row["returncode"] = max(row["returncode"], m.returncode)
            out = last_json(log)
            if stage == "prepare" and isinstance(out, dict):
                notes.append(f"{out.get('split')} {out.get('n_samples'):,} rows in {m.wall_s:.0f} s")
            elif stage in ("evaluate", "compare") and isinstance(out, dict | list):
                tables = out.get("tables", []) if isinstance(out, dict) else out
                notes.append(
                    ", ".join(
                        f"{t.get('model')}: {t.get('chunks_computed')} of {t.get('chunks')} chunks computed"
                        for t in tables
                        if isinstance(t, dict)
                    )
                )
            elif stage == "nightly" and isinstance(out, dict):
                notes.append(
                    f"{'passed' if out.get('passed') else 'failed'} (exit {m.returncode}); chunks computed: "
                    f"baseline {out.get('baseline', {}).get('chunks_computed')}, candidate "
                    f"{out.get('candidate', {}).get('chunks_computed')}"
                )
        if stage == "finetune" and row["returncode"] == 0:
            history = json.loads((work / "finetuned" / "rcat.json").read_text())["history"]
            reads = [
                w["bytes_read"] / (train_rows * ROW_NBYTES)
                for w in sorted(history[0]["workers"], key=lambda w: w["rank"])
            ]
            row["reads"] = reads
            row["epoch_s"] = history[0]["epoch_seconds"]
            notes.append(
                f"bytes read per worker / training set: {' / '.join(f'{r:.2f}' for r in reads)}; epoch "
                f"{history[0]['epoch_seconds']:.0f} s"
            )
            sets = sorted(p.name for p in (store / "samples").iterdir())
            notes.append(f"{len(sets)} sample sets in the store")
        row["idle_s"] = row["cpu_s"] / PARALLEL.get(stage, 1) if stage != "nightly" else row["cpu_s"]
        row["store"] = du(store)
        row["note"] = "; ".join(x for x in notes if x)
        rows.append(row)
        print(
            f"[N={n:,}] {stage}: exit {row['returncode']}, {row['wall_s']:.0f} s, driver {mib(row['driver_peak'])} "
            f"MiB, largest worker {mib(row['worker_peak'])} MiB ({short_title(row['worker_title'])}), "
            f"store {row['store'] / 2**30:.2f} GiB; {row['note']}",
            flush=True,
        )
        if row.get("failed"):
            print(row.get("error", "")[-2000:], file=sys.stderr)
            break
    return rows


#: stages whose work runs on both CPUs (2 actors or 2 Train workers); the others run in one process
PARALLEL = {"evaluate": 2, "finetune": 2, "compare": 2}


def estimate(rows: list[dict], target: int, key: str) -> tuple[float, dict[str, float], str]:
    """A rough estimate of the seconds at ``target`` images, per stage, from the largest size run below it: each
    command's start-up (taken as the ``nightly`` stage's, a command that starts Ray and attacks nothing; 3 s a
    ``data prepare``) plus the rest scaled linearly in N. Start-up work that grows with the worker count (Ray
    Train's worker group) counts as work, so it is an overestimate at small sizes, and an upper bound where
    ``--robust-samples`` caps the attacked images. ``key``: ``wall_s`` (at this machine's load) or ``idle_s``
    (CPU seconds of the process tree over the CPUs the stage can use: about what an idle machine would take)."""
    ok = [r for r in rows if not r.get("failed") and r["n"] < target]
    n = max(r["n"] for r in ok)
    at_n = {r["stage"]: r for r in ok if r["n"] == n}
    startup = at_n["nightly"][key] if "nightly" in at_n else 15.0
    per = {}
    for stage, r in at_n.items():
        fixed = {"images": 0.0, "prepare": 6.0 / PARALLEL.get(stage, 1)}.get(stage, startup)
        per[stage] = fixed + max(0.0, r[key] - fixed) * target / n
        if stage == "finetune" and r.get("epoch_s"):  # the epoch's own time, from the history, scales; the rest not
            per[stage] = min(per[stage], r["wall_s"] - r["epoch_s"] + r["epoch_s"] * target / n)
    return sum(per.values()), per, f"the {n:,}-image run scaled linearly"


def report(args, rows: list[dict], started: str, machine: str, wall: float) -> str:
    lines = [
        "## `bench/rehearsal.py`: 50,000 ImageNet-sized JPEGs through the real commands (issue 17.4)",
        "",
        f"Run {started} at commit `{git_commit()}` (`{' '.join(['bench/rehearsal.py', *sys.argv[1:]])}`), "
        f"{wall / 60:.0f} minutes in all; machine at the start: {machine}.",
        "",
        *(
            [
                f"**A smoke run at sizes {', '.join(f'{n:,}' for n in args.sizes)}, not the default 2,000 and 50,000"
                f" (the figures show that the script works, not how memory scales).**",
                "",
            ]
            if sorted(args.sizes) != [2000, 50000]
            else []
        ),
        f"Sizes {', '.join(f'{n:,}' for n in args.sizes)}: an ImageFolder of synthetic {args.px}-px JPEGs in "
        f"{args.classes} class folders (stored as 3x224x224 uint8 after resize 256 and centre crop 224); models "
        f"`{args.arch}` trained {args.old_steps} (old) and {args.new_steps} (new) Adam steps on 200 synthetic images; "
        f"Linf eps 4/255; evaluation APGD-CE x {args.n_iter} on the first "
        f"{f'{args.robust_samples:,}' if args.robust_samples else 'N'} images (clean predictions on all), chunk "
        f"{args.chunk_size}, {args.workers} actors, adversarial images not kept; fine-tune RCAT (0.5, 0.4) + "
        f"FGSM-RS, 1 epoch, {args.workers} Ray Train workers, global batch {args.batch_size}, train split = the "
        f"first N - {args.val_size} images, per-epoch validation {args.val_samples} images; compare old -> "
        f"fine-tuned with the report; nightly new (production) -> fine-tuned. Each stage is the `rcat-ray` "
        f"command in a subprocess; peak RSS is VmHWM read every 0.2 s (`bench/_measure.py`) of the `rcat-ray` "
        f"process (driver) and of the Ray workers below it (Ray's own system processes left out). Store: its "
        f"size on disk after the stage.",
        "",
        "| N | stage | wall s | driver peak MiB | largest worker peak MiB | that worker | store GiB | exit | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        title = short_title(r.get("worker_title"))
        store = "-" if r.get("store") is None else f"{r['store'] / 2**30:.2f}"
        lines.append(
            f"| {r['n']:,} | {r['stage']} | {r['wall_s']:.0f} | {mib(r['driver_peak'])} | "
            f"{mib(r['worker_peak'])} | {title} | {store} | {r['returncode']} | {r['note']} |"
        )
    sizes = sorted({r["n"] for r in rows})
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        lines += [
            "",
            f"What grew from {lo:,} to {hi:,} images ({hi / lo:.0f}x the data), value at {hi:,} / value at {lo:,}:",
            "",
            "| stage | driver peak | largest worker peak | wall time |",
            "|---|---|---|---|",
        ]
        by = {(r["stage"], r["n"]): r for r in rows}
        for stage in STAGES[1:]:
            a, b = by.get((stage, lo)), by.get((stage, hi))
            if not a or not b or a.get("failed") or b.get("failed"):
                continue
            d = b["driver_peak"] / a["driver_peak"]
            w = b["worker_peak"] / a["worker_peak"] if a["worker_peak"] and b["worker_peak"] else None
            lines.append(
                f"| {stage} | {d:.3f} ({mib(a['driver_peak'])} -> {mib(b['driver_peak'])} MiB) | "
                + ("-" if w is None else f"{w:.3f} ({mib(a['worker_peak'])} -> {mib(b['worker_peak'])} MiB)")
                + f" | {b['wall_s'] / max(a['wall_s'], 1e-9):.1f}x |"
            )
    total = {n: sum(r["wall_s"] for r in rows if r["n"] == n) for n in sizes}
    lines += ["", "Wall time in all: " + ", ".join(f"{total[n] / 60:.1f} min at {n:,}" for n in sizes) + "."]
    lines += [
        "",
        "CPU seconds per stage (the `rcat-ray` process and every process below it): "
        + ", ".join(f"{r['stage']} {r['cpu_s']:.0f}" + (f" at {r['n']:,}" if len(sizes) > 1 else "") for r in rows)
        + ".",
    ]
    if 50_000 not in sizes or min(sizes) < 50_000:
        for key, what in (
            ("wall_s", "from the wall times measured here"),
            ("idle_s", "from CPU time (CPU seconds over the CPUs the stage uses: an idle machine)"),
        ):
            est, per, how = estimate(rows, 50_000, key)
            parts = ", ".join(f"{k} {v / 60:.1f}" for k, v in per.items())
            lines += ["", f"Rough estimate at 50,000 {what}, {how}: {est / 60:.0f} min ({parts} min)."]
    for r in rows:
        if r.get("failed"):
            lines += [
                "",
                f"N={r['n']:,} {r['stage']} exited {r['returncode']}; the end of its output:",
                "",
                "```",
                r.get("error", "").strip()[-1500:],
                "```",
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[2000, 50000])
    p.add_argument("--keep", type=Path, default=None, help="keep (and reuse) the image folders, stores and logs here")
    p.add_argument("--px", type=int, default=256, help="JPEG side in pixels (>= 224)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--arch", default="tiny_convnet")
    p.add_argument("--n-iter", type=int, default=1)
    p.add_argument(
        "--robust-samples", type=int, default=5000, help="attack only the first N test images (0: all), as the paper"
    )
    p.add_argument("--old-steps", type=int, default=15, help="training steps of the old model (0: random weights)")
    p.add_argument("--new-steps", type=int, default=40, help="training steps of the new model (0: random weights)")
    p.add_argument("--chunk-size", type=int, default=250)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--val-samples", type=int, default=200)
    p.add_argument("--processes", type=int, default=None, help="image writers (default: one a CPU)")
    p.add_argument("--results", type=Path, default=REPO / "bench/results/rehearsal.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if min(args.sizes) <= args.val_size + args.batch_size:
        p.error(f"every size must exceed --val-size + --batch-size ({args.val_size + args.batch_size})")
    if args.px < 224:
        p.error("--px must be at least 224")

    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_line()
    t0 = time.perf_counter()
    keep = args.keep or Path(tempfile.mkdtemp(prefix="rehearsal-"))
    keep.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    try:
        for i, n in enumerate(sorted(args.sizes)):
            rows += run_size(args, n, keep)
            if any(r.get("failed") for r in rows):
                break
            later = sorted(args.sizes)[i + 1 :]
            if later:
                for key, what in (("wall_s", "at this machine's load"), ("idle_s", "on an idle machine")):
                    est, _, how = estimate(rows, later[-1], key)
                    print(f"estimate for N={later[-1]:,} {what} ({how}): {est / 60:.0f} min", flush=True)
            if not args.keep:
                shutil.rmtree(keep / f"run-{n}", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(keep, ignore_errors=True)
    text = report(args, rows, started, machine, time.perf_counter() - t0)
    print()
    print(text)
    if not args.no_write:
        write_section(args.results, "rehearsal", "# Rehearsal at ImageNet size\n\n" + text)
        print(f"written to {args.results}")
    return 1 if any(r.get("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
