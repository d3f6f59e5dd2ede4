"""Peak memory of the real commands as the dataset grows (issue 17, point 2): is the driver's memory flat in N?

For each size N (``--sizes``, default 1,000 and 16,000), on a fresh source and a fresh result store each time,
with nothing patched (the measured processes are the ``rcat-ray`` commands themselves, as a user runs them):

1. the source files are written: a ``tensors`` ``.npz`` of N synthetic 3x96x96 uint8 images with labels (the
   case issue 17 measured: the driver peaked at 1,153 MB for 500 images and 3,446 MB for 6,000), written
   block by block as ``np.savez`` lays it out (an uncompressed zip of ``images.npy`` and ``labels.npy``); with
   ``--imagenet`` also an ImageFolder of N small JPEGs (64 px, so preparation resizes them to 256 and crops
   224: 3x224x224 samples), ``val/`` for the test split and ``train`` a link to it;
2. the commands run as subprocesses, each on a store of its own (so each pays its own first preparation):

   * ``rcat-ray evaluate`` of ``builtin:ARCH`` on the test split (the whole file: N rows), APGD-CE with
     ``--n-iter`` iterations (1), ``--chunk-size`` 250, ``--eval-workers`` actors (1, as in the issue);
   * ``rcat-ray finetune --config`` (RCAT, FGSM-RS, one epoch, ``--workers`` 2 Ray Train workers, global batch
     128) of two ARCH checkpoints with random weights written by the project's ``save_checkpoint``, on the train
     split (the first N - ``--val-size`` rows) with per-epoch validation on ``--val-samples`` rows of the val
     tail;
   * ``rcat-ray sweep --config``: a 2-trial grid (AT at two learning rates), one epoch, trials of
     ``--sweep-workers`` Ray Train workers, the finished trials judged on ``--val-samples`` val rows (sizes
     ``--sweep-sizes``, default the same as ``--sizes``);

3. while each command runs, ``bench/_measure.py`` reads VmHWM (peak RSS) from ``/proc/<pid>/status`` every 0.2 s
   for the command's own process (the driver) and for every process descending from it (the local Ray instance
   it starts: Ray's system processes and its workers; Ray instances of other programs are not counted).

Printed and written to ``bench/results/streaming.md`` (the section between the ``scale_memory`` markers;
``--results`` names another file, ``--no-write`` writes none): per source, command and N the driver's peak
RSS, the largest Ray worker's peak RSS (and what that worker was), the wall time, and for ``finetune`` (and the
sweep's trials) the bytes each worker read in the epoch as a fraction of the training set's stored bytes (the
history's ``workers[*].bytes_read``); then the ratios of the largest N to the smallest: driver peak (target
<= 1.10 for evaluate and finetune) and largest worker peak.

    .venv/bin/python bench/scale_memory.py                        # 1,000 and 16,000, tensors .npz
    .venv/bin/python bench/scale_memory.py --imagenet             # also an ImageFolder of JPEGs
    .venv/bin/python bench/scale_memory.py --sizes 300,600 --sweep-sizes 300 --no-write    # a smoke run

Time (estimated from smoke runs on a loaded machine): the defaults take about 20 minutes on an idle 2-CPU
machine (the 16,000-image sweep, two one-epoch trials on 2 workers each, is about half of it; ``--sweep-sizes
1000,4000`` shortens it); ``--imagenet`` adds about 25-30 minutes (every one of the 224-px images is attacked
and decoded from JPEG). ``--repeats 3`` runs everything three times, sizes interleaved, and the ratios use the
medians: the driver's peak of one fine-tune varied by ~100 MiB between identical runs (775-874 MiB at 400
images), the size of the 10 % band.

Other options: ``--commands evaluate,finetune,sweep``, ``--arch small_cnn`` (tensors), ``--imagenet-arch
tiny_convnet``, ``--eval-workers 1``, ``--workers 2``, ``--sweep-workers 2``, ``--keep DIR`` (keep every source,
store and log, ``<command>.log`` beside each store; otherwise a temporary folder is removed).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import (
    bench_env,
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
N_CLASSES = 10
TENSOR_SHAPE = (3, 96, 96)
IMAGENET_SHAPE = (3, 224, 224)


# -- sources ------------------------------------------------------------------------------------------
def synthetic_block(lo: int, hi: int, shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [lo, hi) of a synthetic set (each row the same however the rows are blocked): a class-coloured
    gradient with noise, label = row mod N_CLASSES."""
    labels = np.arange(lo, hi, dtype=np.int64) % N_CLASSES
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    images = np.empty((hi - lo, c, h, w), dtype=np.uint8)
    for j, y in enumerate(labels):
        base = np.stack([(xx * (y + 1) + yy) % 256, (yy * 2 + 25 * y) % 256, (xx + yy * y) % 256][:c])
        noise = np.random.default_rng((seed, lo + j)).integers(-12, 13, size=base.shape)
        images[j] = np.clip(base + noise, 0, 255).astype(np.uint8)
    return images, labels


def write_npz(path: Path, n: int, shape: tuple[int, int, int] = TENSOR_SHAPE, seed: int = 0) -> None:
    """A ``tensors`` file as ``np.savez(path, images=..., labels=...)`` writes it, block by block (this process
    never holds the N images)."""
    labels = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        with z.open("images.npy", "w", force_zip64=True) as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": (n, *shape)}
            np.lib.format.write_array_header_1_0(f, header)
            for lo in range(0, n, 512):
                images, y = synthetic_block(lo, min(n, lo + 512), shape, seed)
                f.write(images.tobytes())
                labels.append(y)
        buf = io.BytesIO()
        np.save(buf, np.concatenate(labels))
        z.writestr("labels.npy", buf.getvalue())


# -- configs ------------------------------------------------------------------------------------------
def data_section(source: str, where: Path, split: str, val_size: int) -> dict:
    if source == "tensors":
        return {"name": "tensors", "path": str(where), "split": split, "val_size": val_size}
    return {"name": "imagenet", "root": str(where), "split": split, "val_size": val_size}


def finetune_section(args, source: str, where: Path, parents: tuple[Path, Path], work: Path, workers: int) -> dict:
    attack = {"eps": EPS, "attacks": ["apgd-ce"], "n_iter": args.n_iter}
    return {
        "old": {"source": "checkpoint", "path": str(parents[0])},
        "new": {"source": "checkpoint", "path": str(parents[1])},
        "data": data_section(source, where, "train", args.val_size),
        "loss": {"kind": "rcat", "alpha": 0.5, "beta": 0.4},
        "train_attack": {"kind": "fgsm-rs", "eps": EPS},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "epochs": 1,
        "batch_size": args.batch_size,
        "validation": {"samples": args.val_samples, "attack": attack},
        "compute": {"num_workers": workers, "threads_per_worker": 1},
        "max_failures": 0,
        "store": str(work / "store"),
        "storage": str(work / "ray_results"),
        "out": str(work / "out"),
    }


def sweep_config(args, source: str, where: Path, parents: tuple[Path, Path], work: Path) -> dict:
    base = finetune_section(args, source, where, parents, work, args.sweep_workers)
    base["loss"] = {"kind": "at"}
    if args.sweep_workers > 1:  # a trial's own 0.01 CPU beside its workers must fit the local Ray's CPUs
        base["compute"]["cpus_per_worker"] = 0.99
    return {
        "base": base,
        "mode": "grid",
        "space": {"losses": ["at"], "lr": [0.01, 0.001]},
        "asha": {"enabled": False},
        "cpus_per_trial": 1,
        "choice": {"samples": args.val_samples, "attack": base["validation"]["attack"], "chunk_size": 100},
        "compute": {"num_workers": 1, "threads_per_worker": 1},
        "name": "scale-sweep",
        "storage": str(work / "ray_results"),
        "out": str(work / "sweep-out"),
        "bootstrap": {"n_resamples": 200},
    }


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# -- one command --------------------------------------------------------------------------------------
def epoch_reads(manifest: Path, train_bytes: int) -> list[list[float]]:
    """Per epoch, each worker's bytes_read as a fraction of the training set's stored bytes."""
    history = json.loads(manifest.read_text()).get("history", [])
    return [[w["bytes_read"] / train_bytes for w in sorted(e["workers"], key=lambda w: w["rank"])] for e in history]


def run_command(args, source: str, command: str, n: int, where: Path, parents, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    row_nbytes = int(np.prod(TENSOR_SHAPE if source == "tensors" else IMAGENET_SHAPE))
    log = work / f"{command}.log"
    arch = args.arch if source == "tensors" else args.imagenet_arch
    if command == "evaluate":
        data = (
            ["--data", "tensors", "--data-path", str(where)]
            if source == "tensors"
            else ["--data", "imagenet", "--data-root", str(where)]
        )
        cmd = [
            RCAT_RAY,
            "evaluate",
            *data,
            "--model",
            f"builtin:{arch}",
            "--eps",
            str(EPS),
            "--attacks",
            "apgd-ce",
            "--n-iter",
            str(args.n_iter),
            "--chunk-size",
            str(args.chunk_size),
            "--workers",
            str(args.eval_workers),
            "--threads-per-worker",
            "1",
            "--store",
            str(work / "store"),
            "--json",
        ]
    elif command == "finetune":
        cfg = finetune_section(args, source, where, parents, work, args.workers)
        cfg["output"] = str(work / "out" / "finetuned.pt")
        cmd = [RCAT_RAY, "finetune", "--config", str(write_yaml(work / "finetune.yaml", cfg))]
    else:
        cfg = sweep_config(args, source, where, parents, work)
        cmd = [RCAT_RAY, "sweep", "--config", str(write_yaml(work / "sweep.yaml", cfg))]
    m = run_measured(cmd, cwd=work, env=bench_env(), log=log)
    row = {"source": source, "command": command, "n": n, **m.summary(), "log": str(log)}
    if m.returncode != 0:
        row["error"] = log.read_text()[-3000:]
        return row
    train_rows = n - args.val_size
    if command == "finetune":
        row["reads"] = epoch_reads(work / "out" / "finetuned.json", train_rows * row_nbytes)
        row["train_rows"] = train_rows
    elif command == "sweep":
        row["reads"] = [
            epoch_reads(p, train_rows * row_nbytes) for p in sorted((work / "sweep-out" / "trials").glob("*.json"))
        ]
        row["train_rows"] = train_rows
    return row


# -- output -------------------------------------------------------------------------------------------
def reads_text(row: dict) -> str:
    reads = row.get("reads")
    if not reads:
        return "-"
    if row["command"] == "sweep":  # per trial, its one epoch
        return "; ".join("/".join(f"{f:.2f}" for f in trial[0]) for trial in reads if trial)
    return "; ".join("/".join(f"{f:.2f}" for f in epoch) for epoch in reads)


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| source | command | N | run | driver peak MiB (at s) | largest worker peak MiB | that worker | wall s | "
        "CPU s | bytes read per worker / training set | exit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        at = "" if r.get("driver_peak_at_s") is None else f" ({r['driver_peak_at_s']:.0f})"
        lines.append(
            f"| {r['source']} | {r['command']} | {r['n']:,} | {r['rep'] + 1} | {mib(r['driver_peak'])}{at} | "
            f"{mib(r['worker_peak'])} | {short_title(r.get('worker_title'))} | {r['wall_s']:.0f} | "
            f"{r['cpu_s']:.0f} | {reads_text(r)} | {r['returncode']} |"
        )
    return lines


def _median(values: list[float]) -> float:
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def ratios(rows: list[dict]) -> list[str]:
    """Per source and command, the peaks at the largest N over those at the smallest (medians over the runs)."""
    out = []
    for source in dict.fromkeys(r["source"] for r in rows):
        for command in dict.fromkeys(r["command"] for r in rows):
            done = [r for r in rows if r["source"] == source and r["command"] == command and r["returncode"] == 0]
            ns = sorted({r["n"] for r in done})
            if len(ns) < 2:
                continue
            lo, hi = ns[0], ns[-1]

            def med(key: str, n: int, done: list[dict] = done) -> float | None:
                values = [r[key] for r in done if r["n"] == n and r[key]]
                return _median(values) if values else None

            d = med("driver_peak", hi) / med("driver_peak", lo)
            w_lo, w_hi = med("worker_peak", lo), med("worker_peak", hi)
            w = f"{w_hi / w_lo:.3f} ({mib(w_lo)} -> {mib(w_hi)} MiB)" if w_lo and w_hi else "-"
            runs = len([r for r in done if r["n"] == hi])
            target = ""
            if command in ("evaluate", "finetune"):
                target = f" (target <= 1.10: {'met' if d <= 1.10 else 'NOT met'})"
            of = f", medians of {runs} runs" if runs > 1 else ""
            out.append(
                f"- {source} {command}: driver peak {hi:,} / {lo:,} = {d:.3f} ({mib(med('driver_peak', lo))} "
                f"-> {mib(med('driver_peak', hi))} MiB{of}){target}; largest worker peak {w}"
            )
    return out


def report(args, rows: list[dict], started: str, machine: str, wall: float) -> str:
    commit = git_commit()
    sizes = ", ".join(f"{n:,}" for n in args.sizes)
    lines = [
        "## `bench/scale_memory.py`: peak memory of the real commands (issue 17.2)",
        "",
        f"Run {started} at commit `{commit}` (`{' '.join(['bench/scale_memory.py', *sys.argv[1:]])}`), "
        f"{wall / 60:.0f} minutes; machine at the start: {machine}.",
        "",
        *(
            [
                f"**A smoke run at sizes {', '.join(f'{n:,}' for n in args.sizes)}, not the default 1,000 and 16,000"
                f" (the figures show that the script works, not how memory scales).**",
                "",
            ]
            if sorted(args.sizes) != [1000, 16000]
            else []
        ),
        f"Sizes {sizes} (sweep: {', '.join(f'{n:,}' for n in args.sweep_sizes)}); each size on a fresh source and each "
        f"command on a fresh store, the commands run as subprocesses exactly as a user types them. Sources: "
        f"`tensors` = an uncompressed `.npz` of 3x96x96 uint8 images"
        + (", `imagenet` = an ImageFolder of 64-px JPEGs (stored as 3x224x224)" if args.imagenet else "")
        + f". Models `{args.arch}` (tensors)"
        + (f", `{args.imagenet_arch}` (imagenet)" if args.imagenet else "")
        + " with random weights, Linf eps 4/255. evaluate: test split (all N rows), APGD-CE x "
        f"{args.n_iter}, chunk {args.chunk_size}, {args.eval_workers} actor(s). finetune: RCAT (0.5, 0.4) + FGSM-RS, "
        f"1 epoch, {args.workers} Ray Train workers, global batch {args.batch_size}, train split = first N - "
        f"{args.val_size} rows, per-epoch validation {args.val_samples} rows. sweep: AT at lr 0.01 and 0.001, 1 "
        f"epoch, {args.sweep_workers} worker(s) per trial, judged on {args.val_samples} val rows.",
        "",
        "Peak RSS = VmHWM from `/proc/<pid>/status`, read every 0.2 s (`bench/_measure.py`): the driver is the "
        "`rcat-ray` process; workers are the Ray worker processes below it (Ray's own system processes, GCS, "
        "raylet, dashboard and agents, are left out of the worker column). Bytes read per worker: the "
        "fine-tune's history, `workers[*].bytes_read` of the epoch over the training set's stored bytes "
        "(rank 0/rank 1; for the sweep, per trial).",
        "",
        *table(rows),
        "",
        *ratios(rows),
    ]
    failed = [r for r in rows if r["returncode"] != 0]
    for r in failed:
        lines += [
            "",
            f"{r['source']} {r['command']} N={r['n']:,} exited {r['returncode']}; the end of its output:",
            "",
            "```",
            r.get("error", "").strip()[-1500:],
            "```",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sizes = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--sizes", type=sizes, default=[1000, 16000])
    p.add_argument("--sweep-sizes", type=sizes, default=None, help="default: --sizes")
    p.add_argument("--commands", default="evaluate,finetune,sweep")
    p.add_argument("--imagenet", action="store_true", help="also an ImageFolder of small JPEGs")
    p.add_argument("--arch", default="small_cnn", help="the models of the tensors source (96 px)")
    p.add_argument("--imagenet-arch", default="tiny_convnet", help="the models of the ImageFolder source (224 px)")
    p.add_argument("--n-iter", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=250)
    p.add_argument("--eval-workers", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--sweep-workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--val-size", type=int, default=200)
    p.add_argument("--val-samples", type=int, default=100)
    p.add_argument("--repeats", type=int, default=1, help="runs of each command and size (sizes interleaved)")
    p.add_argument("--keep", type=Path, default=None, help="keep sources, stores and logs in this folder")
    p.add_argument("--results", type=Path, default=REPO / "bench/results/streaming.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    args.sweep_sizes = args.sweep_sizes or args.sizes
    commands = [c for c in args.commands.split(",") if c]
    if min(args.sizes + args.sweep_sizes) <= args.val_size:
        p.error(f"every size must exceed --val-size {args.val_size}")

    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_line()
    t_all = time.perf_counter()
    base = args.keep or Path(tempfile.mkdtemp(prefix="scale-memory-"))
    base.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    try:
        sources = ["tensors", *(["imagenet"] if args.imagenet else [])]
        for source in sources:
            shape = TENSOR_SHAPE if source == "tensors" else IMAGENET_SHAPE
            arch = args.arch if source == "tensors" else args.imagenet_arch
            parents = write_parents(base / f"parents-{source}", arch, shape, N_CLASSES)
            for rep, n in [
                (rep, n) for rep in range(args.repeats) for n in sorted(set(args.sizes) | set(args.sweep_sizes))
            ]:
                folder = base / f"{source}-{n}-run{rep + 1}"
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                t = time.perf_counter()
                if source == "tensors":
                    where = folder / "set.npz"
                    write_npz(where, n)
                else:
                    where = folder / "imagefolder"
                    write_image_folder(where / "val", n, size=64, classes=N_CLASSES)
                    (where / "train").symlink_to("val")
                print(f"[{source} N={n:,}] source written in {time.perf_counter() - t:.0f} s", flush=True)
                for command in commands:
                    if n not in (args.sweep_sizes if command == "sweep" else args.sizes):
                        continue
                    row = run_command(args, source, command, n, where, parents, folder / command)
                    row["rep"] = rep
                    rows.append(row)
                    print(
                        f"[{source} N={n:,}] {command}: exit {row['returncode']}, {row['wall_s']:.0f} s, driver "
                        f"{mib(row['driver_peak'])} MiB, largest worker {mib(row['worker_peak'])} MiB "
                        f"({short_title(row.get('worker_title'))}), reads {reads_text(row)}",
                        flush=True,
                    )
                    if row["returncode"]:
                        print(row.get("error", "")[-2000:], file=sys.stderr)
                if not args.keep:
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    text = report(args, rows, started, machine, time.perf_counter() - t_all)
    print()
    print(text)
    if not args.no_write:
        write_section(args.results, "scale_memory", text)
        print(f"written to {args.results}")
    return 1 if any(r["returncode"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
