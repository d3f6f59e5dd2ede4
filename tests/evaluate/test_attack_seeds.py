"""Several attack seeds: one reusable table per seed, an ensemble that is robust only where every seed failed,
and the attack noise (how often the seeds disagree) per model and per flip rate."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from rcat_ray.config import AttackConfig, BootstrapConfig, ComputeConfig, DataConfig, parse_config
from rcat_ray.core.flips import format_summary
from rcat_ray.errors import ComparisonError, ConfigError
from rcat_ray.evaluate.comparison import compare_stored
from rcat_ray.evaluate.config import CompareConfig, EvaluateConfig
from rcat_ray.evaluate.run import run_compare, run_evaluate

pytestmark = pytest.mark.ray

DATA = DataConfig(name="digits", split="test", limit=150)
COMPUTE = ComputeConfig(num_workers=2, cpus_per_worker=0.5, threads_per_worker=1)


def _attack(**kw) -> AttackConfig:
    return AttackConfig(**{"eps": 0.12, "n_iter": 3, "attacks": ("apgd-ce",), **kw})


def test_an_ensemble_is_robust_only_where_every_seed_failed(ray_session, digits_models, tmp_path):
    _, new = digits_models
    cfg = EvaluateConfig(
        data=DATA,
        attack=_attack(seeds=(0, 1, 2)),
        chunk_size=50,
        store=str(tmp_path),
        compute=COMPUTE,
        models=({"source": "builtin", "name": "mlp"},),
    ).model_copy(update={"models": ()})  # only the in-memory model
    (ens,), prepared = run_evaluate(cfg, extra_models=[new])
    plan = prepared.plans[0]
    assert ens.complete and ens.key == plan.key and ens.chunks_computed == 9  # 3 seeds x 3 chunks
    seeds = [pq.read_table(tmp_path / p.table_path).to_pandas() for p in plan.seed_plans]
    table = pq.read_table(tmp_path / ens.table_path).to_pandas()
    robust = np.stack([s.robust.astype(bool).to_numpy() for s in seeds])
    assert (table.robust.astype(bool).to_numpy() == robust.all(axis=0)).all()
    assert np.allclose(table.min_margin, np.min([s.min_margin for s in seeds], axis=0))
    disagree = int((robust.any(axis=0) != robust.all(axis=0)).sum())
    noise = ens.attack_noise
    assert (noise["disagree"], noise["n"]) == (disagree, 150)
    assert noise["rob_acc"] <= min(noise["rob_acc_per_seed"])
    assert disagree > 0, "3 iterations from 3 random starts must disagree somewhere, else this checks nothing"
    assert "attack noise" in ens.describe()
    # a broken sample takes its adversarial fields from the first seed that broke it
    broken = ~table.robust.astype(bool) & table.clean_correct
    first = robust.argmin(axis=0)
    for i in np.flatnonzero(broken.to_numpy())[:10]:
        assert table.adv_margin[i] == seeds[first[i]].adv_margin[i]

    # each seed's table is the single-seed run's table: reused, not recomputed
    (single,), _ = run_evaluate(cfg.model_copy(update={"attack": _attack(seed=1)}), extra_models=[new])
    assert single.key == plan.seed_plans[1].key and single.chunks_computed == 0


def test_a_comparison_of_two_ensembles_reports_each_seed_and_the_unstable_flips(ray_session, digits_models, tmp_path):
    old, new = digits_models
    cfg = CompareConfig(
        data=DATA,
        attack=_attack(seeds=(0, 1)),
        chunk_size=50,
        store=str(tmp_path),
        compute=COMPUTE,
        old={"source": "builtin", "name": "mlp"},
        new={"source": "builtin", "name": "mlp"},
        bootstrap=BootstrapConfig(n_resamples=50),
    )
    _, comparison, prepared = run_compare(cfg, old=old, new=new)
    noise = comparison.summary["attack_noise"]
    assert noise["seeds"] == [0, 1]
    old_plan, new_plan = prepared.plans
    for k in range(2):  # each seed alone: the comparison of that seed's two tables
        alone = compare_stored(
            prepared.store, old_plan.seed_plans[k].key, new_plan.seed_plans[k].key, BootstrapConfig(n_resamples=10)
        )
        for metric in ("r_nfr", "r_pfr", "rob_acc", "s_nfr"):
            assert noise["metrics"][metric]["per_seed"][k] == pytest.approx(alone.summary["metrics"][metric]["value"])
    flips = [
        compare_stored(prepared.store, o.key, n.key, BootstrapConfig(n_resamples=10)).flips.to_pandas()
        for o, n in zip(old_plan.seed_plans, new_plan.seed_plans, strict=True)
    ]
    changed = (flips[0].robust_neg_flip.fillna(False) != flips[1].robust_neg_flip.fillna(False)).sum()
    assert noise["metrics"]["r_nfr"]["unstable"] == changed
    assert "attack noise over seeds 0, 1" in format_summary(comparison.summary)
    assert comparison.summary["metrics"]["rob_acc"]["value"] <= min(noise["metrics"]["rob_acc"]["per_seed"])
    # an ensemble is never compared with a single-seed table: their attacks differ
    with pytest.raises(ComparisonError, match="different attack settings"):
        compare_stored(prepared.store, old_plan.key, new_plan.seed_plans[0].key, BootstrapConfig(n_resamples=10))


@pytest.mark.parametrize("seeds", [[0], [1, 1], [0, -1]])
def test_seeds_must_be_two_or_more_distinct(seeds):
    with pytest.raises(ConfigError, match="seeds"):
        parse_config(AttackConfig, {"eps": 0.1, "seeds": seeds})


def test_an_unset_seeds_leaves_every_key_as_it_was():
    """``seeds`` is dropped from dumps when unset, so table, fine-tune and sweep keys did not move."""
    assert "seeds" not in AttackConfig(eps=0.1).model_dump(mode="json")
    assert AttackConfig(eps=0.1, seeds=(0, 1)).single_seed(1).model_dump() == AttackConfig(eps=0.1, seed=1).model_dump()
