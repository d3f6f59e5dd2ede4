"""The paper's experiments as ready study configs: the CIFAR-10 study names the authors' seven models, ten pairs,
grids and settings, and both it and the ImageNet chain run end to end on stand-in models and data the tests
create (the configs as written, with the models, the data and the sizes swapped; pairs, methods and layout kept)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from rcat_ray.config import load_yaml, parse_config
from rcat_ray.study.config import StudyConfig
from tests.core.test_sources import _write_cifar10
from tests.test_imagenet_streaming import _write_folder
from tests.test_paper_configs import MODELS, NAMED_PAIRS

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
PAPER_EPS = 8 / 255


def test_the_cifar10_study_is_the_papers_experiment() -> None:
    cfg = parse_config(StudyConfig, load_yaml(CONFIGS / "cifar10_paper_study.yaml"))
    assert [m.name for m in cfg.models.values()] == list(MODELS)
    assert [(cfg.models[p.old].name, cfg.models[p.new].name) for p in cfg.pairs] == NAMED_PAIRS
    assert cfg.methods == ("at", "pct", "pcat", "rcat") and len(cfg.seeds) == 3
    assert cfg.rcat_grid == ((0.75, 0.2), (0.7, 0.2), (0.5, 0.4), (0.3, 0.6)) and cfg.pct_betas == (1, 2, 5, 10)
    assert cfg.finetune.epochs == 12 and cfg.finetune.batch_size == 500
    a = cfg.test.attack
    assert (
        a.attacks == ("apgd-dlr",) and a.n_iter == 50 and a.robust_samples == 2000 and a.eps == pytest.approx(PAPER_EPS)
    )
    assert cfg.choice.samples == 2000 and cfg.test.data.name == "cifar10" and cfg.test.data.split == "test"


def test_the_imagenet_chain_study_is_consecutive_pairs() -> None:
    cfg = parse_config(StudyConfig, load_yaml(CONFIGS / "imagenet_chain_study.yaml"))
    names = list(cfg.models)
    assert [(p.old, p.new) for p in cfg.pairs] == list(itertools.pairwise(names))
    assert all(m.dataset == "imagenet" for m in cfg.models.values())
    assert cfg.test.attack.eps == pytest.approx(4 / 255) and cfg.test.data.name == "imagenet"


def _stand_ins(raw: dict, data: dict, test_data: dict) -> dict:
    """The config with tiny models of two architectures (with and without BatchNorm) in place of the zoo's, the
    test's data, one point per method's grid, one seed and tiny sizes; pairs, methods and layout unchanged."""
    raw = dict(raw)
    archs = ("tiny_convnet", "tiny_resnet")
    raw["models"] = {
        name: {"source": "builtin", "name": archs[i % 2], "seed": i, "label": m["name"]}
        for i, (name, m) in enumerate(raw["models"].items())
    }
    raw.update(rcat_grid=[[0.5, 0.4]], pct_betas=[1], seeds=[0], tolerance=1.0)
    raw["finetune"] = {
        **raw["finetune"],
        "data": data,
        "epochs": 1,
        "batch_size": 8,
        "mixed_precision": False,
        "validation": {
            "samples": 4,
            "attack": {"eps": raw["test"]["attack"]["eps"], "attacks": ["apgd-ce"], "n_iter": 1},
        },
        "compute": {"num_workers": 0, "threads_per_worker": 1},
    }
    raw.pop("gpus_per_trial", None)
    raw["cpus_per_trial"] = 1
    choice_attack = {**raw["choice"]["attack"], "n_iter": 1}
    raw["choice"] = {**raw["choice"], "samples": 8, "chunk_size": 8, "attack": choice_attack}
    test_attack = {**raw["test"]["attack"], "n_iter": 1, "robust_samples": 8}
    raw["test"] = {**raw["test"], "data": test_data, "chunk_size": 8, "attack": test_attack}
    raw["compute"] = {"num_workers": 1, "cpus_per_worker": 1, "threads_per_worker": 1}
    raw["bootstrap"] = {"n_resamples": 50}
    return raw


def _run(raw: dict, tmp_path: Path):
    from rcat_ray.study.run import run_study

    raw.update(store=str(tmp_path / "store"), storage=str(tmp_path / "ray_results"), out=str(tmp_path / "out"))
    return run_study(parse_config(StudyConfig, raw))


def _check(outcome, cfg_path: Path, tmp_path: Path) -> None:
    paper = load_yaml(cfg_path)
    assert [p.name for p in outcome.pairs] == [f"{p['old']} -> {p['new']}" for p in paper["pairs"]]
    for r in outcome.results:
        assert list(r.roles) == ["old", "new", "at", "pct", "pcat", "rcat"]
        assert set(r.differences) == {"new", "at", "pcat", "pct"}
    text = (tmp_path / "out" / "study.md").read_text()
    assert all(m["name"] in text for m in paper["models"].values())  # the zoo names label the rows
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "study.tex").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_the_cifar10_study_runs_end_to_end_on_stand_ins(ray_session, tmp_path, monkeypatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    _write_cifar10(tmp_path / "cifar", n_per_batch=8)  # 40 training images, 8 test images
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # the official MD5s are not ours
    path = CONFIGS / "cifar10_paper_study.yaml"
    root = str(tmp_path / "cifar")
    raw = _stand_ins(
        load_yaml(path),
        data={"name": "cifar10", "root": root, "split": "train", "val_size": 8},
        test_data={"name": "cifar10", "root": root, "split": "test"},
    )
    _check(_run(raw, tmp_path), path, tmp_path)


@pytest.mark.ray
@pytest.mark.slow
def test_the_imagenet_chain_study_runs_end_to_end_on_stand_ins(ray_session, tmp_path) -> None:
    _write_folder(tmp_path / "imagenet", "train", 6, seed=1)  # 18 training JPEGs, 8 of them validate
    _write_folder(tmp_path / "imagenet", "val", 3, seed=0)  # 9 test JPEGs
    path = CONFIGS / "imagenet_chain_study.yaml"
    root = str(tmp_path / "imagenet")
    raw = _stand_ins(
        load_yaml(path),
        data={"name": "imagenet", "root": root, "split": "train", "val_size": 8},
        test_data={"name": "imagenet", "root": root, "split": "test", "limit": 8},
    )
    _check(_run(raw, tmp_path), path, tmp_path)
