"""Prepared sample sets: stored once as Parquet, read a chunk at a time, bit-identical to ``load_split``.

The tensors a set gives back must equal ``load_split``'s bit for bit (the per-sample tables and their cache
keys must not change when evaluation switches to sets), so every comparison here is on the float32 bits.
"""

from __future__ import annotations

import json
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from rcat_ray.config import DataConfig
from rcat_ray.core.data import Split, load_split, prepare_fashion_mnist
from rcat_ray.core.samples import (
    INFO_FILE,
    SampleSet,
    decode_images,
    open_samples,
    prepare_samples,
)
from rcat_ray.errors import DataError


def assert_same(samples: SampleSet, split: Split, start: int = 0, stop: int | None = None) -> None:
    """Rows [start, stop) of the set equal the split's, float bits included (-0.0 vs 0.0 would differ)."""
    stop = len(split) if stop is None else stop
    images, labels, ids = samples.read_rows(start, stop)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64 and ids.dtype == torch.int64
    assert images.shape == split.images[start:stop].shape
    assert torch.equal(images.view(torch.int32), split.images[start:stop].contiguous().view(torch.int32))
    assert torch.equal(labels, split.labels[start:stop]) and torch.equal(ids, split.sample_ids[start:stop])


# -- in-memory sources ------------------------------------------------------------------------------
def test_digits_round_trip_is_bit_identical(tmp_path):
    cfg = DataConfig(name="digits", split="val", val_size=300, offset=20, limit=250)
    split = load_split(cfg)
    info = prepare_samples(cfg, tmp_path / "digits", rows_per_group=32, groups_per_file=3)
    assert (info.dtype, info.scale, info.shape, info.num_rows) == ("uint8", 16.0, (1, 8, 8), 250)
    assert info.preprocessing is None and info.class_names == tuple(str(i) for i in range(10))
    assert [p.name for p in info.parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [p.num_rows for p in info.parts] == [96, 96, 58] and len(info.parts[2].row_groups) == 2
    samples = open_samples(tmp_path / "digits")
    assert len(samples) == 250 and samples.info == info
    assert samples.describe() == split.describe()  # result-table cache keys do not change
    assert_same(samples, split)
    assert_same(samples, split, 31, 33)  # across a row group boundary
    assert_same(samples, split, 90, 200)  # across part files
    assert_same(samples, split, 249, 250)
    assert samples.read_rows(5, 5)[0].shape == (0, 1, 8, 8)
    with pytest.raises(IndexError):
        samples.read_rows(0, 251)
    samples.verify()
    stored = json.loads((tmp_path / "digits" / INFO_FILE).read_text())
    assert stored["selection"] == {"dataset": "digits", "split": "val", "offset": 20, "limit": 250, "val_size": 300}
    assert len(stored["fingerprint"]) == 64 and stored["split_fingerprint"] == split.fingerprint()


def test_each_part_file_describes_itself(tmp_path):
    """A reader that never sees dataset.json (Ray Data) finds shape, dtype and scale in the schema metadata."""
    info = prepare_samples(DataConfig(name="digits", limit=40), tmp_path / "d", rows_per_group=16)
    schema = pq.read_schema(tmp_path / "d" / "part-00000.parquet")
    assert schema.names == ["position", "sample_id", "label", "image"]
    assert schema.field("label").type == pa.int32() and schema.field("image").type == pa.binary()
    meta = json.loads(schema.metadata[b"rcat_ray.samples"])
    assert meta["shape"] == [1, 8, 8] and meta["dtype"] == "uint8" and meta["scale"] == 16.0
    md = pq.ParquetFile(tmp_path / "d" / "part-00000.parquet").metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [16, 16, 8]
    assert info.num_rows == 40


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    prepare_fashion_mnist(root)
    return root


def test_fashion_mnist_slice_is_bit_identical(fmnist_root, tmp_path):
    cfg = DataConfig(name="fashion_mnist", root=str(fmnist_root), split="test", offset=100, limit=2000)
    split = load_split(cfg)
    info = prepare_samples(cfg, tmp_path / "fm")
    assert (info.dtype, info.scale, info.shape, info.num_classes) == ("uint8", 255.0, (1, 28, 28), 10)
    assert info.class_names[9] == "Ankle boot" and info.sample_id_min == 100 and info.sample_id_max == 2099
    samples = open_samples(tmp_path / "fm")
    assert_same(samples, split)
    assert samples.describe() == split.describe()
    # stored once as uint8: about a quarter of load_split's float32 bytes, before compression
    size = sum(p.size for p in info.parts)
    assert size < split.images.numel()


def test_a_chunk_reads_only_its_row_groups(fmnist_root, tmp_path, monkeypatch):
    cfg = DataConfig(name="fashion_mnist", root=str(fmnist_root), split="test", limit=1000)
    prepare_samples(cfg, tmp_path / "fm", rows_per_group=100, groups_per_file=4)
    samples = open_samples(tmp_path / "fm")
    calls = []
    original = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, *args, **kwargs):
        calls.append(list(row_groups))
        return original(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    samples.read_rows(500, 600)  # exactly global group 5 = group 1 of part 1
    assert calls == [[1]]
    calls.clear()
    samples.read_rows(350, 420)  # groups 3 (part 0) and 4 (part 1)
    assert calls == [[3], [0]]


def _write_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, images=images, labels=labels)
    return path


def test_tensors_uint8_and_float_images(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=37)
    cases = {
        "u8": (rng.integers(0, 256, size=(37, 3, 5, 6), dtype=np.uint8), "uint8"),
        # values k/255 computed the way load_split computes them: uint8 stores them exactly
        "k255": ((rng.integers(0, 256, size=(37, 5, 6)).astype(np.float32) / np.float32(255.0)), "uint8"),
        # arbitrary floats in [0, 1] are not k/255: stored as float32, still bit-identical
        "float": (rng.random(size=(37, 2, 5, 6)).astype(np.float32), "float32"),
        "float64": (rng.random(size=(37, 5, 6)), "float32"),
    }
    for name, (images, dtype) in cases.items():
        cfg = DataConfig(name="tensors", path=str(_write_npz(tmp_path / f"{name}.npz", images, labels)), limit=30)
        split = load_split(cfg)
        info = prepare_samples(cfg, tmp_path / f"set-{name}", rows_per_group=8)
        assert info.dtype == dtype, name
        assert info.scale == (255.0 if dtype == "uint8" else 1.0)
        samples = open_samples(tmp_path / f"set-{name}")
        assert_same(samples, split)
        assert_same(samples, split, 7, 23)  # rows of three groups, gathered
        assert_same(samples, split, 9, 14)  # rows inside one group, decoded from a view of it
        assert samples.describe() == split.describe()
        assert info.selection["source"]["sha256"]  # a changed file is a different selection


def _write_cifar10(root: Path, n_per_batch: int = 6) -> None:
    """A CIFAR-10 folder in the official python format (pickled dicts of uint8 rows of 3072, RRR..GGG..BBB)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        batch = {"batch_label": name, "data": data, "labels": rng.integers(0, 10, n_per_batch).tolist()}
        (folder / name).write_bytes(pickle.dumps({**batch, "filenames": []}, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}, protocol=2))


def test_cifar10_official_format(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    _write_cifar10(tmp_path / "data")
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "data"), split="train", val_size=10)
    split = load_split(cfg)
    info = prepare_samples(cfg, tmp_path / "c10", rows_per_group=4)
    assert (info.dtype, info.shape, info.class_names[0]) == ("uint8", (3, 32, 32), "airplane")
    assert_same(open_samples(tmp_path / "c10"), split)


# -- reuse, never overwrite, atomic ----------------------------------------------------------------
def test_preparing_again_reuses_the_set_and_never_overwrites(tmp_path):
    cfg = DataConfig(name="digits", limit=100)
    dest = tmp_path / "set"
    info = prepare_samples(cfg, dest, rows_per_group=16)
    stamps = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    again = prepare_samples(cfg, dest, rows_per_group=64)  # another layout asked: the existing set is returned
    assert again == info and again.rows_per_group == 16
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == stamps
    with pytest.raises(DataError, match="already holds a different sample set"):
        prepare_samples(DataConfig(name="digits", limit=101), dest)
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == stamps
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a sample set"):
        prepare_samples(cfg, other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert prepare_samples(cfg, tmp_path / "empty").fingerprint == info.fingerprint  # deterministic content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "other", "set"]  # no temporary leftovers


def test_a_failed_preparation_leaves_nothing(tmp_path):
    bad = tmp_path / "broken"
    for cls in ("a", "b"):
        (bad / "val" / cls).mkdir(parents=True)
        _jpeg(bad / "val" / cls / "0.jpeg", np.random.default_rng(1), (64, 80))
    (bad / "val" / "b" / "1.jpeg").write_bytes(b"\xff\xd8 not a jpeg")
    cfg = DataConfig(name="imagenet", root=str(bad), split="test")
    with pytest.raises(DataError, match=r"cannot decode ImageNet image .*1\.jpeg"):
        prepare_samples(cfg, tmp_path / "out" / "set", rows_per_group=1)
    assert list((tmp_path / "out").iterdir()) == []  # neither the set nor its temporary folder


# -- integrity --------------------------------------------------------------------------------------
def test_missing_dataset_json_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"nowhere does not exist: it is not a prepared sample set"):
        open_samples(tmp_path / "nowhere")
    prepare_samples(DataConfig(name="digits", limit=20), tmp_path / "set")
    (tmp_path / "set" / INFO_FILE).unlink()
    with pytest.raises(DataError, match=rf"{tmp_path / 'set'} has no dataset.json"):
        open_samples(tmp_path / "set")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / INFO_FILE).write_text("{not json")
    with pytest.raises(DataError, match=r"bad/dataset.json is unreadable"):
        open_samples(tmp_path / "bad")


def test_altered_pixels_fail_their_fingerprint(tmp_path):
    dest = tmp_path / "set"
    info = prepare_samples(DataConfig(name="digits", limit=64), dest, rows_per_group=16)
    part = dest / "part-00000.parquet"
    table = pq.read_table(part)
    images = table.column("image").to_pylist()
    images[20] = bytes([16 - images[20][0]]) + images[20][1:]  # one pixel of position 20 (row group 1)
    table = table.set_column(3, "image", pa.array(images, pa.binary()))
    pq.write_table(table, part, row_group_size=16)
    # a replaced file of the recorded size: only the row group's sha256 can tell
    stored = json.loads((dest / INFO_FILE).read_text())
    stored["parts"][0]["size"] = part.stat().st_size
    (dest / INFO_FILE).write_text(json.dumps(stored))
    samples = open_samples(dest)
    samples.read_rows(0, 16)  # row group 0 is intact
    with pytest.raises(DataError, match=r"part-00000.parquet: row group 1 \(positions 16..31\) does not match"):
        samples.read_rows(10, 30)
    with pytest.raises(DataError, match=r"part-00000\.parquet"):
        samples.verify()
    with pytest.raises(DataError, match=r"part-00000\.parquet"):
        list(samples.iter_batches(8))
    assert info.num_rows == 64


def test_truncated_or_missing_parts_are_named(tmp_path):
    dest = tmp_path / "set"
    prepare_samples(DataConfig(name="digits", limit=64), dest, rows_per_group=16, groups_per_file=2)
    part = dest / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"part-00001.parquet has \d+ bytes, dataset.json records"):
        open_samples(dest)
    part.unlink()
    with pytest.raises(DataError, match=r"part-00001.parquet is missing"):
        open_samples(dest)


def test_whole_fingerprint_is_checked_by_verify(tmp_path):
    dest = tmp_path / "set"
    prepare_samples(DataConfig(name="digits", limit=40), dest, rows_per_group=16)
    stored = json.loads((dest / INFO_FILE).read_text())
    stored["fingerprint"] = "0" * 64
    (dest / INFO_FILE).write_text(json.dumps(stored))
    with pytest.raises(DataError, match="do not match the fingerprint"):
        open_samples(dest).verify()


# -- reading for training and for Ray ---------------------------------------------------------------
def test_iter_batches_in_order_and_shuffled(tmp_path):
    cfg = DataConfig(name="digits", split="train")
    split = load_split(cfg)
    prepare_samples(cfg, tmp_path / "s", rows_per_group=50)
    samples = open_samples(tmp_path / "s")
    batches = list(samples.iter_batches(128))
    assert len(split) == 1097 and [len(b[1]) for b in batches] == [128] * 8 + [73]
    assert torch.equal(torch.cat([b[0] for b in batches]), split.images)
    perm = np.random.default_rng(0).permutation(len(split))
    for cache in (256 * 2**20, 1):  # a cache that holds the set, and one that holds almost nothing
        batches = list(samples.iter_batches(100, positions=perm, drop_last=True, cache_bytes=cache))
        assert len(batches) == len(split) // 100
        got = torch.cat([b[0] for b in batches])
        assert torch.equal(got, split.images[perm[: len(got)]])
        assert torch.equal(torch.cat([b[2] for b in batches]), split.sample_ids[perm[: len(got)]])


def test_ray_style_reads_decode_the_same(tmp_path):
    """What a Ray Data ``read_parquet`` batch holds (positions, ids, labels, image bytes) decodes to the same
    tensors: the positions column says where each row belongs, whatever order the blocks come in."""
    cfg = DataConfig(name="digits", limit=100)
    split = load_split(cfg)
    prepare_samples(cfg, tmp_path / "s", rows_per_group=16, groups_per_file=2)
    samples = open_samples(tmp_path / "s")
    table = pq.read_table(samples.files[1], filesystem=samples.filesystem)
    pos = table.column("position").to_numpy()
    assert pos.tolist() == list(range(32, 64))
    from_arrow = decode_images(table.column("image"), samples.info)
    from_numpy = decode_images(table.column("image").to_numpy(zero_copy_only=False), samples.info)  # bytes objects
    expected = split.images[pos].numpy().view(np.int32)
    for images in (from_arrow, from_numpy):
        assert images.dtype == np.float32 and np.array_equal(images.view(np.int32), expected)
    assert table.column("sample_id").to_numpy().tolist() == split.sample_ids[pos].tolist()


def test_a_sample_set_pickles_for_workers(tmp_path):
    prepare_samples(DataConfig(name="digits", limit=50), tmp_path / "s", rows_per_group=16)
    samples = open_samples(tmp_path / "s")
    samples.read_rows(0, 20)  # caches footers, which must not travel
    clone = pickle.loads(pickle.dumps(samples))
    assert torch.equal(clone.read_rows(10, 40)[0], samples.read_rows(10, 40)[0])


def test_uris_and_pyarrow_filesystems(tmp_path):
    cfg = DataConfig(name="digits", limit=60)
    split = load_split(cfg)
    uri = (tmp_path / "with space" / "set").as_uri()  # file:///.../with%20space/set
    info = prepare_samples(cfg, uri, rows_per_group=16)
    assert (tmp_path / "with space" / "set" / INFO_FILE).is_file()
    samples = open_samples(uri)
    assert samples.uri == uri and samples.info == info
    assert_same(samples, split)
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    info2 = prepare_samples(cfg, "nested/set", filesystem=sub, rows_per_group=16)
    assert (tmp_path / "nested" / "set" / "part-00000.parquet").is_file()
    assert info2.fingerprint == info.fingerprint
    assert_same(open_samples("nested/set", filesystem=sub), split)
    assert prepare_samples(cfg, "nested/set", filesystem=sub) == info2  # reused through the filesystem too


def test_object_store_path_writes_parts_then_dataset_json(tmp_path, monkeypatch):
    """Object stores cannot rename folders: parts go under a subfolder of the preparer's own and dataset.json,
    written last, names them."""
    from rcat_ray.core.samples import write

    monkeypatch.setattr(write, "_renames_folders", lambda fs: False)
    cfg = DataConfig(name="digits", limit=60)
    info = prepare_samples(cfg, tmp_path / "s", rows_per_group=16, groups_per_file=2)
    (own,) = {p.name.split("/")[0] for p in info.parts}
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted([INFO_FILE, own])
    assert [p.name for p in info.parts] == [f"{own}/part-00000.parquet", f"{own}/part-00001.parquet"]
    assert sorted(p.name for p in (tmp_path / "s" / own).iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert_same(open_samples(tmp_path / "s"), load_split(cfg))
    assert prepare_samples(cfg, tmp_path / "s") == info


# -- ImageNet (ImageFolder) -------------------------------------------------------------------------
def _jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int], mode: str = "RGB") -> None:
    from PIL import Image

    h, w = size
    if mode == "L":
        Image.fromarray(rng.integers(0, 256, size=(h, w), dtype=np.uint8), "L").save(path, quality=90)
    else:
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB").save(path, quality=90)


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    """A tiny ImageNet: 3 class folders of 256x300 random-colour JPEGs (one grey, one small), train = val."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(("n01440764", "n01443537", "n01484850")):
        folder = root / "val" / wnid
        folder.mkdir(parents=True)
        for i in range(12):
            mode = "L" if (c, i) == (1, 3) else "RGB"
            size = (120, 200) if (c, i) == (2, 5) else (256, 300)
            _jpeg(folder / f"ILSVRC2012_val_{c:02d}{i:03d}.JPEG", rng, size, mode)
    (root / "train").symlink_to(root / "val", target_is_directory=True)
    return root


def test_imagenet_matches_load_split(imagenet_root, tmp_path):
    for cfg in (
        DataConfig(name="imagenet", root=str(imagenet_root), split="test", offset=3, limit=30),
        DataConfig(name="imagenet", root=str(imagenet_root), split="val", val_size=10),
    ):
        split = load_split(cfg)
        dest = tmp_path / cfg.split
        info = prepare_samples(cfg, dest, rows_per_group=8, groups_per_file=2)
        assert info.preprocessing == {"resize": 256, "center_crop": 224} and info.shape == (3, 224, 224)
        assert info.dtype == "uint8" and info.class_names == ("n01440764", "n01443537", "n01484850")
        assert "pillow" in info.versions
        samples = open_samples(dest)
        assert_same(samples, split)
        assert_same(samples, split, 5, 9)
        assert samples.describe() == split.describe()


def test_imagenet_preparation_holds_one_row_group(tmp_path):
    """Images are decoded one at a time into a row-group buffer: traced memory stays far below the set's."""
    root = tmp_path / "in"
    rng = np.random.default_rng(0)
    n = 160
    for c in range(2):
        (root / "val" / f"c{c}").mkdir(parents=True)
        for i in range(n // 2):
            _jpeg(root / "val" / f"c{c}" / f"{i:03d}.jpeg", rng, (48, 64))  # small files: decode is cheap
    cfg = DataConfig(name="imagenet", root=str(root), split="test")
    set_bytes = n * 3 * 224 * 224  # the stored uint8 pixels; load_split's floats are 4x this
    prepare_samples(cfg, tmp_path / "warm", rows_per_group=4)  # imports and first-use caches outside the trace
    tracemalloc.start()
    try:
        info = prepare_samples(cfg, tmp_path / "set", rows_per_group=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.num_rows == n
    assert peak < set_bytes / 8, f"peak traced memory {peak / 2**20:.1f} MiB for {set_bytes / 2**20:.1f} MiB of pixels"
