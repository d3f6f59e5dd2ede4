"""GPU evaluation throughput: the paper's attack on CIFAR-sized RobustBench architectures, three ways side by side.

For each model and chunk size, in one run:
  floor   n_iter x (forward + backward to the input) of one chunk, timed alone: what no attack loop can beat
  direct  ``evaluate_chunk`` over every chunk in this process, the model already on the GPU
  Ray     ``rcat-ray evaluate --gpus-per-worker 1`` in a subprocess: one GPU actor reading the store's sample set
Throughput is samples/s in the steady state (chunk size / median time per chunk; for Ray, the median interval
between stored chunk manifests) and over the whole call (Ray's start-up included). The weights are random
(a RobustBench checkpoint written in its ``model_dir`` layout, read by the real loader) and the labels are
the model's own clean predictions, so every sample is attacked for all n_iter iterations, as a correctly
classified sample of a trained model is. The robust flags of the Ray run and the direct loop are compared.

    python bench/gpu_eval.py [--models A,B] [--samples 2000] [--chunk-sizes 250,1000] [--n-iter 50] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from rcat_ray.config import AttackConfig
from rcat_ray.core.attacks import chunk_seed, evaluate_chunk
from rcat_ray.core.models import import_robustbench, load_reference
from rcat_ray.evaluate.config import EvaluateConfig
from rcat_ray.evaluate.run import prepare

EPS = 8 / 255
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def place_checkpoint(name: str, model_dir: Path) -> torch.nn.Module:
    """A random-weight RobustBench model, saved where ``robustbench.utils.load_model`` reads it."""
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    torch.manual_seed(0)
    module = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")][name]["model"]().eval()
    target = model_dir / "cifar10" / "Linf" / f"{name}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in module.state_dict().items()}}, target)
    return module


def write_data(module: torch.nn.Module, n: int, path: Path, device: torch.device) -> None:
    """Random CIFAR-sized uint8 images labelled with the model's own predictions (every sample clean-correct)."""
    images = np.random.default_rng(0).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    module = module.to(device)
    with torch.no_grad():
        labels = torch.cat(
            [
                module(torch.from_numpy(images[i : i + 500]).to(device, torch.float32) / 255).argmax(1).cpu()
                for i in range(0, n, 500)
            ]
        )
    np.savez(path, images=images, labels=labels.numpy(), class_names=np.array(CIFAR10_CLASSES))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def floor_seconds(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n_iter: int, device) -> float:
    """n_iter forward + backward passes to the input of one chunk (after two warm-up passes)."""
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")

    def step():
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(loss_fn(module(xg), y), xg)

    for _ in range(2):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(n_iter):
        step()
    sync(device)
    return time.perf_counter() - t


def config(args, name: str, data: Path, store: Path, chunk: int, model_dir: Path, gpu: bool) -> dict:
    return {
        "data": {"name": "tensors", "path": str(data)},
        "attack": {
            "norm": "Linf",
            "eps": EPS,
            "attacks": list(args.attacks),
            "n_iter": args.n_iter,
            "n_restarts": 1,
            "seed": 0,
        },
        "chunk_size": chunk,
        "store": str(store),
        "save_adversarial": False,
        "compute": {"num_workers": 1, "cpus_per_worker": 4 if gpu else 1, "gpus_per_worker": 1 if gpu else 0},
        "models": [
            {
                "source": "robustbench",
                "name": name,
                "model_dir": str(model_dir),
                "dataset": "cifar10",
                "threat_model": "Linf",
            }
        ],
    }


def measure(args, name: str, work: Path, device: torch.device, report) -> None:
    model_dir = work / "models"
    module = place_checkpoint(name, model_dir)
    params = sum(p.numel() for p in module.parameters()) / 1e6
    data = work / f"{name}.npz"
    write_data(module, args.samples, data, device)
    attack = AttackConfig(eps=EPS, attacks=tuple(args.attacks), n_iter=args.n_iter, n_restarts=1, seed=0)
    for chunk in args.chunk_sizes:
        raw = config(args, name, data, work / f"direct-{name}-{chunk}", chunk, model_dir, device.type == "cuda")
        cfg = EvaluateConfig.model_validate(raw)
        prep = prepare(cfg, list(cfg.models))  # the sample set, prepared once (as a real store keeps it)
        plan = prep.plans[0]
        model = load_reference(plan.model).module.to(device).eval()
        split = prep.samples.to_split()
        x, y = split.images[:chunk].to(device), split.labels[:chunk].to(device)
        t_floor = floor_seconds(model, x, y, args.n_iter, device)
        evaluate_chunk(
            model,
            split.images[:8],
            split.labels[:8],
            split.sample_ids[:8],
            attack,
            num_classes=10,
            seed=1,
            device=device,
        )  # warm-up (cuDNN autotuning, pyautoattack imports)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        per_chunk, rows = [], []
        sync(device)
        t0 = time.perf_counter()
        for c in plan.chunks():
            t = time.perf_counter()
            sl = slice(c.start, c.stop)
            r = evaluate_chunk(
                model,
                split.images[sl],
                split.labels[sl],
                split.sample_ids[sl],
                attack,
                num_classes=10,
                seed=chunk_seed(attack.seed, c.chunk_id),
                device=device,
            )
            sync(device)
            per_chunk.append(time.perf_counter() - t)
            rows.append(r.table)
        t_direct = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        del model, x, y
        if device.type == "cuda":
            torch.cuda.empty_cache()

        ray_raw = {**raw, "store": str(work / f"ray-{name}-{chunk}")}
        cfg_path = work / f"ray-{name}-{chunk}.yaml"
        cfg_path.write_text(yaml.safe_dump(ray_raw))
        t = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "rcat_ray.cli", "evaluate", "--config", str(cfg_path), "--json"],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        t_ray = time.time() - t
        if proc.returncode != 0:
            report(f"| {name} | {chunk} | Ray run failed (exit {proc.returncode}): {proc.stderr[-600:]!r} |")
            continue
        ray_cfg = EvaluateConfig.model_validate(ray_raw)
        ray_prep = prepare(ray_cfg, list(ray_cfg.models))
        ray_plan = ray_prep.plans[0]
        done = sorted(
            os.path.getmtime(ray_prep.store.path(ray_plan.chunk_manifest_path(c.chunk_id))) for c in ray_plan.chunks()
        )
        interval = statistics.median(b - a for a, b in itertools.pairwise(done)) if len(done) > 1 else done[0] - t
        ray_table = ray_prep.store.read_table(ray_plan.table_path).to_pandas().set_index("sample_id")
        direct_table = pd_concat(rows).set_index("sample_id").loc[ray_table.index]
        agree = int((ray_table.robust.astype(bool) == direct_table.robust.astype(bool)).sum())
        robust = float(ray_table.robust.astype(bool).mean())
        report(
            f"| {name} ({params:.1f} M) | {chunk} | {chunk / t_floor:,.0f} | "
            f"{chunk / statistics.median(per_chunk):,.0f} | {chunk / interval:,.0f} | "
            f"{args.samples / t_direct:,.0f} | {args.samples / t_ray:,.0f} | "
            f"{statistics.median(per_chunk) / interval:.2f} | {t_floor / statistics.median(per_chunk):.2f} | "
            f"{agree}/{len(ray_table)} | {robust:.3f} | {peak:.1f} |"
        )


def pd_concat(tables):
    import pyarrow as pa

    return pa.concat_tables(tables).to_pandas()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="Rade2021Helper_R18_ddpm,Carmon2019Unlabeled")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--chunk-sizes", default="250,1000")
    ap.add_argument("--n-iter", type=int, default=50)
    ap.add_argument("--attacks", default="apgd-dlr", help="the paper's: APGD-DLR, 50 iterations, 1 restart")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="also write the table to OUT/gpu_eval.md")
    args = ap.parse_args()
    args.chunk_sizes = [int(c) for c in args.chunk_sizes.split(",")]
    args.attacks = args.attacks.split(",")
    device = torch.device(args.device)
    out = Path(args.out) / "gpu_eval.md" if args.out else None
    lines = []

    def report(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
        if out is not None:
            out.write_text("\n".join(lines) + "\n")

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report(
        f"{gpu}; torch {torch.__version__}; {args.samples} samples 3x32x32, {'+'.join(args.attacks)} x "
        f"{args.n_iter} iterations, 1 restart, eps 8/255; samples/s\n"
    )
    report(
        "| model | chunk | floor | direct (steady) | Ray 1 GPU actor (steady) | direct (whole) | Ray (whole call) | "
        "Ray/direct steady | floor/direct | robust flags equal | robust acc | direct peak GiB |"
    )
    report("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="rcat-gpu-bench-") as tmp:
        for name in args.models.split(","):
            measure(args, name, Path(tmp), device, report)
    print(json.dumps({"lines": len(lines)}))


if __name__ == "__main__":
    main()
