"""Fine-tuning that streams: workers read only their rows of a prepared set; augmentation; resume after a fault.

What is checked, and why it matters:

* the loop never loads the training split (``load_split`` raises inside it) and reads the training set only
  through ``SampleSet.iter_batches`` with the positions of its own shares: rank r of 2 asks for about N/2
  rows per epoch, disjoint from the other rank's, together every row of the epoch;
* the streamed batches are exactly the in-memory global batches (same rows, random starts and augmentation)
  for 1, 2 and 3 workers, so streaming changes neither results nor the 1-vs-N-worker equality;
* augmentation is deterministic for a seed, changes images, keeps shapes and the [0, 1] range, matches
  torchvision's crops for the same boxes, and is a no-op when off;
* a 2-worker run that loses a worker at epoch 1 resumes at the epoch boundary and ends at the weights of an
  uninterrupted run (with augmentation on, so its seeding survives the restart too).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import rcat_ray.finetune.ray_train as train_mod
import rcat_ray.finetune.run as run_mod
from rcat_ray.config import DataConfig, ModelConfig
from rcat_ray.core import augment as aug
from rcat_ray.core.data import load_split
from rcat_ray.core.finetune_epoch import (
    GlobalBatches,
    GlobalBatchSampler,
    StreamedGlobalBatches,
    global_batch_start,
    prefetched,
    shuffle_block_rows,
    shuffle_window,
)
from rcat_ray.core.models import load_model
from rcat_ray.core.samples import SampleSet, open_samples, samples_in_store
from rcat_ray.finetune.config import FinetuneConfig
from rcat_ray.runtime import hooks
from tests.finetune.configs import digits_finetune

N_TRAIN = 1097  # digits' train split


def _cfg(tmp_path, parents, **kw) -> FinetuneConfig:
    kw.setdefault("loss", {"kind": "pcat", "alpha": 1.0, "beta": 2.0})
    return digits_finetune(tmp_path, parents, **kw)


def _weights(path) -> dict[str, torch.Tensor]:
    m = load_model(ModelConfig(source="checkpoint", name="t", path=str(path)), num_classes=10, input_shape=(1, 8, 8))
    return m.module.state_dict()


@pytest.fixture
def no_load_split(monkeypatch):
    """``load_split`` raises wherever rcat_ray bound it: whatever runs now cannot hold a split in memory."""

    def refuse(cfg, *a, **k):
        raise AssertionError(f"load_split({cfg.name}/{cfg.split}) called: the training data must stream")

    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("rcat_ray") and getattr(module, "load_split", None) is load_split:
            monkeypatch.setattr(module, "load_split", refuse)
            patched.append(name)
    assert "rcat_ray.core.data" in patched


@pytest.fixture
def digits_set(tmp_path) -> SampleSet:
    return samples_in_store(str(tmp_path / "store"), DataConfig(name="digits", split="train"), rows_per_group=100)


# -- augmentation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 96, 128)])
def test_augmentation_is_seeded_keeps_shape_and_range_and_changes_images(shape):
    x = torch.rand(16, *shape)
    a = aug.augment_share(x, seed=5, offset=0, global_size=16)
    assert torch.equal(a, aug.augment_share(x, seed=5, offset=0, global_size=16)), "not deterministic"
    assert not torch.equal(a, aug.augment_share(x, seed=6, offset=0, global_size=16)), "the seed is ignored"
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    changed = (a - x).abs().flatten(1).amax(1) > 0
    assert int(changed.sum()) >= 12, "augmentation left most images unchanged"
    assert torch.equal(x, x.clone()), "the input was modified"


def test_augmentation_of_shares_is_the_augmentation_of_the_global_batch():
    """Worker count independence: each worker augments its rows with the global batch's parameters."""
    x = torch.rand(11, 3, 32, 32)
    whole = aug.augment_share(x, seed=9, offset=0, global_size=11)
    parts = [aug.augment_share(x[o : o + n], seed=9, offset=o, global_size=11) for o, n in ((0, 4), (4, 4), (8, 3))]
    assert torch.equal(torch.cat(parts), whole)


def test_small_images_get_pad_crop_and_flip_as_torchvision_does():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    x = torch.rand(32, 3, 32, 32)
    params = aug.draw_params(32, (3, 32, 32), seed=1)
    assert params.padding == aug.CROP_PADDING
    assert int(params.top.max()) <= 8 and int(params.left.max()) <= 8 and 0 < int(params.flip.sum()) < 32
    out = aug.apply(x, params)
    for i in range(32):
        t, le = int(params.top[i]), int(params.left[i])
        ref = tvf.crop(tvf.pad(x[i], [4]), t, le, 32, 32)  # RandomCrop(32, padding=4) at this offset
        ref = tvf.hflip(ref) if params.flip[i] else ref
        assert torch.equal(out[i], ref), i


def test_large_images_get_random_resized_crops_as_torchvision_does():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    h, w = 96, 128
    x = torch.rand(40, 3, h, w)
    p = aug.draw_params(40, (3, h, w), seed=3)
    assert p.padding == 0
    assert bool(((p.top >= 0) & (p.left >= 0) & (p.top + p.height <= h) & (p.left + p.width <= w)).all())
    frac = (p.height * p.width).double() / (h * w)
    ratio = p.width.double() / p.height.double()
    assert float(frac.min()) > 0.07 and float(frac.max()) <= 1.0  # scale 0.08..1 up to rounding
    assert float(ratio.min()) > 0.7 and float(ratio.max()) < 1.4  # ratio 3/4..4/3 up to rounding
    assert len({(int(a), int(b)) for a, b in zip(p.height, p.width, strict=True)}) > 30, "boxes do not vary"
    out = aug.apply(x, p)
    for i in range(40):
        ref = tvf.resized_crop(
            x[i], int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i]), [h, w], antialias=True
        ).clamp(0, 1)
        ref = tvf.hflip(ref) if p.flip[i] else ref
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)


def test_resized_crop_falls_back_to_a_centre_crop_when_no_box_fits():
    """A very wide image: ratios up to 4/3 rarely fit a box of 8% or more; the fallback is torchvision's."""
    p = aug.draw_params(64, (3, 65, 1000), seed=0)
    assert bool(((p.top + p.height <= 65) & (p.left + p.width <= 1000)).all())


# -- streamed global batches ---------------------------------------------------------------------------------
@pytest.mark.parametrize("augment", [False, True])
def test_streamed_batches_are_the_in_memory_global_batches(digits_set, digits_train, augment):
    """Rank r's streamed shares equal its in-memory shares (pixels, ids, offsets, random starts), for 1, 2 and 3
    workers: reading a prepared set changes nothing the model sees."""
    for world in (1, 2, 3):
        for rank in range(world):
            s1 = GlobalBatchSampler(N_TRAIN, 48, rank=rank, world_size=world, seed=4)
            s2 = GlobalBatchSampler(N_TRAIN, 48, rank=rank, world_size=world, seed=4)
            s1.set_epoch(1)
            s2.set_epoch(1)
            memory = list(
                GlobalBatches(s1, digits_train.images, digits_train.labels, digits_train.sample_ids, augment=augment)
            )
            stream = StreamedGlobalBatches(s2, digits_set, augment=augment)
            streamed = list(stream)
            assert len(streamed) == len(memory) == len(s1)
            for a, b in zip(memory, streamed, strict=True):
                assert (a.index, a.offset, a.global_size, a.start_seed) == (
                    b.index,
                    b.offset,
                    b.global_size,
                    b.start_seed,
                )
                assert torch.equal(a.ids, b.ids) and torch.equal(a.y, b.y) and torch.equal(a.x, b.x)
                assert torch.equal(global_batch_start(a, 0.1), global_batch_start(b, 0.1))
            assert stream.rows_read == sum(b.ids.numel() for b in streamed)


def test_augmentation_off_is_a_no_op(digits_set, digits_train):
    s = GlobalBatchSampler(N_TRAIN, 64, seed=0)
    for b in StreamedGlobalBatches(s, digits_set, augment=False):
        assert torch.equal(b.x, digits_train.images[b.ids])  # digits ids are row indices of the train split


def test_prefetch_keeps_order_and_raises_the_producers_error():
    assert list(prefetched(iter(range(50)), 2)) == list(range(50))

    def broken():
        yield 1
        raise OSError("storage went away")

    got = []
    with pytest.raises(OSError, match="storage went away"):
        for item in prefetched(broken(), 2):
            got.append(item)
    assert got == [1]
    gen = prefetched(iter(range(10**6)), 2)
    assert next(gen) == 0
    gen.close()  # a consumer that stops early stops the producer thread


# -- the loop streams ---------------------------------------------------------------------------------------
class _RankSession:
    """One rank of a pretend group, in-process and without DDP: enough to see what that rank reads."""

    persistent_checkpoints = False

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.device = rank, world, torch.device("cpu")
        self.reports: list[dict] = []

    def prepare_model(self, module):
        return module

    def get_checkpoint(self):
        return None

    def report(self, metrics, checkpoint_dir):
        self.reports.append(dict(metrics))


@pytest.fixture
def read_spy(monkeypatch):
    """Every ``SampleSet.iter_batches`` call: (set location, positions asked for)."""
    calls: list[tuple[str, np.ndarray]] = []
    original = SampleSet.iter_batches

    def spy(self, batch_size, positions=None, **kw):
        calls.append((self.uri, np.asarray(positions if positions is not None else np.arange(len(self)))))
        return original(self, batch_size, positions, **kw)

    monkeypatch.setattr(SampleSet, "iter_batches", spy)
    return calls


def test_a_local_finetune_never_loads_the_training_split(tmp_path, digits_checkpoints, read_spy, request):
    cfg = _cfg(tmp_path, digits_checkpoints, epochs=2)
    request.getfixturevalue("no_load_split")
    parents = run_mod.check_finetune_inputs(cfg)  # prepares the sets, streaming from the source
    parents = run_mod.check_finetune_inputs(cfg)  # a second check reuses them
    outcome = run_mod.run_finetune(cfg, parents)
    assert [h["train_samples"] for h in outcome.history] == [N_TRAIN, N_TRAIN]
    assert [[w["rows_read"] for w in h["workers"]] for h in outcome.history] == [[N_TRAIN], [N_TRAIN]]
    train_reads = [pos for uri, pos in read_spy if uri == parents.samples.train]
    assert len(train_reads) == 2  # one pass per epoch (17 shares of 64, then the last one of 9), one cache
    epoch0 = train_reads[0]
    assert sorted(epoch0.tolist()) == list(range(N_TRAIN))
    assert not np.array_equal(epoch0, train_reads[1]), "every epoch has its own order"


@pytest.mark.parametrize("cache_mib", [256, 0.03], ids=["set-fits-cache", "set-beyond-cache"])
def test_each_rank_reads_only_its_share(tmp_path, digits_checkpoints, read_spy, request, cache_mib):
    """Ranks 0 and 1 of 2 ask the set for disjoint halves of every epoch, in their global-batch order; with a read
    cache smaller than the set (70 kB) that order is the windowed shuffle."""
    cfg = _cfg(tmp_path, digits_checkpoints, epochs=2, num_workers=2, read_cache_mib=cache_mib)
    sets = run_mod.check_finetune_inputs(cfg).samples
    info = open_samples(sets.train).info
    window = shuffle_window(info.num_rows, info.row_nbytes, shuffle_block_rows(info.row_nbytes), int(cache_mib * 2**20))
    assert (window is None) == (cache_mib == 256)
    request.getfixturevalue("no_load_split")
    per_rank = {}
    for rank in (0, 1):
        read_spy.clear()
        session = _RankSession(rank, 2)
        train_mod.finetune_loop(cfg, session, sets)
        per_rank[rank] = [pos for uri, pos in read_spy if uri == sets.train]
        assert [int(r["train_samples"]) for r in session.reports] == [549 if rank == 0 else 548] * 2
    for epoch in (0, 1):
        s0, s1 = per_rank[0][epoch], per_rank[1][epoch]  # one read pass per epoch
        assert (len(s0), len(s1)) == (549, 548)  # N/2 each: 17 x 32 + 5 and 17 x 32 + 4
        assert not set(s0.tolist()) & set(s1.tolist())
        assert sorted(s0.tolist() + s1.tolist()) == list(range(N_TRAIN))
        expected = GlobalBatchSampler(N_TRAIN, 64, rank=1, world_size=2, seed=cfg.seed, window=window)
        expected.set_epoch(epoch)
        assert np.array_equal(s1, torch.cat([idx for _, idx, _, _ in expected.shares()]).numpy())


def test_augmentation_on_trains_another_model_reproducibly(tmp_path, digits_checkpoints):
    runs = {}
    for name, augment in (("off", False), ("on", True), ("on-again", True)):
        cfg = _cfg(tmp_path, digits_checkpoints, epochs=1, augment=augment, name=f"aug-{name}")
        runs[name] = _weights(run_mod.run_finetune(cfg).checkpoint)
    for key in runs["off"]:
        assert torch.equal(runs["on"][key], runs["on-again"][key]), f"{key}: augmentation is not reproducible"
    assert any(not torch.allclose(runs["on"][k], runs["off"][k], atol=1e-4) for k in runs["off"])


@pytest.mark.slow
@pytest.mark.ray
def test_a_run_resumed_after_a_fault_ends_at_the_uninterrupted_weights(
    ray_session, tmp_path, digits_checkpoints, monkeypatch
):
    """2 Ray workers, rank 1 fails at the start of epoch 1, the group restarts from the epoch-0 checkpoint; the
    final weights equal a 1-worker run that never stopped (augmentation on: its seeding survives the restart),
    and each rank read only its half of every epoch."""
    common = {"epochs": 3, "augment": True}
    plain = run_mod.run_finetune(_cfg(tmp_path, digits_checkpoints, name="plain", **common))
    # the same identity as "plain" (neither the worker count nor the fault enters it): its own storage and output,
    # or it would rightly reuse plain's finished run
    monkeypatch.setenv(hooks.FAIL_ONCE_AT_EPOCH_ENV, "1")  # forwarded to the workers by the driver
    cfg = _cfg(
        tmp_path,
        digits_checkpoints,
        name="faulty",
        num_workers=2,
        max_failures=1,
        storage=str(tmp_path / "faulty_results"),
        out=str(tmp_path / "faulty_out"),
        **common,
    )
    resumed = run_mod.run_finetune(cfg)
    run_name = run_mod.check_finetune_inputs(cfg).identity(cfg).run_name(cfg)
    assert (tmp_path / "faulty_results" / run_name / hooks.FAULT_MARKER).read_text().startswith("rank 1 epoch 1")
    assert [h["attempt_start_epoch"] for h in resumed.history] == [0, 1, 1]
    w1, w2 = _weights(plain.checkpoint), _weights(resumed.checkpoint)
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=0, msg=key)
    for h in resumed.history:
        workers = h["workers"]
        assert [w["rank"] for w in workers] == [0, 1]
        assert [w["rows_read"] for w in workers] == [549, 548]
        assert workers[0]["pid"] != workers[1]["pid"] and all(w["node_id"] for w in workers)
    pids = {h["epoch"]: h["workers"][1]["pid"] for h in resumed.history}
    assert pids[0] != pids[1] == pids[2], "epoch 1 ran in a restarted worker group"


def test_the_loop_config_carries_the_config_and_two_set_locations_only(tmp_path, digits_checkpoints, monkeypatch):
    """Nothing large travels to the workers: no samples, no weights (workers load the parents themselves)."""
    seen = {}

    class CapturedError(Exception):
        pass

    def trainer(fn, *, train_loop_config, **kw):
        seen.update(train_loop_config)
        raise CapturedError

    monkeypatch.setattr(train_mod, "_Trainer", trainer)
    cfg = _cfg(tmp_path, digits_checkpoints, num_workers=2)
    with pytest.raises(CapturedError):
        run_mod.run_finetune(cfg)
    assert set(seen) == {"finetune", "driver_pid", "samples", "inputs"}
    assert seen["samples"]["train"].startswith(str(tmp_path / "store" / "samples"))
    assert len(repr(seen)) < 8000, "the loop config grew"
