"""Ray Data evaluation on a real local Ray: worker-count independence, resume, cache reuse."""

from __future__ import annotations

import os
import sys

import pyarrow.parquet as pq
import pytest
import torch

from rcat_ray.config import AttackConfig, ComputeConfig, DataConfig, EvaluateConfig
from rcat_ray.workflows import run_evaluate

pytestmark = pytest.mark.ray


def _cfg(store, workers=1, **kw) -> EvaluateConfig:
    return EvaluateConfig(
        data=DataConfig(name="digits", split="test", limit=120),
        attack=AttackConfig(eps=0.1, n_iter=8, seed=3, robust_samples=100),
        chunk_size=25,
        store=str(store),
        compute=ComputeConfig(num_workers=workers, cpus_per_worker=1.0 if workers == 1 else 0.5, threads_per_worker=1),
        models=({"source": "builtin", "name": "mlp", "seed": 4},),
        **kw,
    )


def test_one_and_two_workers_give_identical_tables(ray_session, digits_models, tmp_path):
    _, new = digits_models
    (o1, o2), _ = run_evaluate(_cfg(tmp_path / "w1", 1), extra_models=[new])
    (p1, p2), _ = run_evaluate(_cfg(tmp_path / "w2", 2), extra_models=[new])
    for a, b in ((o1, p1), (o2, p2)):
        assert a.key == b.key and a.complete and b.complete and a.chunks_computed == 5
        ta = pq.read_table(tmp_path / "w1" / a.table_path)
        tb = pq.read_table(tmp_path / "w2" / b.table_path)
        assert ta.num_rows == 120
        assert ta.select(ta.column_names).equals(tb.select(tb.column_names))
    table = pq.read_table(tmp_path / "w1" / o2.table_path).to_pandas()
    assert table.robust.notna().sum() == 100  # robust_samples: only the first 100 attacked
    assert (~table.robust.fillna(True)).any()


def test_interrupted_run_resumes_only_missing_chunks(ray_session, digits_models, tmp_path):
    _, new = digits_models
    cfg = _cfg(tmp_path / "resumed", 2)
    first, _ = run_evaluate(cfg.model_copy(update={"max_new_chunks": 2, "models": ()}), extra_models=[new])
    (o,) = first
    assert (o.chunks_computed, o.chunks_cached, o.complete) == (2, 0, False)
    assert not (tmp_path / "resumed" / f"tables/{o.key}/table.parquet").exists()
    second, _ = run_evaluate(cfg.model_copy(update={"models": ()}), extra_models=[new])
    (o2,) = second
    assert (o2.chunks_computed, o2.chunks_cached, o2.complete) == (3, 2, True)
    third, _ = run_evaluate(cfg.model_copy(update={"models": ()}), extra_models=[new])
    assert (third[0].chunks_computed, third[0].chunks_cached) == (0, 5)
    straight, _ = run_evaluate(_cfg(tmp_path / "straight", 1).model_copy(update={"models": ()}), extra_models=[new])
    resumed_table = pq.read_table(tmp_path / "resumed" / o2.table_path)
    straight_table = pq.read_table(tmp_path / "straight" / straight[0].table_path)
    assert resumed_table.equals(straight_table)


def test_manifest_records_what_produced_the_table(ray_session, digits_models, tmp_path):
    import json

    _, new = digits_models
    (o,), _ = run_evaluate(_cfg(tmp_path, 1).model_copy(update={"models": ()}), extra_models=[new])
    manifest = json.loads((tmp_path / f"tables/{o.key}/manifest.json").read_text())
    assert manifest["model"]["fingerprint"] == new.fingerprint
    assert manifest["threat_model"] == {"norm": "Linf", "eps": 0.1}
    assert manifest["data"]["dataset"] == "digits" and manifest["data"]["n_samples"] == 120
    assert manifest["versions"]["torch"] and manifest["versions"]["pyautoattack"] == "0.2.0"
    meta = pq.read_schema(tmp_path / f"tables/{o.key}/table.parquet").metadata
    assert json.loads(meta[b"rcat_ray"])["key"] == o.key
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]
    assert not leftovers


class _FailsOnceOnASample(torch.nn.Module):
    """Wraps a model; while ``marker`` exists, a clean forward holding the poisoned image raises.

    The weights are the wrapped model's, so the fingerprint (and the store key) is the same with or without
    the fault: the re-run continues the crashed evaluation.
    """

    def __init__(self, inner: torch.nn.Module, poison: torch.Tensor, marker: str):
        super().__init__()
        self.inner = inner
        self.poison = poison.clone()  # a plain attribute, not a buffer: it is not part of the weights
        self.marker = marker

    def forward(self, x):
        if os.path.exists(self.marker) and (x.flatten(1) == self.poison.flatten()).all(1).any():
            raise RuntimeError("injected crash in the middle of an evaluation")
        return self.inner(x)


def test_crashed_run_resumes_only_missing_chunks(ray_session, digits_models, tmp_path):
    import ray.cloudpickle

    from rcat_ray.core.data import load_split
    from rcat_ray.core.models import from_module

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the wrapper class travels to the actors
    _, new = digits_models
    cfg = _cfg(tmp_path / "crash", 1).model_copy(update={"models": ()})
    split = load_split(cfg.data)
    marker = tmp_path / "fail-now"
    marker.write_text("1")
    faulty = from_module(_FailsOnceOnASample(new.module, split.images[3 * 25], str(marker)), name="new", num_classes=10)
    with pytest.raises(Exception, match="injected crash"):
        run_evaluate(cfg, extra_models=[faulty])
    chunks = tmp_path / "crash" / "tables"
    stored = sorted(p.name for p in chunks.glob("*/chunks/chunk-*.parquet"))
    assert "chunk-000003.parquet" not in stored and not list(chunks.glob("*/table.parquet"))
    marker.unlink()
    (o,), _ = run_evaluate(cfg, extra_models=[faulty])
    assert o.complete and (o.chunks_cached, o.chunks_computed) == (len(stored), 5 - len(stored))
    (s,), _ = run_evaluate(_cfg(tmp_path / "straight", 1).model_copy(update={"models": ()}), extra_models=[new])
    # the wrapper's weights are named "inner.*", so its key differs from the plain model's; its rows must not
    assert pq.read_table(tmp_path / "crash" / o.table_path).equals(pq.read_table(tmp_path / "straight" / s.table_path))
