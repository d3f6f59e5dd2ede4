"""Fine-tuning overhead, measured side by side in one run (issue 3's benchmark).

Prints:
  1. an RCAT step vs its floor, an AT step plus the two frozen forward passes RCAT adds
     (old and f_theta0 on x*), all on the same batches                  (target <= 1.05)
  2. a TorchTrainer epoch with 1 worker vs the same epoch as a plain loop (target <= 1.10); the epoch is
     timed inside the worker (Ray's start-up and teardown are printed separately)
  3. samples/s with 2 DDP workers vs 1 worker (one thread each)

Models: the demo's small CNN on Fashion-MNIST (untrained weights are enough for timing).

    .venv/bin/python bench/train_overhead.py [--samples 10000] [--batch 128] [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import numpy as np
import ray
import torch
from torch.utils.data import DataLoader, TensorDataset

from rcat_ray.config import DataConfig, LossConfig, TrainAttackConfig, parse_config
from rcat_ray.core.data import load_split
from rcat_ray.core.finetune_epoch import batch_loss, finetune_epoch, frozen_copy, make_optimizer
from rcat_ray.core.models import build_architecture, save_checkpoint
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.finetune.run import run_finetune


def step_ratio(split, batch: int, steps: int) -> tuple[float, float, float]:
    """Median seconds of an RCAT step, an AT step, and two frozen forwards on x*, interleaved on the same
    batches (medians: this machine's timing noise is a few ms per step)."""
    torch.manual_seed(0)
    model = build_architecture("small_cnn", num_classes=10, input_shape=(1, 28, 28))
    old = frozen_copy(build_architecture("mlp", num_classes=10, input_shape=(1, 28, 28)))
    theta0 = frozen_copy(model)
    attack = TrainAttackConfig(eps=0.1)
    rcat, at = LossConfig(kind="rcat", alpha=0.5, beta=0.4), LossConfig(kind="at")
    opt, _ = make_optimizer(model.parameters(), parse_config(FinetuneConfig, _ft_raw()).optimizer, steps)
    gen = torch.Generator().manual_seed(0)
    t: dict[str, list[float]] = {"rcat": [], "at": [], "fwd": []}
    for i in range(steps + 5):
        lo = (i * batch) % (len(split) - batch)
        x, y, ids = split.images[lo : lo + batch], split.labels[lo : lo + batch], split.sample_ids[lo : lo + batch]
        order = (("rcat", rcat), ("at", at)) if i % 2 == 0 else (("at", at), ("rcat", rcat))
        for name, cfg in order:  # alternating, so neither always runs on a warmer cache
            s = time.perf_counter()
            loss = batch_loss(model, model, theta0, old, x, y, ids, cfg, attack, generator=gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 5:
                t[name].append(time.perf_counter() - s)
        x_star = x + 0.05
        s = time.perf_counter()
        with torch.no_grad():
            old(x_star)
            theta0(x_star)
        if i >= 5:
            t["fwd"].append(time.perf_counter() - s)
    med = {k: float(np.median(v)) for k, v in t.items()}
    return med["rcat"], med["at"], med["fwd"]


def _ft_raw(**kw) -> dict:
    return {
        "old": {"source": "checkpoint", "name": "old", "path": kw.get("old", "x.pt")},
        "new": {"source": "checkpoint", "name": "new", "path": kw.get("new", "x.pt")},
        "train_attack": {"eps": 0.1},
        **{k: v for k, v in kw.items() if k not in ("old", "new")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    split = load_split(DataConfig(name="fashion_mnist", split="train", limit=args.samples))

    t_rcat, t_at, t_fwd = step_ratio(split, args.batch, args.steps)

    tmp = Path(tempfile.mkdtemp(prefix="rcat-train-bench-"))
    torch.manual_seed(0)
    paths = {}
    for name, arch in (("old", "mlp"), ("new", "small_cnn")):
        paths[name] = str(tmp / f"{name}.pt")
        save_checkpoint(
            paths[name],
            build_architecture(arch, num_classes=10, input_shape=(1, 28, 28)),
            arch=arch,
            num_classes=10,
            input_shape=(1, 28, 28),
        )

    def cfg(workers: int, batch: int) -> FinetuneConfig:
        return parse_config(
            FinetuneConfig,
            _ft_raw(
                old=paths["old"],
                new=paths["new"],
                data={"name": "fashion_mnist", "split": "train", "limit": args.samples},
                loss={"kind": "rcat", "alpha": 0.5, "beta": 0.4},
                epochs=1,
                batch_size=batch,
                validation={"samples": 50},
                compute={"num_workers": workers, "threads_per_worker": 1},
                out=str(tmp / f"out{workers}"),
                storage=str(tmp / "ray_results"),
                name=f"bench-{workers}",
            ),
        )

    # the plain loop: the same epoch function on the same data, no Ray
    c = cfg(1, args.batch)
    model = build_architecture("small_cnn", num_classes=10, input_shape=(1, 28, 28))
    model.load_state_dict(torch.load(paths["new"], weights_only=True)["state_dict"])
    old = frozen_copy(build_architecture("mlp", num_classes=10, input_shape=(1, 28, 28)))
    theta0 = frozen_copy(model)
    loader = DataLoader(
        TensorDataset(split.images, split.labels, split.sample_ids),
        batch_size=args.batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    opt, _ = make_optimizer(model.parameters(), c.optimizer, len(loader))
    s = time.perf_counter()
    finetune_epoch(
        model,
        theta0,
        old,
        loader,
        opt,
        c.loss,
        c.train_attack,
        device=torch.device("cpu"),
        generator=torch.Generator().manual_seed(1),
    )
    t_plain = time.perf_counter() - s

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    s = time.perf_counter()
    one = run_finetune(cfg(1, args.batch))
    t_fit1 = time.perf_counter() - s
    s = time.perf_counter()
    two = run_finetune(cfg(2, args.batch))  # batch_size is the global batch: the same over 2 workers
    t_fit2 = time.perf_counter() - s
    ray.shutdown()
    e1, e2 = one.history[-1]["epoch_seconds"], two.history[-1]["epoch_seconds"]

    print(f"\nFashion-MNIST small CNN, batch {args.batch}, {args.samples} samples, 1 torch thread per process")
    print(f"RCAT step {1000 * t_rcat:.1f} ms | AT step {1000 * t_at:.1f} ms | 2 frozen forwards {1000 * t_fwd:.1f} ms")
    print(f"ratio RCAT / (AT + 2 forwards)       {t_rcat / (t_at + t_fwd):5.2f}  (target <= 1.05)")
    print(f"plain epoch {t_plain:.1f} s | TorchTrainer 1 worker epoch {e1:.1f} s (fit incl. start-up {t_fit1:.1f} s)")
    print(f"ratio TorchTrainer 1 worker / plain  {e1 / t_plain:5.2f}  (target <= 1.10)")
    print(f"TorchTrainer 2 workers epoch {e2:.1f} s (fit incl. start-up {t_fit2:.1f} s)")
    print(f"throughput 2 workers / 1 worker      {e1 / e2:5.2f}")


if __name__ == "__main__":
    main()
