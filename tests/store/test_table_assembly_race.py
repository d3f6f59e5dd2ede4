"""Two runs assembling the same per-model table at once (real chunks, real Parquet, no Ray).

The table's bytes used to embed the manifest (created-at, model name, versions): the second run found a
table that differed from its own, took it for a leftover and moved it aside, and the manifest the first run
wrote then described a file that was no longer there: a good table quarantined as damage on its next read.
"""

from __future__ import annotations

import json
import threading

import pyarrow.parquet as pq
import torch

from rcat_ray.config import AttackConfig, DataConfig
from rcat_ray.core.data import load_split
from rcat_ray.core.models import from_module
from rcat_ray.evaluate import plan as evaluation
from rcat_ray.evaluate.plan import EvaluationPlan, assemble, run_chunk
from rcat_ray.report.inventory import verify_store
from rcat_ray.store.result_store import QUARANTINE_DIR, ResultStore, table_metadata


def _plans(tmp_path):
    """Two plans of the same table (same weights, data, attack): only the model's name differs, as when two
    runs name one checkpoint differently. Their chunks are computed once, as a run would."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    split = load_split(DataConfig(name="digits", split="test", limit=40))
    attack = AttackConfig(eps=0.1, n_iter=2, seed=1)
    plans = [
        EvaluationPlan(from_module(module, name=name, num_classes=10), split, attack, chunk_size=20)
        for name in ("old", "renamed")
    ]
    assert plans[0].key == plans[1].key
    store = ResultStore(tmp_path / "store")
    for chunk in plans[0].chunks():
        run_chunk(plans[0], chunk, store, device=torch.device("cpu"), keep_adversarial=False)
    return plans, store


def test_two_runs_assembling_one_table_at_once(tmp_path, monkeypatch):
    plans, store = _plans(tmp_path)
    barrier = threading.Barrier(2, timeout=60)
    real_write, real_now = store.write_member, evaluation.now_iso

    def write_member(rel, data):
        if rel.endswith("table.parquet"):
            barrier.wait()  # both runs found no table and read every chunk before either writes
        return real_write(rel, data)

    monkeypatch.setattr(store, "write_member", write_member)
    monkeypatch.setattr(evaluation, "now_iso", lambda: f"{real_now()}-{threading.current_thread().name}")
    errors = []

    def run(plan):
        try:
            assemble(plan, store)
        except Exception as err:  # noqa: BLE001 (reported below, not lost in the thread)
            errors.append(err)

    threads = [threading.Thread(target=run, args=(p,), name=p.model.name) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    root = tmp_path / "store"
    assert not (root / QUARANTINE_DIR).exists()  # nothing was mistaken for damage
    assert verify_store(store) == []
    assert all(p.table_done(store) for p in plans)
    manifest = json.loads((root / plans[0].manifest_path).read_text())
    assert manifest["created_at"].endswith(("-old", "-renamed")) and manifest["model"]["name"] in ("old", "renamed")
    meta = table_metadata(pq.read_table(root / plans[0].table_path))
    assert meta["key"] == plans[0].key and "created_at" not in meta and "model" not in meta


def test_a_later_run_finds_the_same_bytes(tmp_path, monkeypatch):
    """The race step by step: one run has written table.parquet but not yet its manifest when another
    assembles the whole table; the first then writes its manifest. Both manifests' records match the file."""
    plans, store = _plans(tmp_path)
    first_put = store.put_json
    pending = []
    monkeypatch.setattr(store, "put_json", lambda rel, obj: pending.append((rel, obj)))
    assemble(plans[0], store)  # the first run stops right before its manifest
    monkeypatch.setattr(store, "put_json", first_put)
    table = tmp_path / "store" / plans[0].table_path
    written = table.read_bytes()
    monkeypatch.setattr(evaluation, "now_iso", lambda: "2099-01-01T00:00:00+00:00")  # a later run
    assemble(plans[1], store)
    assert table.read_bytes() == written and not (tmp_path / "store" / QUARANTINE_DIR).exists()
    ((rel, manifest),) = pending
    assert manifest["files"] == json.loads((tmp_path / "store" / rel).read_text())["files"]
    assert verify_store(store) == [] and plans[0].table_done(store)
