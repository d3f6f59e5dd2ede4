"""Every data source streams: read a row range at a time, stored in bounded memory, bit-identical to what the
libraries' own readers give (torchvision, scikit-learn, numpy, torch), with the fingerprint computed while
streaming equal to the one of the decoded selection and of the set read back."""

from __future__ import annotations

import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from rcat_ray.config import DataConfig
from rcat_ray.core.data import load_split, prepare_fashion_mnist
from rcat_ray.core.samples import open_samples, prepare_samples
from rcat_ray.core.sources import selection_size
from rcat_ray.errors import DataError


def _peak(fn) -> tuple[object, int]:
    """(result, peak bytes Python and numpy allocated while ``fn`` ran); memory-mapped pages are not counted,
    which is the point: they are the page cache's, not the process's heap."""
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _check_set(cfg: DataConfig, dest: Path, expected_images: torch.Tensor, rows_per_group: int = 16) -> None:
    """The set prepared from ``cfg`` decodes to ``expected_images`` bit for bit, and its fingerprints agree."""
    info = prepare_samples(cfg, dest, rows_per_group=rows_per_group)
    samples = open_samples(dest)
    images, _, _ = samples.read_rows(0, len(samples))
    assert images.dtype == torch.float32 and torch.equal(images.view(torch.int32), expected_images.view(torch.int32))
    split = load_split(cfg)
    assert torch.equal(split.images.view(torch.int32), expected_images.view(torch.int32))
    assert info.split_fingerprint == split.fingerprint() == samples.split_fingerprint()


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare_fashion_mnist(root)
    return root


def test_fashion_mnist_idx_files_match_torchvision(fmnist_root: Path, tmp_path: Path) -> None:
    from torchvision.datasets import FashionMNIST

    ref = FashionMNIST(str(fmnist_root), train=True, download=False)
    cfg = DataConfig(name="fashion_mnist", root=str(fmnist_root), split="val", offset=7, limit=300)
    expected = ref.data[50_007:50_307].unsqueeze(1).float() / 255
    _check_set(cfg, tmp_path / "fm", expected, rows_per_group=64)
    split = load_split(cfg)
    assert split.labels.tolist() == ref.targets[50_007:50_307].tolist()
    assert split.sample_ids.tolist() == list(range(50_007, 50_307))


def test_the_probe_and_the_count_read_no_whole_file(fmnist_root: Path) -> None:
    """Two rows of the 47 MB training file cost kilobytes, not the file (the old probe peaked at 416 MiB);
    counting a selection decodes nothing."""
    cfg = DataConfig(name="fashion_mnist", root=str(fmnist_root), split="train", limit=2)
    load_split(cfg)  # imports and caches outside the trace
    split, peak = _peak(lambda: load_split(cfg))
    assert len(split) == 2 and peak < 2 * 2**20, f"{peak / 2**20:.1f} MiB to read two rows"
    n, peak = _peak(lambda: selection_size(cfg.model_copy(update={"limit": None})))
    assert n == 50_000 and peak < 2 * 2**20


def test_preparing_fashion_mnist_train_holds_row_groups_not_the_file(fmnist_root: Path, tmp_path: Path) -> None:
    cfg = DataConfig(name="fashion_mnist", root=str(fmnist_root), split="train")
    prepare_samples(cfg.model_copy(update={"limit": 64}), tmp_path / "warm", rows_per_group=64)
    info, peak = _peak(lambda: prepare_samples(cfg, tmp_path / "fm", rows_per_group=512))
    set_bytes = 50_000 * 28 * 28  # uint8 pixels; load_split's floats are 4x this
    assert info.num_rows == 50_000 and info.dtype == "uint8"
    assert peak < set_bytes / 6, f"peak {peak / 2**20:.1f} MiB for {set_bytes / 2**20:.1f} MiB of pixels"


def _write_cifar10(root: Path, n_per_batch: int) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A CIFAR-10 folder in the official python format (pickled dicts of uint8 rows of 3072, RRR..GGG..BBB)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        batches[name] = (data, labels)
        (folder / name).write_bytes(pickle.dumps({"batch_label": name, "data": data, "labels": labels}, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}, protocol=2))
    return batches


def test_cifar10_batches_match_torchvision_and_span_batch_boundaries(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets.cifar as tv_cifar
    from torchvision.datasets import CIFAR10

    _write_cifar10(tmp_path / "data", n_per_batch=40)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # the official MD5s are not ours
    ref = CIFAR10(str(tmp_path / "data"), train=True, download=False)
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "data"), split="train", val_size=30, offset=25, limit=120)
    expected = torch.as_tensor(ref.data[25:145]).permute(0, 3, 1, 2).float() / 255  # rows of four batches
    _check_set(cfg, tmp_path / "c10", expected, rows_per_group=16)
    assert load_split(cfg).labels.tolist() == ref.targets[25:145]
    assert selection_size(cfg.model_copy(update={"limit": None})) == 200 - 30 - 25


def test_a_damaged_cifar_batch_is_named(tmp_path: Path) -> None:
    """Without the test's MD5 switch the real check runs: our synthetic batches are not the official files."""
    _write_cifar10(tmp_path / "data", n_per_batch=4)
    with pytest.raises(DataError, match="data_batch_1 is missing or damaged"):
        load_split(DataConfig(name="cifar10", root=str(tmp_path / "data"), split="train", val_size=2))


@pytest.mark.parametrize("writer", ["savez", "savez_compressed", "torch"])
@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_tensors_files_stream_from_disk(tmp_path: Path, writer: str, kind: str) -> None:
    """``.npz`` members (stored or deflated) are read a row range at a time out of the zip, ``.pt`` files are
    memory-mapped: preparing 6,000 images holds row groups, never the array, and gives its exact floats."""
    rng = np.random.default_rng(1)
    n = 6000
    if kind == "uint8":
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        expected = torch.as_tensor(images).float() / 255
    else:
        images = rng.random(size=(n, 3, 32, 32), dtype=np.float32)
        expected = torch.as_tensor(images)
    labels = rng.integers(0, 10, size=n)
    if writer == "torch":
        path = tmp_path / "mine.pt"
        torch.save({"images": torch.as_tensor(images), "labels": torch.as_tensor(labels)}, path)
    else:
        path = tmp_path / "mine.npz"
        getattr(np, writer)(path, images=images, labels=labels)
    cfg = DataConfig(name="tensors", path=str(path), split="train", val_size=100)
    prepare_samples(cfg.model_copy(update={"limit": 32}), tmp_path / "warm", rows_per_group=32)
    info, peak = _peak(lambda: prepare_samples(cfg, tmp_path / "set", rows_per_group=32))
    assert info.num_rows == n - 100 and info.dtype == ("uint8" if kind == "uint8" else "float32")
    assert peak < images.nbytes / 4, f"peak {peak / 2**20:.1f} MiB for {images.nbytes / 2**20:.1f} MiB of images"
    samples = open_samples(tmp_path / "set")
    got, got_labels, _ = samples.read_rows(0, len(samples))
    assert torch.equal(got.view(torch.int32), expected[: n - 100].view(torch.int32))
    assert got_labels.tolist() == labels[: n - 100].tolist()
    assert info.split_fingerprint == load_split(cfg).fingerprint() == samples.split_fingerprint()
    backwards = load_split(cfg.model_copy(update={"offset": 5, "limit": 3}))  # a reader that went forward reopens
    assert torch.equal(backwards.images, expected[5:8])


def test_float_images_out_of_range_are_refused_while_streaming(tmp_path: Path) -> None:
    images = np.full((40, 1, 4, 4), 0.5, dtype=np.float32)
    images[33, 0, 1, 2] = np.nan
    path = tmp_path / "bad.npz"
    np.savez(path, images=images, labels=np.zeros(40, dtype=np.int64))
    with pytest.raises(DataError, match=r"must lie in \[0, 1\]"):
        prepare_samples(DataConfig(name="tensors", path=str(path)), tmp_path / "set", rows_per_group=8)
    assert not (tmp_path / "set").exists() and [p.name for p in tmp_path.iterdir()] == ["bad.npz"]


def test_digits_match_scikit_learn(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    cfg = DataConfig(name="digits", split="test", offset=3, limit=100)
    expected = torch.as_tensor(bunch.images[1300:1400]).unsqueeze(1).float() / 16
    _check_set(cfg, tmp_path / "d", expected)


def test_imagenet_folder_matches_torchvision_totensor(tmp_path: Path) -> None:
    from PIL import Image
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    rng = np.random.default_rng(0)
    for wnid in ("n01440764", "n01443537"):
        folder = tmp_path / "img" / "val" / wnid
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (60, 50, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
    ref = ImageFolder(
        str(tmp_path / "img" / "val"),
        transform=transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()]),
    )
    cfg = DataConfig(name="imagenet", root=str(tmp_path / "img"), split="test", offset=1, limit=6)
    expected = torch.stack([ref[i][0] for i in range(1, 7)])
    _check_set(cfg, tmp_path / "inet", expected, rows_per_group=4)
    (tmp_path / "img" / "val" / "n01440764" / "0.JPEG").write_bytes(b"not an image")
    assert selection_size(cfg) == 6  # counted from the listing: nothing is decoded
