"""The Fashion-MNIST study (issue 20): train the models of ``bench/study_fmnist.yaml``, run ``rcat-ray study`` on
them as a user would (a subprocess), and write ``bench/results/study.md``.

Everything is reused: trained models by recipe, and the study itself resumes (finished trials, fine-tunes and
evaluations are kept), so an interrupted run, or one spread over several sessions, continues where it stopped.

    .venv/bin/python bench/study_fmnist.py                  # about two hours on 2 cores, the first time
    .venv/bin/python bench/study_fmnist.py --out DIR        # elsewhere (default bench/out/study)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from rcat_ray.demo import train_or_load
from rcat_ray.finetune.pretrain import TrainRecipe

HERE = Path(__file__).parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(HERE / "study_fmnist.yaml"))
    ap.add_argument("--out", default=str(HERE / "out" / "study"))
    ap.add_argument("--data-root", help="Fashion-MNIST folder (default: the project's data folder)")
    ap.add_argument("--results", default=str(HERE / "results" / "study.md"))
    args = ap.parse_args()
    spec = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out).resolve()
    (out / "models").mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    models = {}
    for name, recipe in spec["train"].items():
        path = train_or_load(TrainRecipe(**recipe), out / "models", args.data_root, name)
        models[name] = {"source": "checkpoint", "path": str(path), "label": name}
    trained = time.perf_counter() - t0

    study = dict(spec["study"])
    study["models"] = models
    if args.data_root:
        for section in (study["finetune"], study["test"]):
            section["data"]["root"] = args.data_root
    study.update(store=str(out / "store"), storage=str(out / "ray_results"), out=str(out / "study"))
    config = out / "study.yaml"
    config.write_text(yaml.safe_dump(study, sort_keys=False))

    t = time.perf_counter()
    cmd = [sys.executable, "-m", "rcat_ray.cli", "study", "--config", str(config), "--log-file", str(out / "study.log")]
    env = {**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}
    code = subprocess.call(cmd, env=env)
    if code != 0:
        print(f"rcat-ray study exited {code}; run this script again to resume", file=sys.stderr)
        return code
    table = (out / "study" / "study.md").read_text()
    header = [
        "# The Fashion-MNIST study (bench/study_fmnist.py)",
        "",
        "Fixed before it was run in `bench/study_fmnist.yaml`; reported as it came out. Smaller than the demo to fit",
        "about two hours on 2 cores: fine-tuning on the first 10,000 training images, 1,000 validation images for the",
        "choice, 1,000 test images. Models trained (or reused) in "
        f"{trained:.0f} s; the study command ran {time.perf_counter() - t:.0f} s in this invocation (a resumed run",
        "counts only its own part).",
        "",
    ]
    Path(args.results).write_text("\n".join(header) + table.split("\n", 1)[1])
    print(f"written: {args.results}; the study's page: {out / 'study' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
