"""Ratio 1 of ``eval_overhead.py`` for two commits, alternating: does a change make the small case slower?

Ratio 1 (a direct pyautoattack loop over a selection / the same selection through Ray Data with one worker)
swings by 10-15 % between runs on a small shared VM, so a ratio measured today cannot be compared with one
measured when an issue was filed. This script measures both commits in the same session instead: each is
exported with ``git archive`` into a temporary folder, and a fresh Python process per measurement imports that
tree's ``rcat_ray`` (``PYTHONPATH``) and times its direct loop and its one-worker Ray run once. The commits
alternate (A, B, A, B, ...), so a slow minute of the machine hits both.

The child works with the code before and after the streaming data path: before it, a plan held the decoded
split and the loaded model; after it, the model is loaded from its checkpoint and the rows read from the
selection's sample set (prepared once before the clock starts, as in real use).

    .venv/bin/python bench/eval_overhead_ab.py --base a4d250c~1 --head HEAD [--rounds 3] [--samples 3000]

Needs the bench models of ``eval_overhead.py`` in bench/out/models (that script trains them once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def child(samples: int) -> None:
    """One measurement with whatever ``rcat_ray`` is on the path; prints one JSON line."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    from rcat_ray.config import AttackConfig, ComputeConfig, DataConfig, ModelConfig
    from rcat_ray.core.attacks import chunk_seed, evaluate_chunk
    from rcat_ray.evaluate.config import EvaluateConfig
    from rcat_ray.evaluate.run import prepare, run_evaluate

    checkpoints = sorted((HERE / "out" / "models").glob("bench-new-*.pt"))
    if not checkpoints:
        raise SystemExit(f"no bench-new checkpoint in {HERE / 'out' / 'models'}: run bench/eval_overhead.py once")
    model = ModelConfig(source="checkpoint", name="new", path=str(checkpoints[0]))
    data = DataConfig(name="fashion_mnist", split="test", limit=samples)
    attack = AttackConfig(eps=0.1, attacks=("apgd-ce", "apgd-dlr"), n_iter=50)

    def settings(store: Path, workers: int, limit: int | None = None) -> EvaluateConfig:
        d = data if limit is None else data.model_copy(update={"limit": limit})
        compute = ComputeConfig(num_workers=workers, cpus_per_worker=1.0, threads_per_worker=1)
        return EvaluateConfig(data=d, attack=attack, chunk_size=125, store=str(store), compute=compute, models=(model,))

    torch.set_num_threads(2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    tmp = Path(tempfile.mkdtemp(prefix="rcat-ab-"))
    try:
        run_evaluate(settings(tmp / "warm", 2, limit=50))  # Ray workers and imports, outside the timings
        prepare(settings(tmp / "ray1", 1), [model])  # the sample set, where this tree has one
        prep = prepare(settings(tmp / "direct", 1), [model])
        plan = prep.plans[0]
        if hasattr(plan, "split"):  # before the streaming data path
            module, split = plan.model.module, plan.split
        else:
            from rcat_ray.core.models import load_reference

            module, split = load_reference(plan.model).module, prep.samples.to_split()
        torch.set_num_threads(1)
        t = time.perf_counter()
        for c in plan.chunks():
            sl = slice(c.start, c.stop)
            evaluate_chunk(
                module,
                split.images[sl],
                split.labels[sl],
                split.sample_ids[sl],
                attack,
                num_classes=10,
                seed=chunk_seed(attack.seed, c.chunk_id),
            )
        direct = time.perf_counter() - t
        torch.set_num_threads(2)
        t = time.perf_counter()
        run_evaluate(settings(tmp / "ray1", 1))
        ray1 = time.perf_counter() - t
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print("RESULT " + json.dumps({"direct": direct, "ray1": ray1}), flush=True)


def export(rev: str, dest: Path) -> str:
    """The tree of ``rev`` in ``dest``; returns the commit it resolved to."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def measure(tree: Path, samples: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--samples", str(samples)]
    # run in the tree: Ray puts the driver's working directory first on its workers' import path, so from
    # anywhere else the actors could import another tree's rcat_ray than the driver's
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    results = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not results:
        raise SystemExit(f"measurement of {tree} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(results[-1].removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--base",
        default="a4d250c~1",
        help="the commit measured first in each round (default: the last commit before the streaming data path)",
    )
    ap.add_argument("--head", default="HEAD")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.samples)
        return
    work = Path(tempfile.mkdtemp(prefix="rcat-ab-trees-"))
    try:
        trees = {}
        for label, rev in (("base", args.base), ("head", args.head)):
            commit = export(rev, work / label)
            trees[label] = (commit, work / label)
        rows = []
        for r in range(args.rounds):
            for label, (commit, tree) in trees.items():
                m = measure(tree, args.samples)
                rows.append((r + 1, label, commit, m["direct"], m["ray1"]))
                print(
                    f"round {r + 1} {label} {commit}: direct {m['direct']:6.1f} s, Ray 1 worker {m['ray1']:6.1f} s, "
                    f"ratio {m['direct'] / m['ray1']:5.2f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nratio 1 (direct / Ray Data 1 worker), {args.samples} samples, {args.rounds} alternating rounds:")
    for label, (commit, _) in trees.items():
        ratios = [d / r for _, lab, _, d, r in rows if lab == label]
        print(
            f"  {label} {commit}: median {statistics.median(ratios):5.2f}  "
            f"(each: {', '.join(f'{x:.2f}' for x in ratios)})"
        )


if __name__ == "__main__":
    main()
