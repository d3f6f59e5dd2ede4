"""Sample sets that are damaged, half-written or prepared twice at once, on real Parquet files.

``store verify`` reads every set through its row-group hashes and reports (and on request moves aside) a
damaged one, including bytes that no longer decode; a damaged set met by a run is moved aside and prepared
again; two preparers racing for the same set (on a local folder, and on a filesystem that cannot rename
folders) both succeed with one complete set, and neither deletes what the other wrote.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from rcat_ray.cli import main
from rcat_ray.config import DataConfig
from rcat_ray.core import samples as samples_mod
from rcat_ray.core.samples import INFO_FILE, open_samples, prepare_samples, samples_in_store, samples_location
from rcat_ray.core.samples import write as samples_write
from rcat_ray.errors import DamagedSetError, DataError
from rcat_ray.report.inventory import verify_store
from rcat_ray.store.result_store import QUARANTINE_DIR
from tests.conftest import snapshot

CFG = DataConfig(name="digits", split="test", limit=100)


def _flip_image_byte(part: Path) -> bytes:
    """Flip one byte inside the compressed image data of the last row group: same size, so only reading the
    pixels can tell (zstd then fails to decode, or the row group's sha256 differs)."""
    meta = pq.read_metadata(part)
    col = meta.row_group(meta.num_row_groups - 1).column(3)
    data = bytearray(part.read_bytes())
    data[col.data_page_offset + col.total_compressed_size // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    return bytes(data)


def _set_folder(store: Path) -> Path:
    return Path(samples_location(str(store), CFG))


def test_quarantine_folder_is_the_stores():
    assert samples_mod.QUARANTINE_FOLDER == QUARANTINE_DIR


# -- store verify ------------------------------------------------------------------------------------------


def test_verify_finds_a_flipped_byte_in_a_part_and_repair_moves_the_set_aside(tmp_path, capsys):
    store = tmp_path / "store"
    good = samples_in_store(str(store), CFG, rows_per_group=25)
    folder = _set_folder(store)
    assert verify_store(store) == []
    damaged = _flip_image_byte(folder / "part-00000.parquet")
    with pytest.raises(DamagedSetError, match=r"part-00000\.parquet"):
        open_samples(folder).read_rows(75, 100)  # a read of the damaged rows names the file, never a raw ZSTD error
    before = snapshot(store)
    findings = verify_store(store)
    assert snapshot(store) == before  # without repair nothing moves
    rel = f"samples/{folder.name}/part-00000.parquet"
    assert [(f["status"], f["kind"], f["key"], f["path"]) for f in findings] == [
        ("damaged", "samples", folder.name, rel)
    ]
    assert "row group 3" in findings[0]["problem"] or "decode" in findings[0]["problem"]
    assert main(["store", "verify", "--store", str(store)]) == 1
    out = capsys.readouterr().out
    assert f"status: damaged, kind: samples, key: {folder.name}, path: {rel}" in out and "1 problem(s) found" in out

    repaired = verify_store(store, repair=True)
    (moved,) = repaired[0]["moved_to"]
    assert moved.startswith(f"{QUARANTINE_DIR}/") and moved.endswith(f"samples/{folder.name}")
    assert (store / moved / "part-00000.parquet").read_bytes() == damaged  # moved, not deleted
    assert not folder.exists() and verify_store(store) == []
    again = samples_in_store(str(store), CFG, rows_per_group=25)  # the next run prepares it again
    assert again.info.fingerprint == good.info.fingerprint
    again.verify()


def test_verify_reports_every_damaged_part_and_a_lost_dataset_json(tmp_path):
    store = tmp_path / "store"
    folder = _set_folder(store)
    prepare_samples(CFG, folder, rows_per_group=10, groups_per_file=2)  # 5 parts, where a run would put them
    part1 = folder / "part-00001.parquet"
    part1.write_bytes(part1.read_bytes()[:-7])
    _flip_image_byte(folder / "part-00003.parquet")
    (folder / "part-00004.parquet").unlink()
    rel = f"samples/{folder.name}"
    found = {f["path"]: f["problem"] for f in verify_store(store)}
    assert set(found) == {f"{rel}/part-0000{i}.parquet" for i in (1, 3, 4)}
    assert "truncated" in found[f"{rel}/part-00001.parquet"] and "missing" in found[f"{rel}/part-00004.parquet"]

    (folder / INFO_FILE).unlink()
    assert [(f["status"], f["path"]) for f in verify_store(store)] == [("damaged", f"{rel}/{INFO_FILE}")]


def test_verify_removes_temporary_folders_of_killed_preparations(tmp_path, capsys):
    store = tmp_path / "store"
    samples_in_store(str(store), CFG, rows_per_group=25)
    folder = _set_folder(store)
    leftover = folder.parent / f".{folder.name}.tmp-0123abcd"
    leftover.mkdir()
    (leftover / "part-00000.parquet").write_bytes(b"half a part")
    findings = verify_store(store)
    assert [(f["status"], f["kind"], f["key"], f["path"]) for f in findings] == [
        ("orphan", "samples", folder.name, f"samples/{leftover.name}")
    ]
    assert leftover.is_dir()
    assert main(["store", "verify", "--store", str(store), "--repair"]) == 0
    assert "1 leftover folder(s) removed" in capsys.readouterr().out
    assert not leftover.exists() and folder.is_dir() and verify_store(store) == []


# -- a damaged set met by a run ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated part", "missing part", "unreadable dataset.json", "no dataset.json"])
def test_a_damaged_set_in_the_store_is_moved_aside_and_prepared_again(tmp_path, caplog, damage):
    store = tmp_path / "store"
    good = samples_in_store(str(store), CFG, rows_per_group=25)
    folder = _set_folder(store)
    part, info = folder / "part-00000.parquet", folder / INFO_FILE
    if damage == "truncated part":
        part.write_bytes(part.read_bytes()[:-100])
    elif damage == "missing part":
        part.unlink()
    elif damage == "unreadable dataset.json":
        info.write_text(info.read_text()[:50])
    else:
        info.unlink()
    left = {p.name: p.read_bytes() for p in folder.iterdir()}
    caplog.set_level(logging.WARNING, logger="rcat_ray")
    again = samples_in_store(str(store), CFG, rows_per_group=25)
    assert again.info.fingerprint == good.info.fingerprint and again.info.created_at
    again.verify()
    assert str(folder) in caplog.text and "damaged sample set" in caplog.text
    (moved,) = (store / QUARANTINE_DIR).glob(f"*/samples/{folder.name}")
    assert {p.name: p.read_bytes() for p in moved.iterdir()} == left  # moved whole, nothing deleted
    assert verify_store(store) == []


def test_a_set_of_another_format_version_is_not_moved(tmp_path):
    """Not damage: a newer rcat_ray's set stays where it is and the run says why it stops."""
    store = tmp_path / "store"
    samples_in_store(str(store), CFG, rows_per_group=25)
    info = _set_folder(store) / INFO_FILE
    info.write_text(json.dumps({**json.loads(info.read_text()), "format_version": 99}))
    before = snapshot(store)
    with pytest.raises(DataError, match="format version 99"):
        samples_in_store(str(store), CFG, rows_per_group=25)
    assert snapshot(store) == before
    assert [f["status"] for f in verify_store(store)] == ["unverifiable"]


# -- two preparers at once -------------------------------------------------------------------------------------


def _race(monkeypatch, target, *, ordered: bool) -> dict[str, object]:
    """Run ``target()`` in two threads, "first" and "second", both past the existence check before either
    writes (a barrier in ``_open_source``, which runs right after it). ``ordered``: "second" publishes only
    after "first" returned, so it deterministically loses. Returns each thread's result or exception."""
    barrier = threading.Barrier(2, timeout=60)
    first_done = threading.Event()
    real_open, real_finish = samples_write._open_source, samples_write._finish

    def open_source(*args):
        barrier.wait()
        return real_open(*args)

    def finish(*args):
        if ordered and threading.current_thread().name == "second":
            assert first_done.wait(60)
        return real_finish(*args)

    monkeypatch.setattr(samples_write, "_open_source", open_source)
    monkeypatch.setattr(samples_write, "_finish", finish)
    results: dict[str, object] = {}

    def run(name):
        try:
            results[name] = target()
        except BaseException as err:  # noqa: BLE001 (reported by the test, not lost in the thread)
            results[name] = err
        finally:
            if name == "first":
                first_done.set()

    threads = [threading.Thread(target=run, args=(n,), name=n) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def _layout() -> int:
    """Rows per group by preparer: different layouts, so parts written over each other's would not add up."""
    return 16 if threading.current_thread().name == "first" else 20


@pytest.mark.parametrize("ordered", [True, False])
def test_two_preparers_on_a_local_folder_end_with_one_set(tmp_path, monkeypatch, ordered):
    dest = tmp_path / "sets" / "digits"
    seen: dict[str, dict[str, int]] = {}
    real_rename = samples_write._prepare_by_rename

    def prepare_and_record(*args):
        info = real_rename(*args)
        if threading.current_thread().name == "first" and ordered:  # the set as the first preparer left it
            seen["first"] = {p.name: p.stat().st_ino for p in dest.iterdir()}
        return info

    monkeypatch.setattr(samples_write, "_prepare_by_rename", prepare_and_record)
    results = _race(monkeypatch, lambda: prepare_samples(CFG, dest, rows_per_group=_layout()), ordered=ordered)
    assert not [r for r in results.values() if isinstance(r, BaseException)], results
    assert results["first"] == results["second"]  # both return the one set that was published
    assert sorted(p.name for p in dest.parent.iterdir()) == ["digits"]  # the loser removed its temporary folder
    if ordered:  # the set the first preparer finished is the one left: not deleted, not replaced
        assert {p.name: p.stat().st_ino for p in dest.iterdir()} == seen["first"]
    samples = open_samples(dest)
    assert samples.info == results["first"]
    samples.verify()


@pytest.mark.parametrize("ordered", [True, False])
def test_two_preparers_on_a_filesystem_without_folder_rename(monkeypatch, ordered):
    """An in-memory pyarrow filesystem (no folder rename, as on object storage): each preparer writes its parts
    into a subfolder of its own, dataset.json names one of them, and the loser removes only its own."""
    fs = pafs.SubTreeFileSystem("bucket", pafs._MockFileSystem())
    results = _race(
        monkeypatch,
        lambda: prepare_samples(CFG, "sets/digits", filesystem=fs, rows_per_group=_layout()),
        ordered=ordered,
    )
    assert not [r for r in results.values() if isinstance(r, BaseException)], results
    samples = open_samples("sets/digits", filesystem=fs)
    samples.verify()
    owners = {p.name.split("/")[0] for p in samples.info.parts}
    assert len(owners) == 1
    listing = {i.base_name for i in fs.get_file_info(pafs.FileSelector("sets/digits"))}
    for info in results.values():  # whatever each call returned is complete and readable
        assert info.fingerprint == samples.info.fingerprint
        assert all(fs.get_file_info(f"sets/digits/{p.name}").size == p.size for p in info.parts)
    if ordered:  # the loser saw the winner's dataset.json: it returns that set and its own parts are gone
        assert results["first"] == results["second"] == samples.info and samples.info.rows_per_group == 16
        assert listing == {INFO_FILE, *owners}


def test_a_failed_preparation_without_folder_rename_leaves_nothing(monkeypatch):
    fs = pafs.SubTreeFileSystem("bucket", pafs._MockFileSystem())

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(samples_write, "_finish", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare_samples(CFG, "sets/digits", filesystem=fs, rows_per_group=16)
    assert fs.get_file_info(pafs.FileSelector("sets/digits", allow_not_found=True)) == []


def test_damage_in_what_a_run_writes_is_reported_as_it_is(tmp_path, monkeypatch):
    """Nothing stored to move aside: the run's own failure comes out, not a confusing "does not exist"."""

    def unreadable(fs, folder, uri, info, source):
        raise DamagedSetError(uri, "part-00000.parquet", "cannot be decoded (disk error)")

    monkeypatch.setattr(samples_write, "_finish", unreadable)
    with pytest.raises(DamagedSetError, match=r"part-00000\.parquet cannot be decoded \(disk error\)"):
        samples_in_store(str(tmp_path / "store"), CFG, rows_per_group=25)
    assert not (tmp_path / "store" / QUARANTINE_DIR).exists() and list((tmp_path / "store" / "samples").iterdir()) == []
