"""Model sources: fingerprints, self-describing checkpoints, refusal of pickled code, the real RobustBench loader."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from rcat_ray.config import ModelConfig
from rcat_ray.core.models import build_architecture, fingerprint_module, load_model, save_checkpoint
from rcat_ray.errors import ModelError

SHAPE = (1, 8, 8)


def test_fingerprint_tracks_weights():
    a = build_architecture("mlp", num_classes=10, input_shape=SHAPE)
    b = build_architecture("mlp", num_classes=10, input_shape=SHAPE)
    b.load_state_dict(a.state_dict())
    assert fingerprint_module(a) == fingerprint_module(b)
    with torch.no_grad():
        b[1].weight[0, 0] += 1e-6
    assert fingerprint_module(a) != fingerprint_module(b)


def test_checkpoint_round_trip(tmp_path):
    model = build_architecture("small_cnn", num_classes=10, input_shape=(1, 28, 28))
    fp = save_checkpoint(tmp_path / "m.pt", model, arch="small_cnn", num_classes=10, input_shape=(1, 28, 28))
    loaded = load_model(
        ModelConfig(source="checkpoint", name="m", path=str(tmp_path / "m.pt")), num_classes=10, input_shape=(1, 28, 28)
    )
    assert loaded.fingerprint == fp and loaded.source["arch"] == "small_cnn"
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded.module(x), model.eval()(x))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(163_000, rel=0.02)


def test_plain_state_dict_needs_arch(tmp_path):
    model = build_architecture("mlp", num_classes=10, input_shape=SHAPE)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelError, match="set 'arch'"):
        load_model(
            ModelConfig(source="checkpoint", name="sd", path=str(tmp_path / "sd.pt")), num_classes=10, input_shape=SHAPE
        )
    ok = load_model(
        ModelConfig(source="checkpoint", name="sd", path=str(tmp_path / "sd.pt"), arch="mlp"),
        num_classes=10,
        input_shape=SHAPE,
    )
    assert ok.fingerprint == fingerprint_module(model)


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "bad.pt"
    model = build_architecture("mlp", num_classes=10, input_shape=SHAPE)
    torch.save(model.state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        load_model(
            ModelConfig(source="checkpoint", name="bad", path=str(path), arch="mlp"), num_classes=10, input_shape=SHAPE
        )


def test_random_bytes_are_not_a_checkpoint_and_torch_advice_is_never_shown(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ModelError) as err:
        load_model(ModelConfig(source="checkpoint", path=str(path), arch="mlp"), num_classes=10, input_shape=SHAPE)
    msg = str(err.value)
    assert "not a readable PyTorch checkpoint" in msg
    assert "pickled" not in msg and "weights_only" not in msg


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_object_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "hook": _Payload(marker)}, path)
    with pytest.raises(ModelError, match="pickled Python objects") as err:
        load_model(
            ModelConfig(source="checkpoint", name="evil", path=str(path), arch="mlp"), num_classes=10, input_shape=SHAPE
        )
    assert "weights_only" not in str(err.value)
    assert not marker.exists()
    # sanity: the file really would run code under a plain unpickler
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"system" in data and isinstance(pickle.loads.__name__, str)


def test_unknown_builtin_suggests_a_name():
    with pytest.raises(ModelError, match="did you mean 'small_cnn'"):
        build_architecture("small_cn", num_classes=10, input_shape=SHAPE)


RB_NAME = "Rade2021Helper_R18_ddpm"  # one of the paper's CIFAR-10 models (PreAct ResNet-18)


def test_robustbench_checkpoint_placed_in_model_dir(tmp_path):
    """The real robustbench.utils.load_model reads a checkpoint the test placed in RobustBench's layout."""
    from rcat_ray.core.models import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    torch.manual_seed(0)
    reference = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")][RB_NAME]["model"]()
    target = tmp_path / "models" / "cifar10" / "Linf" / f"{RB_NAME}.pt"
    target.parent.mkdir(parents=True)
    # RobustBench checkpoints are {"state_dict": ...} with DataParallel's "module." prefixes
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, target)
    cfg = ModelConfig(source="robustbench", name=RB_NAME, model_dir=str(tmp_path / "models"))
    loaded = load_model(cfg, num_classes=10, input_shape=(3, 32, 32), data_name="cifar10")
    assert loaded.fingerprint == fingerprint_module(reference)
    assert loaded.num_classes == 10 and not loaded.module.training
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), reference.eval()(x))


def test_robustbench_missing_weights_say_where_to_put_them(tmp_path):
    cfg = ModelConfig(source="robustbench", name=RB_NAME, model_dir=str(tmp_path))
    with pytest.raises(ModelError, match=f"place the checkpoint at .*cifar10/Linf/{RB_NAME}.pt"):
        load_model(cfg, num_classes=10, input_shape=(3, 32, 32), data_name="cifar10")


def test_robustbench_unknown_name(tmp_path):
    cfg = ModelConfig(source="robustbench", name="Carmon2019Unlabelled", model_dir=str(tmp_path))
    with pytest.raises(ModelError, match=r"unknown RobustBench model.*Carmon2019Unlabeled"):
        load_model(cfg, num_classes=10, input_shape=(3, 32, 32), data_name="cifar10")
