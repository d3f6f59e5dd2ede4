"""Ray Data evaluation on a real local Ray: worker-count independence, resume, cache reuse."""

from __future__ import annotations

import os
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from rcat_ray.config import AttackConfig, ComputeConfig, DataConfig
from rcat_ray.evaluate.config import EvaluateConfig
from rcat_ray.evaluate.run import run_evaluate

pytestmark = pytest.mark.ray


def _cfg(store, workers=1, in_flight=2, **kw) -> EvaluateConfig:
    return EvaluateConfig(
        data=DataConfig(name="digits", split="test", limit=120),
        attack=AttackConfig(eps=0.1, n_iter=8, seed=3, robust_samples=100),
        chunk_size=25,
        store=str(store),
        compute=ComputeConfig(
            num_workers=workers,
            cpus_per_worker=1.0 if workers == 1 else 0.5,
            threads_per_worker=1,
            chunks_in_flight=in_flight,
        ),
        models=({"source": "builtin", "name": "mlp", "seed": 4},),
        **kw,
    )


def test_one_and_two_workers_give_identical_tables(ray_session, digits_models, tmp_path):
    _, new = digits_models
    # and whatever the number of chunks in flight per actor (1: single-threaded actors; 3: read-ahead threads)
    (o1, o2), _ = run_evaluate(_cfg(tmp_path / "w1", 1, in_flight=1), extra_models=[new])
    (p1, p2), _ = run_evaluate(_cfg(tmp_path / "w2", 2, in_flight=3), extra_models=[new])
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
    # AutoAttack's sanity checks ran on every chunk: on the 100 attacked rows, the gradient one on the clean-correct
    table = pq.read_table(tmp_path / f"tables/{o.key}/table.parquet").to_pandas()
    sanity = manifest["sanity"]
    assert (sanity["chunks"], sanity["chunks_checked"], sanity["flags"]) == (5, 5, [])
    assert sanity["gradient_checked"] == int((table.clean_correct & table.robust.notna()).sum())
    assert o.sanity == sanity and "sanity checks: no flag" in o.describe()
    meta = pq.read_schema(tmp_path / f"tables/{o.key}/table.parquet").metadata
    assert json.loads(meta[b"rcat_ray"])["key"] == o.key
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
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


# -- the data plane: what the driver holds, what travels, what a worker loads ----------------------------------


def test_the_sample_set_keeps_every_cache_key(tmp_path, digits_models, monkeypatch):
    """The plan's identity comes from the prepared set's description, which equals the in-memory split's: keys
    of tables stored before sets existed stay valid. The driver reads two rows from the source, never the
    selection (the set's own preparation reads it once), and nothing of the split on a second run."""
    import pickle

    from rcat_ray.core.data import load_split
    from rcat_ray.evaluate import run as workflows
    from rcat_ray.evaluate.plan import EvaluationPlan
    from rcat_ray.evaluate.run import prepare

    _, new = digits_models
    cfg = _cfg(tmp_path / "store")
    split = load_split(cfg.data)
    reads = []
    real = workflows.load_split
    monkeypatch.setattr(workflows, "load_split", lambda c: reads.append(c.limit) or real(c))
    prepared = prepare(cfg, [*cfg.models, new])
    assert reads == [2]
    assert prepared.samples.describe() == split.describe()
    assert prepared.samples.info.rows_per_group == cfg.chunk_size
    in_memory_plans = [EvaluationPlan(m, split, cfg.attack, cfg.chunk_size) for m in [_builtin(cfg, split), new]]
    assert [p.key for p in prepared.plans] == [p.key for p in in_memory_plans]
    again = prepare(cfg, [*cfg.models, new])
    assert reads == [2] and [p.key for p in again.plans] == [p.key for p in prepared.plans]
    # what a worker receives: a reference per model and the set's location, no weights and no pixels
    specs = [p.spec() for p in prepared.plans]
    assert [s.model.module for s in specs] == [None, None]
    assert all(s.samples == prepared.samples.uri for s in specs)
    assert len(pickle.dumps(specs)) < 4000
    assert prepared.models[0].module is None and prepared.models[1].module is new.module  # reload vs in-memory


def _builtin(cfg, split):
    from rcat_ray.core.models import load_model

    return load_model(cfg.models[0], num_classes=10, input_shape=split.input_shape)


def _never():
    raise AssertionError("fetched")


def _shift(m):
    if isinstance(m, torch.nn.Linear):
        m.bias.add_(0.01)


def test_model_cache_loads_each_model_once_and_checks_its_fingerprint(tmp_path, digits_models, digits_checkpoints):
    import copy

    from rcat_ray.config import ModelConfig
    from rcat_ray.core.models import from_module, load_model, model_reference, save_checkpoint
    from rcat_ray.errors import ModelFingerprintError
    from rcat_ray.evaluate.plan import ModelCache

    old, new = digits_models
    refs = {}
    for name in ("old", "new"):
        cfg = ModelConfig(source="checkpoint", path=str(digits_checkpoints[name]))
        refs[name] = model_reference(
            load_model(cfg, num_classes=10, input_shape=(1, 8, 8)), cfg, input_shape=(1, 8, 8), data_name="digits"
        ).without_module()
    assert refs["old"].fingerprint == old.fingerprint and refs["new"].fingerprint == new.fingerprint
    cache = ModelCache(2)
    for name in ("old", "old", "new", "old", "new"):
        module = cache.get(refs[name])
        assert module is cache.get(refs[name])
    assert cache.loads == 2
    # keyed by weights: the in-memory twin of a cached checkpoint is not fetched again
    assert cache.get(model_reference(new).without_module(), _never) is cache.get(refs["new"]) and cache.loads == 2
    other = from_module(copy.deepcopy(new.module).requires_grad_(False).apply(_shift), name="other", num_classes=10)
    memory = model_reference(other).without_module()  # in memory: weights from the fetch function (object store)
    assert cache.get(memory, lambda: other.module) is other.module and cache.loads == 3
    assert cache.get(refs["old"]) is not None and cache.loads == 4  # evicted by the third model: loaded again
    # the checkpoint replaced after planning: a worker refuses it, naming the model
    save_checkpoint(
        digits_checkpoints["old"],
        new.module,
        arch="mlp",
        num_classes=10,
        input_shape=(1, 8, 8),
        arch_kwargs={"hidden": [64]},
    )
    with pytest.raises(ModelFingerprintError, match=r"model 'old' loaded from checkpoint .*old\.pt has weights"):
        ModelCache(2).get(refs["old"])


def test_a_checkpoint_replaced_during_a_run_is_refused_by_the_workers(
    ray_session, tmp_path, digits_models, digits_checkpoints
):
    from rcat_ray.config import ModelConfig
    from rcat_ray.core.models import save_checkpoint
    from rcat_ray.errors import EvaluationRunError
    from rcat_ray.evaluate.ray_evaluate import evaluate_plans
    from rcat_ray.evaluate.run import prepare

    _, new = digits_models
    cfg = _cfg(tmp_path / "store").model_copy(
        update={"models": (ModelConfig(source="checkpoint", path=str(digits_checkpoints["old"])),)}
    )
    prepared = prepare(cfg, list(cfg.models))
    save_checkpoint(
        digits_checkpoints["old"],
        new.module,
        arch="mlp",
        num_classes=10,
        input_shape=(1, 8, 8),
        arch_kwargs={"hidden": [64]},
    )
    with pytest.raises(EvaluationRunError, match=r"model 'old' loaded from checkpoint") as err:
        evaluate_plans(prepared.plans, prepared.store, cfg)
    assert "fingerprint" in str(err.value)
    assert not list((tmp_path / "store" / "tables").glob("*/chunks/chunk-*.json"))
    # the failed run's actors are gone: their CPUs are free again for whatever this process runs next
    total = ray_session.cluster_resources()["CPU"]
    deadline = time.monotonic() + 30
    while ray_session.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU", 0) == total


def test_chunk_manifests_name_the_ray_node(ray_session, digits_models, tmp_path):
    import json

    _, new = digits_models
    (o,), _ = run_evaluate(_cfg(tmp_path, 1).model_copy(update={"models": ()}), extra_models=[new])
    manifests = [json.loads(p.read_text()) for p in (tmp_path / f"tables/{o.key}/chunks").glob("chunk-*.json")]
    assert len(manifests) == 5
    assert {m["node"] for m in manifests} == {ray_session.get_runtime_context().get_node_id()}
    assert all(m["host"] and m["memory"]["max_rss_bytes"] > 0 for m in manifests)
