"""Data sources: stable ids, deterministic splits, the real torchvision readers on real on-disk formats."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from rcat_ray.config import DataConfig
from rcat_ray.core.data import DIGITS_TRAIN_SIZE, load_split, prepare_fashion_mnist
from rcat_ray.errors import DataError


def test_digits_splits_are_disjoint_and_stable():
    train = load_split(DataConfig(name="digits", split="train"))
    val = load_split(DataConfig(name="digits", split="val"))
    test = load_split(DataConfig(name="digits", split="test"))
    assert len(train) + len(val) == DIGITS_TRAIN_SIZE and len(test) == 1797 - DIGITS_TRAIN_SIZE
    ids = [set(s.sample_ids.tolist()) for s in (train, val, test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert train.images.shape[1:] == (1, 8, 8) and train.images.min() >= 0 and train.images.max() <= 1
    sub = load_split(DataConfig(name="digits", split="test", offset=10, limit=5))
    assert sub.sample_ids.tolist() == test.sample_ids[10:15].tolist()
    assert torch.equal(sub.images, test.images[10:15])
    assert sub.fingerprint() == load_split(DataConfig(name="digits", split="test", offset=10, limit=5)).fingerprint()
    assert sub.fingerprint() != load_split(DataConfig(name="digits", split="test", offset=11, limit=5)).fingerprint()


def test_fashion_mnist_from_the_debian_package(tmp_path):
    """The demo's data: the package's .gz files, gunzipped once, read by torchvision's own reader."""
    raw = prepare_fashion_mnist(tmp_path)
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    )
    test = load_split(DataConfig(name="fashion_mnist", root=str(tmp_path), split="test", limit=100))
    val = load_split(DataConfig(name="fashion_mnist", root=str(tmp_path), split="val", limit=10))
    assert test.images.shape == (100, 1, 28, 28) and test.num_classes == 10
    assert test.class_names[9] == "Ankle boot"
    assert val.sample_ids.tolist() == list(range(50_000, 50_010))  # val is the tail of the 60k train file
    assert len(set(test.labels.tolist())) > 5


def test_missing_fashion_mnist_says_what_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "data", source=tmp_path / "nowhere")


def _write_cifar10(root, n_per_batch=6, seed=0):
    """A CIFAR-10 folder in the official python format (pickled dicts, uint8 rows of 3072)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        batches[name] = (data, labels)
        with (folder / name).open("wb") as fh:
            pickle.dump({"batch_label": name, "data": data, "labels": labels, "filenames": []}, fh, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with (folder / "batches.meta").open("wb") as fh:
        pickle.dump({"label_names": names, "num_cases_per_batch": n_per_batch}, fh, protocol=2)
    return batches


def test_cifar10_official_format_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    batches = _write_cifar10(tmp_path)
    # torchvision checks the official MD5s even with download=False: switched off for this test only
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    test = load_split(DataConfig(name="cifar10", root=str(tmp_path), split="test"))
    data, labels = batches["test_batch"]
    assert test.images.shape == (6, 3, 32, 32)
    expected = torch.as_tensor(data.reshape(-1, 3, 32, 32)).float() / 255
    assert torch.equal(test.images, expected)  # channel order and scaling as the official layout defines
    assert test.labels.tolist() == labels and test.class_names[0] == "airplane"
    train = load_split(DataConfig(name="cifar10", root=str(tmp_path), split="train", val_size=10))
    assert len(train) == 20 and train.sample_ids.tolist() == list(range(20))


def test_missing_cifar10_says_where_to_place_it(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_split(DataConfig(name="cifar10", root=str(tmp_path)))


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_user_tensors(tmp_path, suffix):
    images = np.random.default_rng(0).integers(0, 256, size=(12, 3, 4, 4), dtype=np.uint8)
    labels = np.arange(12) % 3
    path = tmp_path / f"mine{suffix}"
    if suffix == ".pt":
        torch.save(
            {
                "images": torch.as_tensor(images),
                "labels": torch.as_tensor(labels),
                "sample_ids": torch.arange(100, 112),
            },
            path,
        )
    else:
        np.savez(path, images=images, labels=labels)
    split = load_split(DataConfig(name="tensors", path=str(path), split="test", limit=5))
    assert split.num_classes == 3 and split.images.shape == (5, 3, 4, 4)
    assert torch.allclose(split.images * 255, torch.as_tensor(images[:5]).float())
    assert split.sample_ids[0] == (100 if suffix == ".pt" else 0)


def test_empty_selection_is_an_error():
    with pytest.raises(DataError, match="empty"):
        load_split(DataConfig(name="digits", split="test", offset=10_000))


def test_imagenet_folder_slice(tmp_path):
    """ImageNet in ImageFolder layout, preprocessed as RobustBench (resize 256, crop 224); only the slice is read."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for wnid in ("n01440764", "n01443537"):
        folder = tmp_path / "val" / wnid
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    split = load_split(DataConfig(name="imagenet", root=str(tmp_path), split="test", offset=2, limit=3))
    assert split.images.shape == (3, 3, 224, 224) and split.num_classes == 2
    assert split.sample_ids.tolist() == [2, 3, 4] and split.labels.tolist() == [0, 1, 1]
    with pytest.raises(DataError, match="val/<wnid>"):
        load_split(DataConfig(name="imagenet", root=str(tmp_path / "none")))
