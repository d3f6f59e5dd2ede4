"""Memory and throughput of a streamed evaluation as the dataset grows (issue "Data that streams").

Synthetic ImageNet-shaped samples (3x224x224 uint8, 10 classes) are written directly as a sample set in a
result store, at the location an ImageNet selection of that size would use (the set is the data plane under
test; decoding JPEGs would only make the preparation slower). Each size is then evaluated by a fresh driver
process (``--child``) with a tiny model (``tiny_convnet``) and a short attack, so that reading and decoding the
chunks is a visible part of the work. Printed per size:

* driver peak RSS (VmHWM of the driver process: ``prepare`` + the evaluation + assembling the table);
* actor peak RSS (the largest VmHWM any chunk manifest records) and its growth over a bare actor that imported
  the same modules and built the model, in chunks of float32 images;
* samples/s per worker at steady state (over the middle 80 % of the finished chunks, and never the first two:
  actor start-up and the first model load excluded) and end to end.

Targets: driver peak +<=10 % from the smallest to the largest size; actor growth at most the model plus 4 chunks
of images (the attack's own working set on a chunk is printed beside it: it scales with ``chunk_size``, not
with the dataset); steady-state samples/s per worker within 5 % across sizes.

    .venv/bin/python bench/scale_memory.py [--sizes 1000,4000,16000] [--chunk-size 64] [--workers 1]
                                           [--n-iter 3] [--chunks-in-flight 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
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


def write_set(store: Path, root: Path, n: int, rows_per_group: int) -> str:
    """The synthetic set, written by ``prepare_samples`` itself (layout, hashes, fingerprints) from a generator
    of row groups in place of the JPEG decoder; returns its location in the store."""
    from rcat_ray.core import samples

    cfg = data_config(root, n)
    location = samples.samples_location(str(store), cfg)
    selection = json.loads(json.dumps(samples._selection(cfg)))
    info = samples.SampleSetInfo(
        dataset="imagenet", split="test", shape=SHAPE, dtype="uint8", scale=255.0, num_classes=N_CLASSES,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,4000,16000", help="comma-separated sample counts")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--n-iter", type=int, default=3)
    ap.add_argument("--chunks-in-flight", type=int, default=2)
    ap.add_argument("--keep", help="keep the stores (sets and tables) in this folder")
    ap.add_argument("--child", type=int, dest="n", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.n is not None:
        child(args)
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rcat-scale-"))
    root = base / "imagenet-root"  # only names the selection: the set is written directly
    rows = []
    try:
        for n in sizes:
            store = base / f"store-{n}"
            t = time.perf_counter()
            write_set(store, root, n, args.chunk_size)
            prep_s = time.perf_counter() - t
            cmd = [sys.executable, __file__, "--child", str(n), "--store", str(store), "--root", str(root),
                   "--chunk-size", str(args.chunk_size), "--workers", str(args.workers), "--n-iter", str(args.n_iter),
                   "--chunks-in-flight", str(args.chunks_in_flight)]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if out.returncode:
                sys.exit(f"size {n} failed:\n{out.stderr[-4000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["prep_s"] = prep_s
            rows.append(row)
            print(f"  {n}: prepared in {prep_s:.0f} s, evaluated in {row['total_s']:.0f} s", flush=True)
            if not args.keep:
                shutil.rmtree(store, ignore_errors=True)
        work = attack_working_set(args.chunk_size, args.n_iter)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    mib = 2**20
    chunk_bytes = args.chunk_size * int(np.prod(SHAPE)) * 4
    from rcat_ray.core.models import build_architecture

    model = build_architecture("tiny_convnet", num_classes=N_CLASSES, input_shape=SHAPE)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"\n{'/'.join(ATTACKS)} x {args.n_iter} iterations, tiny_convnet, chunk {args.chunk_size}, "
          f"{args.workers} worker(s), {args.chunks_in_flight} chunks in flight; one chunk of float32 images = "
          f"{chunk_bytes / mib:.1f} MiB; model {model_bytes / 1024:.1f} KiB; attack working set of one chunk "
          f"(in-process) {work / mib:.0f} MiB = {work / chunk_bytes:.1f} chunks")  # fmt: skip
    head = ("samples", "driver peak MiB", "actor peak MiB", "actor growth MiB", "growth/chunk", "read growth MiB",
            "steady samples/s/worker", "e2e samples/s/worker")  # fmt: skip
    print(" | ".join(head))
    for r in rows:
        growth = r["actor_peak"] - r["actor_baseline"]
        print(f"{r['n']:>7} | {r['driver_peak'] / mib:15.0f} | {r['actor_peak'] / mib:14.0f} | {growth / mib:16.0f} | "
              f"{growth / chunk_bytes:12.1f} | {r['read_growth'] / mib:15.0f} | {r['steady_per_worker']:23.1f} | "
              f"{r['e2e_per_worker']:20.1f}")  # fmt: skip
    first, last = rows[0], rows[-1]
    print(f"\nratios {last['n']} / {first['n']}: driver peak {last['driver_peak'] / first['driver_peak']:.3f} "
          f"(target <= 1.10), actor peak {last['actor_peak'] / first['actor_peak']:.3f}, steady samples/s per worker "
          f"{last['steady_per_worker'] / first['steady_per_worker']:.3f} (target 0.95..1.05)")  # fmt: skip
    worst = max(r["actor_peak"] - r["actor_baseline"] for r in rows)
    print(f"actor growth {worst / mib:.0f} MiB vs model + 4 chunks = {(model_bytes + 4 * chunk_bytes) / mib:.0f} MiB "
          f"(+ attack working set {work / mib:.0f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()
