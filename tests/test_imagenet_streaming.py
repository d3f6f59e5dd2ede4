"""ImageNet-shaped data end to end, streamed: JPEGs in an ImageFolder, prepared once, evaluated chunk by chunk.

The test writes a small ImageFolder of 256-px JPEGs of a few sizes and classes, prepares it with the CLI
(``rcat-ray data prepare --data imagenet``: decode, resize 256, centre crop 224, stored as uint8), evaluates it
with a tiny builtin model that takes 3x224x224 images, and checks that

* the evaluation reads the prepared set (it is reused, not rewritten, although its row groups are not the chunk
  size) and the driver never decodes the selection (``load_split`` is not called);
* the table is the one an in-memory evaluation of ``load_split`` (RobustBench's preprocessing, decoded in this
  process) gives: same key (``SampleSet.describe()`` equals ``Split.describe()``), same rows;
* a comparison's report shows the clean images, read from the set (the report never decodes the selection);
* a one-epoch fine-tune streams from its own prepared training set.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rcat_ray.cli import main
from rcat_ray.config import AttackConfig, ComputeConfig, DataConfig, ModelConfig
from rcat_ray.core.data import load_split
from rcat_ray.core.samples import IMAGENET_PREPROCESSING, open_samples, samples_location
from rcat_ray.evaluate.config import CompareConfig

pytestmark = pytest.mark.ray

CLASSES = ("n01440764", "n01443537", "n01484850")
PER_CLASS = 10  # 30 test images
SIZES = ((256, 256), (320, 256), (256, 341), (300, 400))  # (width, height): resize and crop both matter
EPS = 4 / 255
CHUNK = 8  # 4 chunks, the last one short


def _write_folder(root: Path, split: str, per_class: int, seed: int) -> None:
    """An ImageFolder of JPEGs: smooth class-coloured gradients with noise (a real decode, resize and crop)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, wnid in enumerate(CLASSES):
        folder = root / split / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            w, h = SIZES[(i + c) % len(SIZES)]
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([(xx * (c + 1) + yy) % 256, (yy * 2 + 40 * c) % 256, (xx + yy * c) % 256], -1)
            pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{wnid}_{i:04d}.JPEG", quality=90)


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    _write_folder(root, "val", PER_CLASS, seed=0)
    _write_folder(root, "train", 8, seed=1)
    return root


def _refuse_load_split(mp: pytest.MonkeyPatch) -> None:
    """``load_split`` raises wherever rcat_ray bound it: what runs now cannot decode the selection in memory."""

    def refuse(cfg, *a, **k):
        raise AssertionError(f"load_split({cfg.name}/{cfg.split}, limit={cfg.limit}) called: the data must stream")

    for name, module in list(sys.modules.items()):
        if name.startswith("rcat_ray") and getattr(module, "load_split", None) is load_split:
            mp.setattr(module, "load_split", refuse)


@pytest.fixture
def no_load_split(monkeypatch):
    _refuse_load_split(monkeypatch)


def _data(root: Path, split: str = "test", **kw) -> DataConfig:
    return DataConfig(name="imagenet", root=str(root), split=split, **kw)


def _eval_args(root: Path, store: Path) -> list[str]:
    return [
        "--data",
        "imagenet",
        "--data-root",
        str(root),
        "--eps",
        str(EPS),
        "--attacks",
        "apgd-ce,apgd-dlr",
        "--n-iter",
        "3",
        "--chunk-size",
        str(CHUNK),
        "--store",
        str(store),
        "--workers",
        "1",
        "--threads-per-worker",
        "1",
    ]


def test_prepare_and_evaluate_an_imagefolder_as_load_split_would(
    ray_session, imagenet_root, tmp_path, capsys, monkeypatch
):
    store = tmp_path / "store"
    # 1. prepared once by the CLI, with its default layout (row groups of 256: not the evaluation's chunk size)
    assert (
        main(
            [
                "data",
                "prepare",
                "--data",
                "imagenet",
                "--data-root",
                str(imagenet_root),
                "--store",
                str(store),
                "--json",
            ]
        )
        == 0
    )
    prepared = json.loads(capsys.readouterr().out)
    location = samples_location(str(store), _data(imagenet_root))
    assert prepared["location"] == location and prepared["n_samples"] == len(CLASSES) * PER_CLASS
    assert prepared["shape"] == [3, 224, 224] and prepared["dtype"] == "uint8"
    assert prepared["preprocessing"] == IMAGENET_PREPROCESSING == {"resize": 256, "center_crop": 224}
    before = {p.name: p.stat().st_mtime_ns for p in Path(location).iterdir()}

    # 2. evaluated by the CLI from the set: the driver decodes nothing
    with pytest.MonkeyPatch.context() as mp:
        _refuse_load_split(mp)
        assert main(["evaluate", *_eval_args(imagenet_root, store), "--model", "builtin:tiny_convnet", "--json"]) == 0
    (table,) = json.loads(capsys.readouterr().out)["tables"]
    assert (table["chunks"], table["chunks_computed"]) == (4, 4)
    assert {p.name: p.stat().st_mtime_ns for p in Path(location).iterdir()} == before  # reused, not rewritten
    assert len(list((store / "samples").iterdir())) == 1

    # 3. the same table as an in-memory evaluation of load_split's tensors
    from rcat_ray.core.models import load_model
    from rcat_ray.evaluate.plan import EvaluationPlan, assemble, run_chunk
    from rcat_ray.store.result_store import ResultStore

    split = load_split(_data(imagenet_root))  # RobustBench's preprocessing, decoded in this process
    assert open_samples(location).describe() == split.describe()
    model = load_model(ModelConfig(source="builtin", name="tiny_convnet"), num_classes=3, input_shape=(3, 224, 224))
    attack = AttackConfig(eps=EPS, attacks=("apgd-ce", "apgd-dlr"), n_iter=3)
    plan = EvaluationPlan(model, split, attack, CHUNK)
    assert plan.key == table["key"]
    reference = ResultStore(tmp_path / "reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for chunk in plan.chunks():
            run_chunk(plan, chunk, reference, device=torch.device("cpu"), keep_adversarial=True)
    finally:
        torch.set_num_threads(threads)
    assemble(plan, reference)
    streamed = pq.read_table(store / plan.table_path)
    assert streamed.num_rows == 30 and streamed.equals(pq.read_table(tmp_path / "reference" / plan.table_path))
    assert streamed.column("sample_id").to_pylist() == list(range(30))
    assert streamed.column("label").to_pylist() == [c for c in range(3) for _ in range(PER_CLASS)]


def test_a_comparison_report_reads_its_images_from_the_set(ray_session, imagenet_root, tmp_path, no_load_split):
    """First use of a store: the driver reads two images from the source (``load_split`` with limit 2 is the only
    call it makes), prepares the set after the models pass, and the report reads the images it shows from it."""
    from rcat_ray.evaluate import run as workflows
    from rcat_ray.evaluate.run import run_compare
    from rcat_ray.report.flip_report import CLEAN_GRID_PNG, ROBUST_GRID_PNG, write_report

    probes = []

    def probe_only(cfg):
        assert cfg.limit == 2, cfg
        probes.append(cfg.limit)
        return load_split(cfg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(workflows, "load_split", probe_only)
        cfg = CompareConfig(
            data=_data(imagenet_root),
            attack=AttackConfig(eps=EPS, attacks=("apgd-ce",), n_iter=3),
            chunk_size=CHUNK,
            store=str(tmp_path / "store"),
            compute=ComputeConfig(num_workers=1, threads_per_worker=1),
            old=ModelConfig(source="builtin", name="tiny_convnet", seed=0),
            new=ModelConfig(source="builtin", name="tiny_convnet", seed=1),
        )
        outcomes, comparison, prepared = run_compare(cfg)
    assert probes == [2] and comparison is not None and all(o.complete for o in outcomes)
    assert prepared.samples.info.rows_per_group == CHUNK  # prepared by the evaluation: chunk-aligned
    assert prepared.samples.info.preprocessing == IMAGENET_PREPROCESSING
    flips = comparison.flips.to_pandas()
    assert (flips.neg_flip | flips.pos_flip).any(), "two random models should disagree somewhere"
    html = write_report(prepared.store, comparison.key, tmp_path / "report").read_text()
    assert "Images are not shown" not in html
    assert CLEAN_GRID_PNG in html or ROBUST_GRID_PNG in html


def test_one_epoch_fine_tune_streams_from_a_prepared_set(imagenet_root, tmp_path, no_load_split):
    """The other half of the data plane (rcat_ray.finetune.ray_train): a fine-tune reads its rows from the set."""
    from rcat_ray.config import parse_config
    from rcat_ray.core.models import build_architecture, save_checkpoint
    from rcat_ray.finetune import run as train
    from rcat_ray.finetune.config import FinetuneConfig

    parents = {}
    for name, seed in (("old", 0), ("new", 1)):
        torch.manual_seed(seed)
        module = build_architecture("tiny_convnet", num_classes=3, input_shape=(3, 224, 224))
        parents[name] = tmp_path / f"{name}.pt"
        save_checkpoint(parents[name], module, arch="tiny_convnet", num_classes=3, input_shape=(3, 224, 224))
    cfg = parse_config(
        FinetuneConfig,
        {
            "old": {"source": "checkpoint", "path": str(parents["old"])},
            "new": {"source": "checkpoint", "path": str(parents["new"])},
            "data": {"name": "imagenet", "root": str(imagenet_root), "split": "train", "val_size": 6},
            "loss": {"kind": "rcat", "alpha": 0.5, "beta": 0.4},
            "train_attack": {"kind": "fgsm-rs", "eps": EPS},
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "epochs": 1,
            "batch_size": 6,
            "validation": {"samples": 6},
            "out": str(tmp_path / "out"),
            "storage": str(tmp_path / "ray_results"),
            "store": str(tmp_path / "store"),
            "compute": {"num_workers": 0, "threads_per_worker": 1},
        },
    )
    outcome = train.run_finetune(cfg)
    assert Path(outcome.checkpoint).is_file()
    sets = sorted(p.name for p in (tmp_path / "store" / "samples").iterdir())
    assert [s.split("-")[:2] for s in sets] == [["imagenet", "train"], ["imagenet", "val"]]
    trained = open_samples(tmp_path / "store" / "samples" / sets[0])
    assert len(trained) == 18 and trained.info.preprocessing == IMAGENET_PREPROCESSING
