"""Memory and throughput of a streamed evaluation and fine-tune as the dataset grows (issue "Data that streams").

Synthetic ImageNet-shaped samples (3x224x224 uint8, 10 classes) are written directly as sample sets in a result
store, at the locations an ImageNet selection of that size would use (the set is the data plane under test;
decoding JPEGs would only make the preparation slower).

Evaluation (``--eval``, on by default). Each size is evaluated by a fresh driver process (``--child``) with a tiny
model (``tiny_convnet``) and a short attack, so that reading and decoding the chunks is a visible part of the
work. Printed per size:

* driver peak RSS (VmHWM of the driver process: ``prepare`` + the evaluation + assembling the table);
* actor peak RSS (the largest VmHWM any chunk manifest records) and its growth over a bare actor that imported
  the same modules and built the model, in chunks of float32 images;
* samples/s per worker at steady state (over the middle 80 % of the finished chunks, and never the first two:
  actor start-up and the first model load excluded) and end to end.

Training (``--train``, on by default). For each size the training selection (the ``train`` split, ``limit`` =
size, at the layout ``rcat_ray.distributed.train.training_samples`` uses) and the validation subset the
fine-tune reads (``validation_data``: the head of the ``val`` split) are written the same way, and a fresh driver
process (``--train-child``) runs one epoch of ``run_finetune`` on one Ray Train worker: ``tiny_convnet`` old and
new checkpoints, RCAT with an FGSM-RS training attack, a small validation subset. The fine-tune finds both sets in
the store, so it never decodes an ImageNet folder. A thread of that driver reads VmHWM from
``/proc/<pid>/status`` every 0.2 s for every ``RayTrainWorker`` process that descends from it (other Ray
clusters on the machine are ignored); the worker is the pid the fine-tune's history records. Printed per size:
the worker's peak RSS and its growth over the smallest size, the rows the worker read in the epoch (the whole
training set), and the epoch's samples/s (training only, as the history's ``epoch_seconds``). The worker keeps
at most ``read_cache_mib`` (256 MiB) of decoded row groups: a set that fits (1,783 rows of 224 px, e.g. the
default 1,000) is shuffled fully and held whole until each group's last batch; a larger one is shuffled within
windows of row groups filling half the cache (``ShuffleWindow``), so it holds about one window (the table notes
which sizes fit).

Targets: driver peak +<=10 % from the smallest to the largest size; actor growth at most the model plus 4 chunks
of images (the attack's own working set on a chunk is printed beside it: it scales with ``chunk_size``, not
with the dataset); steady-state samples/s per worker within 5 % across sizes; the Train worker's peak +<=10 %
from the smallest to the largest size (independent of the training-set size).

    .venv/bin/python bench/scale_memory.py [--sizes 1000,4000,16000] [--chunk-size 64] [--workers 1]
                                           [--n-iter 3] [--chunks-in-flight 2] [--keep DIR]
                                           [--no-eval] [--no-train] [--batch-size 64] [--val-samples 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np

SHAPE = (3, 224, 224)
N_CLASSES = 10
ATTACKS = ("apgd-ce",)
EPS = 4 / 255
MIB = 2**20


def vm_hwm() -> int:
    """This process's peak resident set size in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def data_config(root: Path, n: int):
    from rcat_ray.config import DataConfig

    return DataConfig(name="imagenet", root=str(root), split="test", limit=n)


def write_set(store: Path, cfg, rows_per_group: int) -> str:
    """The synthetic set of the selection ``cfg`` (a DataConfig of ImageNet), written by ``prepare_samples``
    itself (layout, hashes, fingerprints) from a generator of row groups in place of the JPEG decoder, at the
    location the store keeps that selection's set (where ``samples_in_store`` finds it); returns that location."""
    from rcat_ray.core import samples

    n = cfg.limit
    location = samples.samples_location(str(store), cfg)
    selection = json.loads(json.dumps(samples._selection(cfg)))
    info = samples.SampleSetInfo(
        dataset="imagenet", split=cfg.split, shape=SHAPE, dtype="uint8", scale=255.0, num_classes=N_CLASSES,
        class_names=tuple(f"class{c}" for c in range(N_CLASSES)), preprocessing=dict(samples.IMAGENET_PREPROCESSING),
        selection=selection,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : SHAPE[1], 0 : SHAPE[2]]
    bases = np.stack([np.stack([(xx * (c + 1) + yy) % 256, (yy * 2 + 25 * c) % 256, (xx + yy * c) % 256])
                      for c in range(N_CLASSES)]).astype(np.int16)  # fmt: skip

    def groups(rpg: int):
        for lo in range(0, n, rpg):
            hi = min(n, lo + rpg)
            labels = np.arange(lo, hi) % N_CLASSES
            noise = rng.integers(-12, 13, size=(hi - lo, *SHAPE), dtype=np.int16)  # photos do not compress well
            yield np.arange(lo, hi, dtype=np.int64), labels, np.clip(bases[labels] + noise, 0, 255).astype(np.uint8)

    real = samples._open_source
    samples._open_source = lambda c, sel: samples._Source(info=info, groups=groups)
    try:
        samples.prepare_samples(cfg, location, rows_per_group=rows_per_group)
    finally:
        samples._open_source = real
    return location


def child(args: argparse.Namespace) -> None:
    """One evaluation in this (fresh) driver process; prints one JSON line of measurements."""
    import ray

    import rcat_ray.distributed.evaluate as ev
    from rcat_ray.config import AttackConfig, ComputeConfig, EvaluateConfig, ModelConfig
    from rcat_ray.workflows import prepare, run_evaluate

    finished: list[float] = []

    class Timed(ev.Progress):
        def update(self, n: int = 1, **kw) -> None:
            finished.extend([time.perf_counter()] * n)
            super().update(n, **kw)

    ev.Progress = Timed
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    model = ModelConfig(source="builtin", name="tiny_convnet", seed=0)

    cfg = EvaluateConfig(
        data=data_config(Path(args.root), args.n),
        attack=AttackConfig(eps=EPS, attacks=ATTACKS, n_iter=args.n_iter, seed=0),
        chunk_size=args.chunk_size, store=args.store, save_adversarial=False,
        compute=ComputeConfig(num_workers=args.workers, cpus_per_worker=1.0 if args.workers == 1 else 0.5,
                              threads_per_worker=1, chunks_in_flight=args.chunks_in_flight),
        models=(model,),
    )  # fmt: skip
    specs = [plan.spec() for plan in prepare(cfg, list(cfg.models)).plans]

    @ray.remote(num_cpus=0.5)
    def bare_actor(specs: list, store: str, chunk: int) -> tuple[int, int]:
        """An evaluation actor, built as Ray Data builds it, with its plan opened and its model loaded: the
        baseline of the actors' peak; then the peak after reading and decoding one chunk (the data path)."""
        import ray.data  # noqa: F401 - the map worker's own imports

        actor = ev.ChunkEvaluator(specs, {}, store, "cpu", 1, False)
        plan = actor._plan(0)
        actor.models.get(plan.model)
        baseline = vm_hwm()
        plan.samples.read_rows(0, chunk)
        return baseline, vm_hwm()

    baseline, after_read = ray.get(bare_actor.remote(specs, args.store, args.chunk_size))
    t0 = time.perf_counter()
    (outcome,), _ = run_evaluate(cfg)
    total = time.perf_counter() - t0
    chunks = Path(args.store) / f"tables/{outcome.key}/chunks"
    peaks = [json.loads(p.read_text())["memory"]["max_rss_bytes"] for p in chunks.glob("chunk-*.json")]
    ray.shutdown()
    # steady state: the middle of the run (chunks arrive at the driver in bursts, and the first ones carry the
    # actor's start-up and the first model load)
    lo, hi = max(2, len(finished) // 10), len(finished) - 1 - len(finished) // 10
    steady = (hi - lo) * args.chunk_size / (finished[hi] - finished[lo]) if hi > lo else None
    print(json.dumps({"n": args.n, "driver_peak": vm_hwm(), "actor_peak": max(peaks), "actor_baseline": baseline,
                      "read_growth": after_read - baseline,
                      "total_s": total, "steady_per_worker": steady / args.workers if steady else None,
                      "e2e_per_worker": args.n / total / args.workers, "chunks": outcome.chunks_computed}))  # fmt: skip


def finetune_config(work: Path, root: Path, parents: Path, n: int, batch_size: int, val_samples: int, n_iter: int):
    """One epoch of RCAT with FGSM-RS on the first ``n`` training samples, one Ray Train worker; the store, Ray
    Train's storage and the output in ``work``."""
    from rcat_ray.config import FinetuneConfig, parse_config

    return parse_config(FinetuneConfig, {
        "old": {"source": "checkpoint", "path": str(parents / "old.pt")},
        "new": {"source": "checkpoint", "path": str(parents / "new.pt")},
        "data": {"name": "imagenet", "root": str(root), "split": "train", "limit": n},
        "loss": {"kind": "rcat", "alpha": 0.5, "beta": 0.4},
        "train_attack": {"kind": "fgsm-rs", "eps": EPS},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "epochs": 1, "batch_size": batch_size,
        "validation": {"samples": val_samples, "attack": {"eps": EPS, "attacks": list(ATTACKS), "n_iter": n_iter}},
        "out": str(work / "out"), "storage": str(work / "ray_results"), "store": str(work / "store"),
        "num_workers": 1, "cpus_per_worker": 1.0, "threads_per_worker": 1, "max_failures": 0,
    })  # fmt: skip


def write_parents(folder: Path) -> None:
    """The old and new models: untrained ``tiny_convnet`` checkpoints (weights do not change the memory)."""
    import torch

    from rcat_ray.core.models import build_architecture, save_checkpoint

    for name, seed in (("old", 0), ("new", 1)):
        torch.manual_seed(seed)
        module = build_architecture("tiny_convnet", num_classes=N_CLASSES, input_shape=SHAPE)
        save_checkpoint(folder / f"{name}.pt", module, arch="tiny_convnet", num_classes=N_CLASSES, input_shape=SHAPE)


def write_training_sets(cfg) -> None:
    """The training selection and the validation subset, where (and with the layout) the fine-tune looks for them."""
    from rcat_ray.distributed import train

    rows = train.TRAIN_ROWS_PER_GROUP.get(cfg.data.name, train.DEFAULT_ROWS_PER_GROUP)
    write_set(Path(cfg.store), cfg.data, rows)
    write_set(Path(cfg.store), train.validation_data(cfg), train.DEFAULT_ROWS_PER_GROUP)


class ProcessPeaks(threading.Thread):
    """Peak RSS (VmHWM) of the processes that descend from this one and whose command line holds ``marker``
    (Ray sets a worker's process title to ``ray::<actor class>...``), read from /proc every ``every`` seconds.
    VmHWM only grows, so the last reading before a process exits is its peak (up to the last interval)."""

    def __init__(self, marker: bytes, every: float = 0.2):
        super().__init__(daemon=True)
        self.marker, self.every = marker, every
        self.peaks: dict[int, int] = {}
        self.titles: dict[int, str] = {}
        self._ours: dict[int, bool] = {os.getpid(): True}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.scan()

    def stop(self) -> None:
        self._done.set()
        self.join()

    def _descends(self, pid: int) -> bool:
        chain = []
        while pid not in self._ours:
            if pid <= 1:
                break
            chain.append(pid)
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                break
            pid = int(stat.rsplit(")", 1)[1].split()[1])  # the ppid (the name in parentheses may hold spaces)
        ours = self._ours.get(pid, False)
        self._ours.update(dict.fromkeys(chain, ours))
        return ours

    def scan(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if self.marker not in cmd or not self._descends(pid):
                    continue
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:  # gone meanwhile
                continue
            hwm = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0)
            self.peaks[pid] = max(self.peaks.get(pid, 0), hwm)
            self.titles[pid] = cmd.replace(b"\0", b" ").decode(errors="replace").strip()


def train_child(args: argparse.Namespace) -> None:
    """One fine-tuning epoch in this (fresh) driver process; prints one JSON line of measurements."""
    import ray

    from rcat_ray.distributed.train import run_finetune

    cfg = finetune_config(Path(args.work), Path(args.root), Path(args.parents), args.train_n, args.batch_size,
                          args.val_samples, args.n_iter)  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    watch = ProcessPeaks(b"RayTrainWorker")
    watch.start()
    t0 = time.perf_counter()
    outcome = run_finetune(cfg)
    total = time.perf_counter() - t0
    watch.stop()
    ray.shutdown()
    epoch = outcome.history[-1]
    workers = epoch["workers"]
    missing = [w["pid"] for w in workers if w["pid"] not in watch.peaks]
    if missing:
        raise RuntimeError(f"no reading of the Train worker(s) {missing}; seen: {watch.titles}")
    print(json.dumps({"n": args.train_n, "driver_peak": vm_hwm(), "total_s": total,
                      "worker_peak": max(watch.peaks[w["pid"]] for w in workers),
                      "rows_read": [w["rows_read"] for w in workers], "train_samples": epoch["train_samples"],
                      "epoch_s": epoch["epoch_seconds"],
                      "samples_per_s": epoch["train_samples"] / epoch["epoch_seconds"]}))  # fmt: skip


def attack_working_set(chunk_size: int, n_iter: int) -> int:
    """Peak RSS growth of one chunk's attack in a fresh process (no Ray, images already in memory)."""
    code = f"""
import json, torch
from bench.scale_memory import vm_hwm, SHAPE, N_CLASSES, ATTACKS, EPS
from rcat_ray.config import AttackConfig
from rcat_ray.core.attacks import evaluate_chunk
from rcat_ray.core.models import build_architecture
torch.set_num_threads(1)
m = build_architecture("tiny_convnet", num_classes=N_CLASSES, input_shape=SHAPE).eval()
x = torch.rand({chunk_size}, *SHAPE); y = torch.arange({chunk_size}) % N_CLASSES
cfg = AttackConfig(eps=EPS, attacks=ATTACKS, n_iter={n_iter}, seed=0)
before = vm_hwm()
evaluate_chunk(m, x, y, torch.arange({chunk_size}), cfg, num_classes=N_CLASSES, seed=0)
print(json.dumps(vm_hwm() - before))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def run_eval(args: argparse.Namespace, sizes: list[int], base: Path, root: Path) -> None:
    """The evaluation part: one fresh driver per size, then its table."""
    rows = []
    for n in sizes:
        store = base / f"store-{n}"
        t = time.perf_counter()
        write_set(store, data_config(root, n), args.chunk_size)
        prep_s = time.perf_counter() - t
        cmd = [sys.executable, __file__, "--child", str(n), "--store", str(store), "--root", str(root),
               "--chunk-size", str(args.chunk_size), "--workers", str(args.workers), "--n-iter", str(args.n_iter),
               "--chunks-in-flight", str(args.chunks_in_flight)]  # fmt: skip
        row = run_child(cmd, n)
        row["prep_s"] = prep_s
        rows.append(row)
        print(f"  {n}: prepared in {prep_s:.0f} s, evaluated in {row['total_s']:.0f} s", flush=True)
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)
    work = attack_working_set(args.chunk_size, args.n_iter)

    chunk_bytes = args.chunk_size * int(np.prod(SHAPE)) * 4
    from rcat_ray.core.models import build_architecture

    model = build_architecture("tiny_convnet", num_classes=N_CLASSES, input_shape=SHAPE)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"\nEvaluation: {'/'.join(ATTACKS)} x {args.n_iter} iterations, tiny_convnet, chunk {args.chunk_size}, "
          f"{args.workers} worker(s), {args.chunks_in_flight} chunks in flight; one chunk of float32 images = "
          f"{chunk_bytes / MIB:.1f} MiB; model {model_bytes / 1024:.1f} KiB; attack working set of one chunk "
          f"(in-process) {work / MIB:.0f} MiB = {work / chunk_bytes:.1f} chunks")  # fmt: skip
    head = ("samples", "driver peak MiB", "actor peak MiB", "actor growth MiB", "growth/chunk", "read growth MiB",
            "steady samples/s/worker", "e2e samples/s/worker")  # fmt: skip
    print(" | ".join(head))
    for r in rows:
        growth = r["actor_peak"] - r["actor_baseline"]
        steady = f"{r['steady_per_worker']:23.1f}" if r["steady_per_worker"] else f"{'-':>23}"
        print(f"{r['n']:>7} | {r['driver_peak'] / MIB:15.0f} | {r['actor_peak'] / MIB:14.0f} | {growth / MIB:16.0f} | "
              f"{growth / chunk_bytes:12.1f} | {r['read_growth'] / MIB:15.0f} | {steady} | "
              f"{r['e2e_per_worker']:20.1f}")  # fmt: skip
    first, last = rows[0], rows[-1]
    steady = (f"{last['steady_per_worker'] / first['steady_per_worker']:.3f}"
              if first["steady_per_worker"] and last["steady_per_worker"] else "-")  # fmt: skip
    print(f"\nratios {last['n']} / {first['n']}: driver peak {last['driver_peak'] / first['driver_peak']:.3f} "
          f"(target <= 1.10), actor peak {last['actor_peak'] / first['actor_peak']:.3f}, steady samples/s per worker "
          f"{steady} (target 0.95..1.05)")  # fmt: skip
    worst = max(r["actor_peak"] - r["actor_baseline"] for r in rows)
    print(f"actor growth {worst / MIB:.0f} MiB vs model + 4 chunks = {(model_bytes + 4 * chunk_bytes) / MIB:.0f} MiB "
          f"(+ attack working set {work / MIB:.0f} MiB)")  # fmt: skip


def run_train(args: argparse.Namespace, sizes: list[int], base: Path, root: Path) -> None:
    """The training part: one fresh driver per size running one fine-tuning epoch, then its table."""
    from rcat_ray.core.finetune import READ_CACHE_BYTES

    parents = base / "parents"
    parents.mkdir(parents=True, exist_ok=True)
    write_parents(parents)
    rows = []
    for n in sizes:
        work = base / f"train-{n}"
        cfg = finetune_config(work, root, parents, n, args.batch_size, args.val_samples, args.n_iter)
        t = time.perf_counter()
        write_training_sets(cfg)
        prep_s = time.perf_counter() - t
        cmd = [sys.executable, __file__, "--train-child", str(n), "--work", str(work), "--root", str(root),
               "--parents", str(parents), "--batch-size", str(args.batch_size), "--val-samples",
               str(args.val_samples), "--n-iter", str(args.n_iter)]  # fmt: skip
        row = run_child(cmd, n)
        rows.append(row)
        print(f"  {n}: training set prepared in {prep_s:.0f} s, fine-tuned (one epoch) in {row['total_s']:.0f} s "
              f"(epoch {row['epoch_s']:.0f} s)", flush=True)  # fmt: skip
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    cache_rows = READ_CACHE_BYTES // int(np.prod(SHAPE))  # uint8 rows
    print(f"\nTraining: one epoch of RCAT + FGSM-RS, tiny_convnet, global batch {args.batch_size}, 1 Ray Train "
          f"worker (1 thread), validation {args.val_samples} samples ({'/'.join(ATTACKS)} x {args.n_iter}); the "
          f"worker's read cache: {READ_CACHE_BYTES / MIB:.0f} MiB of row groups = {cache_rows} rows")  # fmt: skip
    head = ("samples", "train worker peak MiB", "growth vs smallest MiB", "rows read", "samples/s",
            "driver peak MiB")  # fmt: skip
    print(" | ".join(head))
    first, last = rows[0], rows[-1]
    for r in rows:
        growth = (r["worker_peak"] - first["worker_peak"]) / MIB
        read = "+".join(str(k) for k in r["rows_read"])
        print(f"{r['n']:>7} | {r['worker_peak'] / MIB:21.0f} | {growth:+22.0f} | {read:>9} | "
              f"{r['samples_per_s']:9.1f} | {r['driver_peak'] / MIB:15.0f}")  # fmt: skip
    print(f"\nratios {last['n']} / {first['n']}: train worker peak {last['worker_peak'] / first['worker_peak']:.3f} "
          f"(target <= 1.10: independent of the training-set size), samples/s "
          f"{last['samples_per_s'] / first['samples_per_s']:.3f}")  # fmt: skip
    small = [r["n"] for r in rows if r["n"] <= cache_rows]
    if small:
        print(f"note: sizes {small} fit the worker's read cache whole (fully shuffled, the set held whole); larger "
              f"ones are shuffled within windows of half the cache")  # fmt: skip


def run_child(cmd: list[str], n: int) -> dict:
    """Run one child driver; its measurements (the last line it prints)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        sys.exit(f"size {n} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,4000,16000", help="comma-separated sample counts")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--n-iter", type=int, default=3, help="attack iterations (evaluation and validation)")
    ap.add_argument("--chunks-in-flight", type=int, default=2)
    ap.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True, help="the evaluation part")
    ap.add_argument("--train", action=argparse.BooleanOptionalAction, default=True, help="the training part")
    ap.add_argument("--batch-size", type=int, default=64, help="the fine-tune's global batch")
    ap.add_argument("--val-samples", type=int, default=32, help="the fine-tune's validation subset")
    ap.add_argument("--keep", help="keep the stores (sets and tables) in this folder")
    ap.add_argument("--child", type=int, dest="n", help=argparse.SUPPRESS)
    ap.add_argument("--train-child", type=int, dest="train_n", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--parents", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.n is not None:
        child(args)
        return
    if args.train_n is not None:
        train_child(args)
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rcat-scale-"))
    root = base / "imagenet-root"  # only names the selection: the sets are written directly
    try:
        if args.eval:
            run_eval(args, sizes, base, root)
        if args.train:
            run_train(args, sizes, base, root)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
