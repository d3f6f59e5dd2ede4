"""The paper's protocol on the demo's pair, as a thin call of ``rcat-ray study``: does RCAT reduce robustness flips
here the way the paper says, with weights chosen as the paper chooses them?

Old and new are the demo's Fashion-MNIST MLP and CNN (docs/contracts.md §1.5), reused from the demo's cache
(``demo-out/models``) or trained exactly as the demo trains them. The study (:mod:`rcat_ray.study`) runs one
Ray Tune grid sweep over the paper's grids (AT; PCT and PCAT alpha 1, beta 1, 2, 5, 10; RCAT (0.75,0.2)
(0.7,0.2) (0.5,0.4) (0.3,0.6)) with the demo's fine-tuning settings (2 epochs, SGD lr 1e-3 momentum 0.9,
global batch 128, FGSM-RS eps 0.1, 2 Ray Train workers), judges every trial on ``--val-samples`` validation
images (APGD-CE + APGD-DLR, 50 iterations), chooses each method's weights by the sweep's rule applied to its
own trials, fine-tunes each choice with ``--seeds`` seeds and tests them on ``--test-samples`` test images.

Writes, into ``--out``: the study's outputs (``study/``: study.md, .tex, .csv, .json, report.html), ``result.md``
(its table) and ``chosen.yaml``, the chosen weights as a demo config override
(``rcat-ray demo --config <out>/chosen.yaml``). Everything is reused by identity: a rerun resumes.

    .venv/bin/python bench/fidelity.py                 # the full protocol (most of two hours on 2 cores)
    .venv/bin/python bench/fidelity.py --quick         # digits-sized smoke run of the same code path
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from rcat_ray.config import DataConfig, stable_hash
from rcat_ray.demo import DemoConfig, train_or_load
from rcat_ray.finetune.pretrain import TrainRecipe, train_checkpoint

HERE = Path(__file__).parent
KINDS = ("at", "pct", "pcat", "rcat")


def parents(args: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    """The demo's old and new checkpoints (its cache, or trained the same way into it); digits ones for --quick."""
    if args.quick:
        digits = DataConfig(name="digits", split="train")
        recipes = {
            "old": TrainRecipe(arch="mlp", epochs=10, batch_size=64, lr=2e-3, eps=0.1, seed=0),
            "new": TrainRecipe(arch="small_cnn", epochs=20, batch_size=64, lr=2e-3, eps=0.1, seed=1),
        }
        paths = []
        for name, recipe in recipes.items():
            path = out / "models" / f"{name}-{recipe.arch}-{stable_hash(recipe)}.pt"
            paths.append(path if path.is_file() else train_checkpoint(recipe, digits, path, name))
        return paths[0], paths[1]
    demo, folder = DemoConfig(), Path(args.models)
    return (
        train_or_load(demo.old, folder, args.data_root, "old"),
        train_or_load(demo.new, folder, args.data_root, "new"),
    )


def study_config(args: argparse.Namespace, old: Path, new: Path, out: Path) -> dict[str, Any]:
    """The study of the demo's one pair: the demo's fine-tuning settings; ``--quick`` only shrinks it."""
    demo = DemoConfig()
    quick = args.quick
    data = (
        {"name": "digits"}
        if quick
        else {"name": "fashion_mnist", **({"root": args.data_root} if args.data_root else {})}
    )
    attack = {"eps": 0.1, "attacks": ["apgd-ce", "apgd-dlr"], "n_iter": 10 if quick else 50}
    workers = 0 if quick else 2
    return {
        "name": "fidelity-quick" if quick else "fidelity",
        "models": {
            "old": {"source": "checkpoint", "path": str(old), "label": "old (MLP)"},
            "new": {"source": "checkpoint", "path": str(new), "label": "new (CNN)"},
        },
        "pairs": [{"old": "old", "new": "new"}],
        "methods": list(KINDS),
        "seeds": list(range(args.seeds or (2 if quick else 3))),
        "finetune": {
            "data": {**data, "split": "train", "limit": None if quick else demo.finetune_samples},
            "train_attack": {"kind": "fgsm-rs", "eps": 0.1},
            "optimizer": demo.finetune_optimizer.model_dump(),
            "epochs": 1 if quick else demo.finetune_epochs,
            "batch_size": 64 if quick else demo.finetune_batch_size,
            "validation": {"samples": 100 if quick else demo.validation_samples},
            # a sweep trial with workers holds 0.01 CPU besides them: 2 workers of 0.99 fit 2 CPUs
            "compute": {"num_workers": workers, "cpus_per_worker": 0.99 if workers else 1.0, "threads_per_worker": 1},
        },
        "cpus_per_trial": 1,
        "tolerance": 0.02,
        "choice": {"samples": args.val_samples or (100 if quick else 2000), "attack": attack, "chunk_size": 250},
        "test": {
            "data": {**data, "split": "test", "limit": args.test_samples or (300 if quick else 10_000)},
            "attack": attack,
            "chunk_size": 100 if quick else demo.chunk_size,
        },
        "compute": {"num_workers": 2, "cpus_per_worker": 1, "threads_per_worker": 1},
        "store": str(out / "store"),
        "storage": str(out / "ray_results"),
        "out": str(out / "study"),
    }


def chosen_yaml(study: dict[str, Any], mode: str) -> str:
    """The chosen weights as a demo config override, with whether each met the rule's bar."""
    r = study["results"][0]
    c = {k: r["chosen"][k] for k in KINDS}
    head = [
        f"# Each method's weights as bench/fidelity.py ({mode} run) chose them, by the sweep's rule per method,",
        f"# on the {r['validation']['description']}.",
        "# Point the demo at them:  rcat-ray demo --config <this file>",
        *(
            f"# {c[k]['label']}: keeps the new model's validation robust accuracy (the rule's bar): "
            f"{'yes' if c[k]['meets_bar'] else 'no, lowest validation S-NFR instead'}"
            for k in KINDS
        ),
    ]
    body = {
        "methods": [
            {"kind": "at"} if k == "at" else {"kind": k, "alpha": c[k]["alpha"], "beta": c[k]["beta"]} for k in KINDS
        ],
        "methods_source": f"chosen per method on validation by bench/fidelity.py ({mode} run)",
    }
    return "\n".join(head) + "\n" + yaml.safe_dump(body, sort_keys=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-samples", type=int, help="test images attacked per model (default 10000; quick 300)")
    ap.add_argument("--val-samples", type=int, help="choice validation samples (default 2000; quick 100)")
    ap.add_argument("--seeds", type=int, help="fine-tuning seeds per chosen configuration (default 3; quick 2)")
    ap.add_argument("--out", help="output folder (default bench/out/fidelity; quick bench/out/fidelity-quick)")
    ap.add_argument("--quick", action="store_true", help="digits-sized smoke settings (a few minutes)")
    ap.add_argument("--models", default="demo-out/models", help="the demo's model cache (old and new)")
    ap.add_argument("--data-root", help="Fashion-MNIST folder (default: the project's data folder)")
    args = ap.parse_args()
    out = Path(args.out or HERE / "out" / ("fidelity-quick" if args.quick else "fidelity")).resolve()
    (out / "models").mkdir(parents=True, exist_ok=True)
    old, new = parents(args, out)
    config = out / "study.yaml"
    config.write_text(yaml.safe_dump(study_config(args, old, new, out), sort_keys=False))
    env = {**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}  # 2 cores: worker groups start slowly
    cmd = [sys.executable, "-m", "rcat_ray.cli", "study", "--config", str(config), "--log-file", str(out / "study.log")]
    code = subprocess.call(cmd, env=env, stdout=subprocess.DEVNULL)
    if code != 0:
        print(f"rcat-ray study exited {code} (see {out / 'study.log'}); run this again to resume", file=sys.stderr)
        return code
    study = json.loads((out / "study" / "study.json").read_text())
    (out / "chosen.yaml").write_text(chosen_yaml(study, "quick" if args.quick else "full"))
    (out / "result.md").write_text((out / "study" / "study.md").read_text())
    print((out / "result.md").read_text())
    print(f"written: {out / 'result.md'}, {out / 'chosen.yaml'}; the study's page {out / 'study' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
