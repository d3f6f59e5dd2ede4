"""The pyautoattack cascade on a tiny model: per-sample rows that are consistent with each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcat_ray.config import AttackConfig, DataConfig
from rcat_ray.core.attacks import PER_MODEL_SCHEMA, chunk_seed, evaluate_chunk, margins
from rcat_ray.core.data import load_split


@pytest.fixture(scope="module")
def test_slice():
    return load_split(DataConfig(name="digits", split="test", limit=60))


def _run(model, split, **kw):
    cfg = AttackConfig(**{"eps": 0.1, "n_iter": 10, **kw})
    return evaluate_chunk(
        model.module, split.images, split.labels, split.sample_ids, cfg, num_classes=10, seed=7, keep_adversarial=True
    )


@pytest.mark.parametrize("attacks", [("apgd-ce", "apgd-dlr"), ("apgd-t", "fab-t", "square")])
def test_cascade_rows_are_consistent(digits_models, test_slice, attacks):
    _, new = digits_models
    res = _run(new, test_slice, attacks=attacks, square_queries=50)
    assert res.table.schema.equals(PER_MODEL_SCHEMA)
    df = res.table.to_pandas()
    assert len(df) == len(test_slice)
    # robust implies clean-correct; a clean error is never attacked, never broken
    assert not (df.robust & ~df.clean_correct).any()
    assert df.loc[~df.clean_correct, "broken_by"].isna().all()
    # broken_by is set exactly for the clean-correct samples that are not robust, and names a cascade member
    broken = df.clean_correct & ~df.robust.astype(bool)
    assert (df.broken_by.notna() == broken).all()
    assert set(df.broken_by.dropna()) <= set(attacks)
    assert broken.any(), "eps 0.1 on digits must break some samples, else this test checks nothing"
    # a broken sample's adversarial point is misclassified and inside the eps ball; a robust one is classified right
    assert (df.loc[broken, "adv_pred"] != df.loc[broken, "label"]).all()
    assert (df.loc[df.robust.astype(bool), "adv_pred"] == df.loc[df.robust.astype(bool), "label"]).all()
    assert (df.perturbation_linf <= 0.1 + 1e-6).all()
    assert ((df.adv_margin > 0) == (df.adv_pred == df.label)).all()
    assert res.adversarial is not None and res.adversarial.min() >= 0 and res.adversarial.max() <= 1
    # the stored perturbation is the L-inf distance of the kept adversarial image from the clean one, bit for bit
    # (0 for every sample no attack broke)
    kept = np.isin(df.sample_id.to_numpy(), res.adversarial_ids)
    clean = test_slice.images.numpy()[kept].reshape(kept.sum(), -1)
    linf = np.abs(res.adversarial.reshape(len(res.adversarial), -1) - clean).max(axis=1)
    np.testing.assert_array_equal(df.perturbation_linf.to_numpy()[kept].astype(np.float32), linf)
    assert (df.loc[kept & ~broken.to_numpy(), "perturbation_linf"] == 0).all()


def test_margins_match_predictions():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    m = margins(logits, torch.tensor([0, 2]))
    assert m.tolist() == [1.0, -2.0]


def test_same_seed_same_rows_and_global_rng_untouched(digits_models, test_slice):
    _, new = digits_models
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = _run(new, test_slice)
    assert torch.equal(torch.get_rng_state(), before), "the attack must not move the caller's RNG"
    b = _run(new, test_slice)
    assert a.table.equals(b.table)
    np.testing.assert_array_equal(a.adversarial, b.adversarial)


def test_attack_mask_leaves_unattacked_rows_null(digits_models, test_slice):
    _, new = digits_models
    mask = torch.arange(len(test_slice)) < 20
    cfg = AttackConfig(eps=0.1, n_iter=5)
    res = evaluate_chunk(
        new.module,
        test_slice.images,
        test_slice.labels,
        test_slice.sample_ids,
        cfg,
        num_classes=10,
        seed=1,
        attack_mask=mask,
    )
    df = res.table.to_pandas()
    assert df.robust.iloc[:20].notna().all() and df.robust.iloc[20:].isna().all()
    assert df.adv_pred.iloc[20:].isna().all() and df.clean_pred.notna().all()


def test_standard_is_autoattacks_cascade():
    cfg = AttackConfig(eps=8 / 255, attacks=("standard",))
    assert cfg.cascade == ("apgd-ce", "apgd-t", "fab-t", "square")


def test_chunk_seed_depends_on_run_seed_and_chunk_only():
    assert chunk_seed(0, 3) == chunk_seed(0, 3)
    assert len({chunk_seed(0, i) for i in range(100)}) == 100
    assert chunk_seed(0, 3) != chunk_seed(1, 3)


def test_l2_perturbations_stay_in_the_ball(digits_models, test_slice):
    _, new = digits_models
    cfg = AttackConfig(norm="L2", eps=0.5, n_iter=10)
    res = evaluate_chunk(
        new.module,
        test_slice.images,
        test_slice.labels,
        test_slice.sample_ids,
        cfg,
        num_classes=10,
        seed=2,
        keep_adversarial=True,
    )
    delta = torch.as_tensor(res.adversarial) - test_slice.images
    assert (delta.flatten(1).norm(dim=1) <= 0.5 + 1e-4).all()


def test_a_chunk_is_reproduced_by_plain_autoattack(digits_models):
    """One seed for the whole cascade (AutoAttack's rule): pyautoattack's own AutoAttack with the chunk's seed
    gives the same robust flags, adversarial predictions and adversarial images as the stored rows."""
    from pyautoattack import AutoAttack

    _, new = digits_models
    split = load_split(DataConfig(name="digits", split="test", limit=200))
    # AutoAttack's "custom" version builds APGD with 100 iterations; its restarts are set as its own
    # "standard" version sets them
    cfg = AttackConfig(eps=0.09, attacks=("apgd-ce", "apgd-dlr"), n_iter=100, n_restarts=1)
    seed = chunk_seed(0, 3)
    res = evaluate_chunk(
        new.module, split.images, split.labels, split.sample_ids, cfg, num_classes=10, seed=seed, keep_adversarial=True
    )
    df = res.table.to_pandas()

    aa = AutoAttack(new.module.eval(), attacks=["apgd-ce", "apgd-dlr"], version="custom", eps=0.09, seed=seed)
    aa.apgd.n_restarts = 1
    aa.verbose = False
    with torch.random.fork_rng():
        x_adv, y_adv = aa.run_standard_evaluation(split.images, split.labels, batch_size=len(split))
    with torch.no_grad():
        aa_robust = (new.module(x_adv).argmax(1) == split.labels).numpy()
    np.testing.assert_array_equal(df.robust.to_numpy(dtype=bool), aa_robust)
    np.testing.assert_array_equal(df.adv_pred.to_numpy(), y_adv.numpy())
    np.testing.assert_array_equal(res.adversarial, x_adv.numpy())
    assert (df.broken_by == "apgd-dlr").any(), "the second attack must break a sample, else its seed is not tested"


@pytest.mark.parametrize("attacks", [("apgd-ce", "apgd-dlr"), ("apgd-t", "square")])
def test_min_margin_is_the_lowest_margin_the_attacks_reached(digits_models, test_slice, attacks):
    """For a robust sample, how close the attacks came to breaking it (above 0, at most its clean margin); for a
    broken one, at most its adversarial margin; null where nothing was attacked."""
    _, new = digits_models
    cfg = AttackConfig(eps=0.1, n_iter=10, attacks=attacks, square_queries=50, robust_samples=50)
    res = evaluate_chunk(
        new.module,
        test_slice.images,
        test_slice.labels,
        test_slice.sample_ids,
        cfg,
        num_classes=10,
        seed=7,
        attack_mask=torch.arange(len(test_slice)) < 50,
    )
    df = res.table.to_pandas()
    attacked = df.robust.notna()
    assert df.min_margin.isna().equals(~attacked)
    a = df[attacked]
    assert (a.min_margin <= a.clean_margin).all() and (a.min_margin <= a.adv_margin).all()
    robust = a[a.robust.astype(bool)]
    assert (robust.min_margin > 0).all()
    assert (robust.min_margin < robust.clean_margin).mean() > 0.9, "the attacks move every robust sample"
    broken = a[a.clean_correct & ~a.robust.astype(bool)]
    assert len(broken) and (broken.min_margin <= 0).all()
