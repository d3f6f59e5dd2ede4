"""Store integrity on a real local Ray with real Parquet files.

A damaged table, chunk or comparison is detected when it is reused, moved aside (still on disk) and
recomputed to what a clean run gives; ``verify_store`` finds damage without touching the store and repairs it
on request; keys resolve by unique prefix; a model with NaN/inf outputs is refused and never stored.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rcat_ray.config import AttackConfig, BootstrapConfig, ComputeConfig, DataConfig
from rcat_ray.core.data import load_split
from rcat_ray.core.flips import METRICS
from rcat_ray.core.models import from_module, save_checkpoint
from rcat_ray.errors import EvaluationInputError, NonFiniteOutputError, StoreError
from rcat_ray.evaluate import plan as evaluation
from rcat_ray.evaluate.comparison import compare_stored
from rcat_ray.evaluate.config import CompareConfig, EvaluateConfig
from rcat_ray.evaluate.plan import EvaluationPlan, run_chunk
from rcat_ray.evaluate.run import run_compare, run_evaluate
from rcat_ray.report.inventory import describe_entry, list_entries, resolve_key, verify_store
from rcat_ray.store.result_store import ResultStore
from tests.conftest import snapshot

pytestmark = pytest.mark.ray

DATA = DataConfig(name="digits", split="test", limit=100)  # 4 chunks of 25
ATTACK = AttackConfig(eps=0.1, n_iter=5, seed=2)
PLACEHOLDER = {"source": "builtin", "name": "mlp"}  # the real models are passed in memory


def _settings(store: Path) -> dict:
    return {
        "data": DATA,
        "attack": ATTACK,
        "chunk_size": 25,
        "store": str(store),
        "compute": ComputeConfig(num_workers=1, cpus_per_worker=1.0, threads_per_worker=1),
    }


def _compare_cfg(store: Path, bootstrap_seed: int = 0) -> CompareConfig:
    bootstrap = BootstrapConfig(n_resamples=50, seed=bootstrap_seed)
    return CompareConfig(**_settings(store), old=PLACEHOLDER, new=PLACEHOLDER, bootstrap=bootstrap)


def _evaluate_cfg(store: Path) -> EvaluateConfig:
    return EvaluateConfig(**_settings(store), models=(PLACEHOLDER,)).model_copy(update={"models": ()})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _truncate(path: Path) -> bytes:
    """Cut a file in half, as an interrupted copy does; returns what is left."""
    data = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(data)
    return data


def _alter(path: Path) -> bytes:
    """Flip one byte in the middle (same size: only the checksum can tell); returns the new content."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


def _quarantined(store: Path, rel: str) -> list[Path]:
    """Where a store-relative file went when it was moved aside."""
    return sorted(p for p in (store / "quarantine").glob(f"*/{rel}") if p.is_file())


@dataclass
class Clean:
    """A store after one clean ``compare`` of the digits models, and what it holds."""

    root: Path
    old_key: str
    new_key: str
    comparison_key: str
    tables: dict[str, pa.Table]
    flips: pa.Table
    summary: dict


@pytest.fixture(scope="module")
def clean(ray_session, digits_models, tmp_path_factory) -> Clean:
    old, new = digits_models
    root = tmp_path_factory.mktemp("clean") / "store"
    outcomes, comparison, _ = run_compare(_compare_cfg(root), old=old, new=new)
    assert comparison is not None and all(o.chunks_computed == 4 for o in outcomes)
    keys = [o.key for o in outcomes]
    tables = {k: pq.read_table(root / f"tables/{k}/table.parquet") for k in keys}
    return Clean(root, keys[0], keys[1], comparison.key, tables, comparison.flips, comparison.summary)


@pytest.fixture
def store(clean: Clean, tmp_path: Path) -> Path:
    """A private copy of the clean store, free to damage."""
    dest = tmp_path / "store"
    shutil.copytree(clean.root, dest)
    return dest


# -- damaged artifacts are moved aside and recomputed -------------------------------------------------------


def test_truncated_table_is_moved_aside_and_rebuilt_from_its_chunks(clean, store, digits_models, caplog):
    old, new = digits_models
    table = store / f"tables/{clean.new_key}/table.parquet"
    damaged = _truncate(table)
    caplog.set_level(logging.WARNING, logger="rcat_ray")
    # a new comparison (another bootstrap seed) over the damaged table: it used to die in "magic bytes"
    outcomes, comparison, _ = run_compare(_compare_cfg(store, bootstrap_seed=7), old=old, new=new)
    assert str(table) in caplog.text and "truncated" in caplog.text
    assert [(o.complete, o.chunks_computed, o.chunks_cached) for o in outcomes] == [(True, 0, 4), (True, 0, 4)]
    moved = _quarantined(store, f"tables/{clean.new_key}/table.parquet")
    assert len(moved) == 1 and moved[0].read_bytes() == damaged  # moved, not deleted
    assert pq.read_table(table).equals(clean.tables[clean.new_key])  # reassembled from the chunks
    manifest = json.loads((store / f"tables/{clean.new_key}/manifest.json").read_text())
    assert manifest["files"]["table.parquet"] == {"sha256": _sha256(table), "size": table.stat().st_size}
    assert comparison is not None and comparison.key != clean.comparison_key
    assert comparison.flips.equals(clean.flips)
    assert verify_store(store) == []


def test_compare_on_a_damaged_table_names_it_and_moves_it_aside(clean, store):
    table = store / f"tables/{clean.old_key}/table.parquet"
    _alter(table)
    with pytest.raises(StoreError, match="moved aside") as err:
        compare_stored(ResultStore(store), clean.old_key, clean.new_key, BootstrapConfig(n_resamples=50, seed=3))
    assert str(table) in str(err.value) and "sha256" in str(err.value)
    assert not table.exists() and len(_quarantined(store, f"tables/{clean.old_key}/table.parquet")) == 1
    assert not (store / f"tables/{clean.old_key}/manifest.json").exists()  # the table is no longer "done"


def test_damaged_chunks_are_recomputed_and_the_table_equals_a_clean_run(clean, store, digits_models, caplog):
    _, new = digits_models
    folder = store / f"tables/{clean.new_key}"
    # as if the run had stopped before assembling: no table yet, and three kinds of bad chunks
    (folder / "table.parquet").unlink()
    (folder / "manifest.json").unlink()
    truncated = _truncate(folder / "chunks/chunk-000001.parquet")
    _alter(folder / "chunks/adv-000002.npz")  # same size: found when the images are read, see below
    altered = _alter(folder / "chunks/chunk-000000.parquet")
    (folder / "chunks/chunk-000003.json").unlink()  # rows written, manifest never: the chunk is not done
    caplog.set_level(logging.WARNING, logger="rcat_ray")
    (outcome,), _ = run_evaluate(_evaluate_cfg(store), extra_models=[new])
    assert outcome.complete and (outcome.chunks_computed, outcome.chunks_cached) == (3, 1)
    assert "chunk-000001.parquet" in caplog.text and "chunk-000000.parquet" in caplog.text
    assert _quarantined(store, f"tables/{clean.new_key}/chunks/chunk-000001.parquet")[0].read_bytes() == truncated
    assert _quarantined(store, f"tables/{clean.new_key}/chunks/chunk-000000.parquet")[0].read_bytes() == altered
    assert pq.read_table(folder / "table.parquet").equals(clean.tables[clean.new_key])
    chunk = json.loads((folder / "chunks/chunk-000001.json").read_text())
    assert chunk["files"]["chunk-000001.parquet"]["sha256"] == _sha256(folder / "chunks/chunk-000001.parquet")
    assert chunk["node"] and chunk["pid"] > 0
    # the altered images of chunk 2 (not hashed on resume: only their size is) are caught by the full check
    assert [(f["status"], f["path"]) for f in verify_store(store)] == [
        ("damaged", f"tables/{clean.new_key}/chunks/adv-000002.npz")
    ]


@pytest.mark.parametrize(("name", "damage"), [("flips.parquet", _truncate), ("summary.json", _alter)])
def test_damaged_comparison_is_recomputed(clean, store, digits_models, caplog, name, damage):
    old, new = digits_models
    target = store / f"comparisons/{clean.comparison_key}/{name}"
    damaged = damage(target)
    caplog.set_level(logging.WARNING, logger="rcat_ray")
    outcomes, comparison, _ = run_compare(_compare_cfg(store), old=old, new=new)
    assert all(o.chunks_computed == 0 for o in outcomes)
    assert str(target) in caplog.text
    assert comparison is not None and comparison.key == clean.comparison_key
    assert comparison.summary == clean.summary and comparison.flips.equals(clean.flips)
    assert _quarantined(store, f"comparisons/{clean.comparison_key}/{name}")[0].read_bytes() == damaged
    assert json.loads((store / f"comparisons/{clean.comparison_key}/summary.json").read_text()) == clean.summary
    assert verify_store(store) == []


# -- verify_store -------------------------------------------------------------------------------------------


def test_verify_store_reports_damage_leaves_the_store_alone_and_repairs_on_request(clean, store, digits_models):
    old, new = digits_models
    before = snapshot(store)
    assert verify_store(store) == [] and verify_store(store, repair=True) == []
    assert snapshot(store) == before

    chunk = f"tables/{clean.old_key}/chunks/chunk-000002.parquet"
    summary = f"comparisons/{clean.comparison_key}/summary.json"
    stray = f"tables/{clean.new_key}/chunks/chunk-000009.parquet"
    truncated = _truncate(store / chunk)
    _alter(store / summary)
    (store / stray).write_bytes(b"left by a crashed writer")
    before = snapshot(store)
    findings = verify_store(store)
    assert snapshot(store) == before  # without repair nothing is written, moved or created
    by_path = {f["path"]: f for f in findings}
    assert set(by_path) == {chunk, summary, stray}
    assert (by_path[chunk]["status"], by_path[chunk]["kind"], by_path[chunk]["key"]) == (
        "damaged",
        "chunk",
        clean.old_key,
    )
    assert "truncated" in by_path[chunk]["problem"] and "sha256" in by_path[summary]["problem"]
    assert by_path[stray]["status"] == "orphan"
    assert all(f["moved_to"] == [] for f in findings)

    repaired = verify_store(store, repair=True)
    assert {f["path"] for f in repaired} == {chunk, summary, stray}
    for f in repaired:
        assert f["moved_to"] and all((store / m).is_file() for m in f["moved_to"])
        assert not (store / f["path"]).exists()
    assert _quarantined(store, chunk)[0].read_bytes() == truncated
    assert not (store / f"tables/{clean.old_key}/chunks/chunk-000002.json").exists()  # the whole chunk went
    assert not (store / f"comparisons/{clean.comparison_key}/manifest.json").exists()
    # what is left is a finished table short of one chunk, which the next run recomputes
    assert [(f["status"], f["path"]) for f in verify_store(store)] == [
        ("missing", f"tables/{clean.old_key}/chunks/chunk-000002.json")
    ]
    outcomes, comparison, _ = run_compare(_compare_cfg(store), old=old, new=new)
    assert [o.chunks_computed for o in outcomes] == [1, 0]
    assert comparison is not None and comparison.summary == clean.summary
    assert verify_store(store) == []
    assert pq.read_table(store / chunk).equals(clean.tables[clean.old_key].slice(50, 25))  # the same rows again


def test_entries_from_before_checksums_are_reported_but_left_alone(tmp_path):
    """A table_version 1 entry (no checksums, chunks without manifests) is never reused, so it is not damage:
    verify says it cannot be checked, repair leaves it, and it can still be listed and shown."""
    root = tmp_path / "store"
    folder = root / "tables/0ld"
    (folder / "chunks").mkdir(parents=True)
    manifest = {
        "model": {"name": "legacy"},
        "data": {"dataset": "digits", "split": "test", "n_samples": 2},
        "attack": {"norm": "Linf", "eps": 0.1, "attacks": ["apgd-ce"]},
        "chunk_size": 2,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    pq.write_table(
        pa.table({"clean_correct": [True, False], "robust": [False, None], "broken_by": ["apgd-ce", None]}),
        folder / "table.parquet",
    )
    (folder / "chunks/chunk-000000.parquet").write_bytes((folder / "table.parquet").read_bytes())
    before = snapshot(root)
    for repair in (False, True):
        findings = verify_store(root, repair=repair)
        assert [(f["status"], f["path"]) for f in findings] == [("unverifiable", "tables/0ld/manifest.json")]
        assert snapshot(root) == before
    info = describe_entry(root, "0l")
    assert info["verified"] is False and info["metrics"]["clean_acc"] == {"value": 0.5, "n": 2}
    assert [e["models"] for e in list_entries(root)] == [["legacy"]]


# -- inventory ----------------------------------------------------------------------------------------------


def _entry_dir(root: Path, rel: str, manifest: dict | None) -> None:
    folder = root / rel
    folder.mkdir(parents=True)
    if manifest is not None:
        (folder / "manifest.json").write_text(json.dumps(manifest))


def test_resolve_key_by_unique_prefix(tmp_path):
    root = tmp_path / "s"
    _entry_dir(root, "tables/abc123", {"model": {"name": "old"}})
    _entry_dir(root, "comparisons/abc456", {"old_model": {"name": "old"}, "new_model": {"name": "new"}})
    _entry_dir(root, "tables/abd999", None)  # an evaluation still running: no manifest yet
    assert resolve_key(root, "abc1") == "abc123"
    assert resolve_key(root, "abc456") == "abc456"
    assert resolve_key(root, f"{root}/comparisons/abc456/") == "abc456"  # a folder, as `report` is given
    assert resolve_key(root, "abc", kind="comparison") == "abc456"
    with pytest.raises(StoreError, match="ambiguous") as err:
        resolve_key(root, "ab")
    assert "table abc123 (old)" in str(err.value) and "comparison abc456 (old -> new)" in str(err.value)
    with pytest.raises(StoreError, match="no table or comparison starts with 'zz'"):
        resolve_key(root, "zz")
    with pytest.raises(StoreError, match="no table starts with 'abc4'"):
        resolve_key(root, "abc4", kind="table")
    with pytest.raises(StoreError, match=r"no table or comparison starts with 'abd'.*abd999: not finished"):
        resolve_key(root, "abd")
    with pytest.raises(StoreError, match="empty"):
        resolve_key(root, " ")


def _unique_prefix(key: str, keys: list[str]) -> str:
    n = 4
    while sum(k.startswith(key[:n]) for k in keys) > 1:
        n += 1
    return key[:n]


def test_list_and_describe_entries(clean, store):
    entries = list_entries(store)
    assert sorted((e["kind"], e["key"], tuple(e["models"])) for e in entries) == sorted(
        [
            ("table", clean.old_key, ("old",)),
            ("table", clean.new_key, ("new",)),
            ("comparison", clean.comparison_key, ("old", "new")),
        ]
    )
    for e in entries:
        assert e["complete"] and e["n"] == 100 and e["data"] == {"name": "digits", "split": "test"}
        assert e["attack"] == {"norm": "Linf", "eps": 0.1, "attacks": ["apgd-ce", "apgd-dlr"]}
        assert e["created_at"]
    keys = [clean.old_key, clean.new_key, clean.comparison_key]

    table = clean.tables[clean.new_key].to_pandas()
    info = describe_entry(store, _unique_prefix(clean.new_key, keys))
    assert info["kind"] == "table" and info["key"] == clean.new_key and info["verified"]
    assert info["metrics"]["clean_acc"] == {"value": pytest.approx(table.clean_correct.mean()), "n": 100}
    assert info["metrics"]["robust_acc"] == {"value": pytest.approx(table.robust.astype(bool).mean()), "n": 100}
    assert sum(info["broken_by"].values()) == int(table.broken_by.notna().sum())

    info = describe_entry(store, _unique_prefix(clean.comparison_key, keys))
    assert info["kind"] == "comparison" and info["key"] == clean.comparison_key
    assert list(info["metrics"]) == list(METRICS)
    assert info["metrics"]["r_nfr"] == clean.summary["metrics"]["r_nfr"]
    assert {"value", "ci_low", "ci_high", "n"} <= set(info["metrics"]["s_nfr"])
    assert (info["old"]["name"], info["new"]["name"]) == ("old", "new")

    (store / f"comparisons/{clean.comparison_key}/flips.parquet").write_bytes(b"PAR1")
    with pytest.raises(StoreError, match="damaged"):
        describe_entry(store, clean.comparison_key)
    assert _quarantined(store, f"comparisons/{clean.comparison_key}/flips.parquet")


# -- the stored samples ----------------------------------------------------------------------------------------


def test_altered_samples_stop_the_run_naming_the_file(clean, store, digits_models):
    """Workers read their rows from the store's sample set and check each row group's sha256: altered pixels
    (same size, so opening the set does not notice) stop the run with the file and the fix named, and no chunk
    is computed from them."""
    from rcat_ray.core.models import from_module

    (part,) = store.glob("samples/digits-test-*/part-*.parquet")
    meta = pq.read_metadata(part)
    last = meta.row_group(meta.num_row_groups - 1).column(3)  # the image column of the last group (rows 75..99)
    data = bytearray(part.read_bytes())
    data[last.data_page_offset + last.total_compressed_size // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    _, new = digits_models
    other = copy.deepcopy(new.module)
    with torch.no_grad():
        other[1].bias.add_(0.01)  # weights not evaluated yet: its chunks must be computed
    model = from_module(other, name="other", num_classes=10)
    with pytest.raises(evaluation.EvaluationRunError, match=r"part-00000\.parquet") as err:
        run_evaluate(_evaluate_cfg(store), extra_models=[model])
    assert "prepare the set again" in str(err.value)
    (table,) = [p for p in (store / "tables").iterdir() if p.name not in (clean.old_key, clean.new_key)]
    assert not (table / "chunks/chunk-000003.json").exists()


# -- non-finite outputs never reach the store ----------------------------------------------------------------


@pytest.fixture
def no_compute(monkeypatch):
    """Any attempt to start Ray work or attack a chunk fails the test."""
    from rcat_ray.evaluate import ray_evaluate as distributed_evaluate
    from rcat_ray.evaluate import worker
    from rcat_ray.runtime import cluster

    def boom(*a, **k):
        raise AssertionError("compute started on bad input")

    monkeypatch.setattr(cluster, "ensure_ray", boom)
    monkeypatch.setattr(distributed_evaluate, "_run_chunks_on_ray", boom)
    monkeypatch.setattr(worker, "evaluate_chunk", boom)


class _Overflow(torch.nn.Module):
    """Finite weights, infinite logits (a float16 overflow, say)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * float("inf")


def test_nan_weights_are_refused_before_any_ray_work(tmp_path, digits_models, digits_checkpoints, no_compute):
    _, new = digits_models
    broken = copy.deepcopy(new.module)
    with torch.no_grad():
        broken[1].weight[0, 0] = float("nan")
    path = tmp_path / "broken.pt"
    save_checkpoint(
        path,
        broken,
        arch="mlp",
        num_classes=10,
        input_shape=(1, 8, 8),
        arch_kwargs={"hidden": [broken[1].out_features]},
    )
    store = tmp_path / "store"
    (store / "tables/abc").mkdir(parents=True)
    (store / "tables/abc/table.parquet").write_bytes(b"earlier results")
    before = snapshot(store)
    cfg = CompareConfig(
        **_settings(store),
        old={"source": "checkpoint", "path": str(digits_checkpoints["old"])},
        new={"source": "checkpoint", "path": str(path)},
    )
    with pytest.raises(EvaluationInputError, match="weights are probably damaged") as err:
        run_compare(cfg)
    assert "'broken'" in str(err.value) and "NaN" in str(err.value)
    assert snapshot(store) == before

    overflowing = from_module(_Overflow(new.module), name="overflowing", num_classes=10)
    with pytest.raises(EvaluationInputError, match="'overflowing' gives non-finite logits"):
        run_evaluate(_evaluate_cfg(store), extra_models=[overflowing])
    assert snapshot(store) == before


class _NanOnOneImage(torch.nn.Module):
    """NaN logits for one particular clean image only: passes the input checks, fails inside a chunk."""

    def __init__(self, inner: torch.nn.Module, poison: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.poison = poison.clone()  # a plain attribute, not a buffer: not part of the weights

    def forward(self, x):
        out = self.inner(x)
        hit = (x.flatten(1) == self.poison.flatten()).all(1)
        return torch.where(hit[:, None], torch.full_like(out, float("nan")), out)


def test_a_chunk_with_non_finite_outputs_is_not_written(tmp_path, digits_models):
    _, new = digits_models
    split = load_split(DATA)
    flaky = from_module(_NanOnOneImage(new.module, split.images[60]), name="flaky", num_classes=10)
    plan = EvaluationPlan(flaky, split, ATTACK, chunk_size=25)
    store = ResultStore(tmp_path / "store")
    chunks = plan.chunks()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_chunk(plan, chunks[1], store, device=torch.device("cpu"), keep_adversarial=True) == 25
        with pytest.raises(NonFiniteOutputError, match=r"'flaky' gave non-finite outputs .* chunk 2") as err:
            run_chunk(plan, chunks[2], store, device=torch.device("cpu"), keep_adversarial=True)
    finally:
        torch.set_num_threads(threads)
    assert "1 non-finite clean margins" in str(err.value)
    written = sorted(p.name for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert written == ["adv-000001.npz", "chunk-000001.json", "chunk-000001.parquet"]  # no partial chunk 2
    assert [c.chunk_id for c in plan.missing_chunks(store)] == [0, 2, 3]


def test_a_run_hitting_non_finite_outputs_stores_no_table(ray_session, tmp_path, digits_models):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the wrapper class travels to the actors
    _, new = digits_models
    split = load_split(DATA)
    flaky = from_module(_NanOnOneImage(new.module, split.images[60]), name="flaky", num_classes=10)
    with pytest.raises(evaluation.EvaluationRunError, match="non-finite"):
        run_evaluate(_evaluate_cfg(tmp_path / "store"), extra_models=[flaky])
    stored = {p.name for p in (tmp_path / "store").rglob("*") if p.is_file()}
    assert not {n for n in stored if "000002" in n or n in {"table.parquet", "manifest.json"}}
