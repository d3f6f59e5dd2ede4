"""Early stopping pays: the same sweep with and without ASHA, side by side (issue 4's benchmark).

Prints the wall time of each (target: with / without <= 0.5) and whether both pick the same trial
configuration under the choice rule. A random search of RCAT weights on the simplex, fine-tuning the
small CNN on a Fashion-MNIST slice; each trial trains in its Tune process (pattern A).

    .venv/bin/python bench/sweep_asha.py [--trials 8] [--epochs 6] [--samples 5000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray

from rcat_ray.config import parse_config
from rcat_ray.demo import train_or_load
from rcat_ray.finetune.pretrain import TrainRecipe
from rcat_ray.sweep.config import SweepConfig
from rcat_ray.sweep.run import run_sweep

OUT = Path(__file__).parent / "out"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--samples", type=int, default=5000)
    args = ap.parse_args()
    old = train_or_load(TrainRecipe(arch="mlp", epochs=2, train_samples=10_000, seed=0), OUT / "models", None, "sw-old")
    new = train_or_load(
        TrainRecipe(arch="small_cnn", epochs=2, train_samples=10_000, seed=1), OUT / "models", None, "sw-new"
    )
    tmp = Path(tempfile.mkdtemp(prefix="rcat-sweep-bench-"))

    def cfg(asha: bool) -> SweepConfig:
        return parse_config(
            SweepConfig,
            {
                "base": {
                    "old": {"source": "checkpoint", "name": "old", "path": str(old)},
                    "new": {"source": "checkpoint", "name": "new", "path": str(new)},
                    "data": {"name": "fashion_mnist", "split": "train", "limit": args.samples},
                    "train_attack": {"eps": 0.1},
                    "optimizer": {"lr": 0.01},
                    "epochs": args.epochs,
                    "batch_size": 128,
                    "validation": {"samples": 300, "attack": {"eps": 0.1, "attacks": ["apgd-ce"], "n_iter": 5}},
                    "compute": {"num_workers": 0, "threads_per_worker": 1},
                    "storage": str(tmp / "ft"),
                    "store": str(tmp / "store"),
                },
                "mode": "search",
                "algorithm": "random",
                "num_samples": args.trials,
                "seed": 0,
                "space": {"losses": ["rcat"]},
                "asha": {"enabled": asha, "grace_period": 1, "reduction_factor": 2},
                "choice": {"enabled": False},  # times the search itself; strong judging is the same for both
                "tolerance": 0.05,
                "name": f"asha-{asha}",
                "storage": str(tmp / "tune"),
                "out": str(tmp / f"out-{asha}"),
            },
        )

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        times, chosen, epochs = {}, {}, {}
        for asha in (False, True):
            t = time.perf_counter()
            outcome = run_sweep(cfg(asha))
            times[asha] = time.perf_counter() - t
            c = outcome.chosen
            chosen[asha] = (c["kind"], round(float(c["alpha"]), 4), round(float(c["beta"]), 4))
            epochs[asha] = int(outcome.trials["epochs_run"].sum())
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.trials} RCAT trials x {args.epochs} epochs, {args.samples} Fashion-MNIST images, 2 CPUs")
    print(f"without ASHA: {times[False]:6.1f} s, {epochs[False]} epochs trained, chose {chosen[False]}")
    print(f"with ASHA:    {times[True]:6.1f} s, {epochs[True]} epochs trained, chose {chosen[True]}")
    print(f"wall-time ratio with / without  {times[True] / times[False]:5.2f}  (target <= 0.5)")
    print(f"same configuration chosen: {chosen[True] == chosen[False]}")


if __name__ == "__main__":
    main()
