"""Global batches: the same training whatever the number of workers, read from memory or streamed.

``batch_size`` is the *global* batch. Each epoch has one permutation of the training samples, a function of
(seed, epoch) only (for a set larger than a worker's read cache, of the cache and image size too:
:class:`ShuffleWindow`); it is cut into global batches and worker r takes the r-th contiguous share of each
(:class:`GlobalBatchSampler`). Random starts and augmentations are drawn for the whole global batch from
(seed, epoch, batch), so 1 and N workers see the same batch. :class:`StreamedGlobalBatches` reads a worker's
shares from a prepared sample set through its bounded row-group cache, one batch ahead in a reader thread.
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch.utils.data import Sampler

from rcat_ray.core.augment import augment_share
from rcat_ray.core.training_attacks import uniform_start


def _derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers: neighbouring (seed, epoch, batch) give unrelated streams."""
    digest = hashlib.sha256(("rcat_ray:finetune:" + ":".join(str(int(p)) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class ShuffleWindow:
    """Shuffle order for a training set larger than a worker's read cache: the row groups in a random order,
    cut into windows of ``groups_per_window`` groups, and the rows of each window in a random order.

    A batch then needs the groups of at most two windows, so a worker reads every group once per epoch and
    holds at most two windows of them, however large the set (a fully random order over a set far beyond the
    cache reads a group per row and keeps the cache full). Rows of one group are consecutive in storage (an
    ImageFolder's are mostly one class): the windows mix ``groups_per_window`` random groups, which is what
    small row groups are for (``TRAIN_ROWS_PER_GROUP``). Used only when the set does not fit the cache; a set
    that fits keeps the full permutation.
    """

    rows_per_group: int
    groups_per_window: int

    def __post_init__(self) -> None:
        if self.rows_per_group < 1 or self.groups_per_window < 1:
            raise ValueError(f"a shuffle window needs at least one row and one group: {self}")


#: Stored bytes of one shuffle block (16 rows at 3x224x224): a set larger than the read cache is shuffled by blocks
#: of this many bytes' rows, at most :data:`MAX_BLOCK_ROWS`. Fine-tuning prepares its sets with row groups of
#: one block (each block is then one read); a set stored with other row groups trains in the same order.
SHUFFLE_BLOCK_BYTES = 16 * 3 * 224 * 224
MAX_BLOCK_ROWS = 256


def shuffle_block_rows(row_nbytes: int) -> int:
    """Rows of a shuffle block for images of ``row_nbytes`` stored bytes: a function of the data alone, so the
    training order never depends on the row groups a set happens to be stored with."""
    return max(1, min(MAX_BLOCK_ROWS, SHUFFLE_BLOCK_BYTES // max(1, row_nbytes)))


def shuffle_window(num_rows: int, row_nbytes: int, rows_per_group: int, cache_bytes: int) -> ShuffleWindow | None:
    """The windowed order for a set of ``num_rows`` stored rows of ``row_nbytes`` bytes read through a cache of
    ``cache_bytes`` (None: the set fits, use a full permutation), shuffled by blocks of ``rows_per_group`` rows
    (:func:`shuffle_block_rows`). Windows fill half the cache, so the tail of one window and the head of the
    next fit together. A function of the data and the config only, never of the worker count or of how the set
    is stored: 1 and N workers, in any store, train on the same global batches."""
    if num_rows * row_nbytes <= cache_bytes:
        return None
    group_bytes = rows_per_group * row_nbytes
    return ShuffleWindow(rows_per_group, max(1, cache_bytes // (2 * group_bytes)))


def epoch_permutation(num_samples: int, seed: int, epoch: int, window: ShuffleWindow | None = None) -> torch.Tensor:
    """The order of the training samples in one epoch: a function of (seed, epoch) and, for a set larger than
    the read cache, its layout (``window``)."""
    gen = torch.Generator().manual_seed(_derived_seed(seed, epoch, -1))
    if window is None:
        return torch.randperm(num_samples, generator=gen)
    rpg, per_window = window.rows_per_group, window.groups_per_window
    groups = torch.randperm(math.ceil(num_samples / rpg), generator=gen)
    out = []
    for lo in range(0, groups.numel(), per_window):
        rows = (groups[lo : lo + per_window, None] * rpg + torch.arange(rpg)).flatten()
        rows = rows[rows < num_samples]  # the last group may be short
        out.append(rows[torch.randperm(rows.numel(), generator=gen)])
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def start_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the random start of global batch ``index`` of ``epoch``."""
    return _derived_seed(seed, epoch, index)


def augment_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the augmentation of global batch ``index`` of ``epoch`` (a stream unrelated to the start's)."""
    return _derived_seed(seed, epoch, index, 1)


def share_bounds(global_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """(offset, size) of worker ``rank``'s contiguous share of a global batch (sizes differ by at most 1)."""
    base, rem = divmod(global_size, world_size)
    return rank * base + min(rank, rem), base + (1 if rank < rem else 0)


@dataclass(frozen=True)
class Batch:
    """One worker's share of one global batch, with what it needs to act as part of the whole."""

    x: torch.Tensor
    y: torch.Tensor
    ids: torch.Tensor
    index: int  # global batch number within the epoch
    offset: int  # row of the global batch where this share starts
    global_size: int  # rows of the whole global batch
    world_size: int
    start_seed: int  # seeds the random start of the whole global batch

    @property
    def loss_weight(self) -> float:
        """World size times this share's fraction of the global batch: DDP's average of the weighted share
        gradients is then the global batch's gradient, also when the last batch does not split evenly."""
        return self.world_size * self.y.shape[0] / self.global_size


def global_batch_start(batch: Batch, eps: float) -> torch.Tensor:
    """This share's rows of the random start drawn for its whole global batch (CPU, float32)."""
    gen = torch.Generator().manual_seed(batch.start_seed)
    full = uniform_start((batch.global_size, *batch.x.shape[1:]), eps, gen)
    return full[batch.offset : batch.offset + batch.y.shape[0]]


class GlobalBatchSampler(Sampler[list[int]]):
    """Worker ``rank``'s contiguous share of every global batch of one epoch's permutation.

    Unlike a DistributedSampler (which deals samples round-robin and gives each worker full batches, so
    the global batch grows with the worker count), the global batches here are the ones a single worker
    would train on, in the same order. A final global batch with fewer samples than workers is dropped
    (a worker must never get an empty share); with one worker nothing is ever dropped.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        window: ShuffleWindow | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not a worker of a group of {world_size}")
        if batch_size < world_size:
            raise ValueError(f"a global batch of {batch_size} cannot be split over {world_size} workers")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.rank, self.world_size, self.seed, self.window = rank, world_size, seed, window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration follows."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        full, last = divmod(self.num_samples, self.batch_size)
        return full + (1 if last >= self.world_size else 0)

    def shares(self) -> Iterator[tuple[int, torch.Tensor, int, int]]:
        """(global batch index, this worker's sample indices, offset in the global batch, global size)."""
        perm = epoch_permutation(self.num_samples, self.seed, self.epoch, self.window)
        for index in range(len(self)):
            # a global batch's rows in storage order: worker r's share is then the r-th slice of the positions
            # the batch holds, which across the batches of a shuffle window falls in about the same 1/W of the
            # window's row groups, so a worker reads about its share of the set, not all of it. The order inside
            # a global batch changes no gradient (summed over the batch), and it is the same for any W.
            rows = perm[index * self.batch_size : (index + 1) * self.batch_size].sort().values
            offset, size = share_bounds(rows.numel(), self.rank, self.world_size)
            yield index, rows[offset : offset + size], offset, rows.numel()

    def __iter__(self) -> Iterator[list[int]]:
        for _, idx, _, _ in self.shares():
            yield idx.tolist()


def _share_batch(
    sampler: GlobalBatchSampler,
    index: int,
    x: torch.Tensor,
    y: torch.Tensor,
    ids: torch.Tensor,
    offset: int,
    global_size: int,
    augment: bool,
) -> Batch:
    """A :class:`Batch` from a share's rows, augmented (on the CPU) with its global batch's parameters."""
    if augment:
        seed = augment_seed(sampler.seed, sampler.epoch, index)
        x = augment_share(x, seed=seed, offset=offset, global_size=global_size)
    start = start_seed(sampler.seed, sampler.epoch, index)
    return Batch(x, y, ids, index, offset, global_size, sampler.world_size, start)


class GlobalBatches:
    """The :class:`Batch` shares of one epoch, read from in-memory tensors (a sized iterable).

    For small in-process uses and tests; fine-tuning workers read a prepared set with
    :class:`StreamedGlobalBatches`, which yields the same batches.
    """

    def __init__(
        self,
        sampler: GlobalBatchSampler,
        images: torch.Tensor,
        labels: torch.Tensor,
        sample_ids: torch.Tensor,
        *,
        augment: bool = False,
    ):
        self.sampler, self.images, self.labels, self.sample_ids = sampler, images, labels, sample_ids
        self.augment = augment

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        s = self.sampler
        for index, idx, offset, global_size in s.shares():
            x, y, ids = self.images[idx], self.labels[idx], self.sample_ids[idx]
            yield _share_batch(s, index, x, y, ids, offset, global_size, self.augment)


class RowSource(Protocol):
    """What :class:`StreamedGlobalBatches` needs of a sample set (:class:`rcat_ray.core.samples.SampleSet`)."""

    def __len__(self) -> int: ...

    def iter_batches(
        self, batch_size: int, positions: Any = None, *, cache_bytes: int = ..., batch_sizes: Any = None
    ) -> Iterator[Any]: ...


#: Stored (uint8) bytes of decoded row groups a worker keeps between batches (default of ``read_cache_mib``).
#: What a worker holds of the training set, whatever its size (ImageNet's is 190 GB), is at most this, counting
#: the groups of the batch being read, plus the batches read ahead (decoded to float32).
READ_CACHE_BYTES = 256 * 2**20


class StreamedGlobalBatches:
    """This worker's :class:`Batch` shares of one epoch, read from a prepared sample set (a sized iterable).

    The same batches as :class:`GlobalBatches` over the same rows, but only this worker's rows are ever
    asked for: the shares' positions (in training order) go to ``samples.iter_batches``, which reads the
    row groups holding them (an LRU cache of ``cache_bytes`` keeps the groups a later share will need) and
    decodes exactly the float32 tensors ``load_split`` gives. ``prefetch`` batches are read, decoded and
    augmented ahead in a thread, so storage and the CPU work overlap the training step. ``rows_read``
    counts the rows the last (or current) epoch has delivered, ``bytes_read`` the stored bytes of the row
    groups it read, decompressed and hashed for them (whole groups: what storage traffic costs).
    """

    def __init__(
        self,
        sampler: GlobalBatchSampler,
        samples: RowSource,
        *,
        augment: bool = False,
        cache_bytes: int = READ_CACHE_BYTES,
        prefetch: int = 2,
    ):
        if len(samples) != sampler.num_samples:
            raise ValueError(f"the sampler covers {sampler.num_samples} rows, the sample set has {len(samples)}")
        self.sampler, self.samples, self.augment = sampler, samples, augment
        self.cache_bytes, self.prefetch = cache_bytes, prefetch
        self.rows_read = 0
        self._bytes_at_start = getattr(samples, "bytes_read", 0)

    @property
    def bytes_read(self) -> int:
        return getattr(self.samples, "bytes_read", 0) - self._bytes_at_start

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Batch]:
        self.rows_read = 0
        self._bytes_at_start = getattr(self.samples, "bytes_read", 0)
        batches = self._read(list(self.sampler.shares()))
        return prefetched(batches, self.prefetch) if self.prefetch > 0 else batches

    def _read(self, shares: list[tuple[int, torch.Tensor, int, int]]) -> Iterator[Batch]:
        # one pass over the epoch's positions with one cache, each share a batch of its own size (the last global
        # batch's share is usually smaller: a second pass would start with an empty cache and read groups again)
        if not shares:
            return
        s = self.sampler
        positions = torch.cat([idx for _, idx, _, _ in shares]).numpy()
        sizes = [idx.numel() for _, idx, _, _ in shares]
        reader = self.samples.iter_batches(
            sizes[0], positions=positions, cache_bytes=self.cache_bytes, batch_sizes=sizes
        )
        for (index, _, offset, global_size), (x, y, ids) in zip(shares, reader, strict=True):
            self.rows_read += int(y.shape[0])
            yield _share_batch(s, index, x, y, ids, offset, global_size, self.augment)


T = TypeVar("T")


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """``items`` produced ``depth`` ahead in a daemon thread (reads, decoding and augmentation release the
    GIL for most of their time), in the same order; the producer's exception is raised in the consumer, and
    a consumer that stops early stops the producer at its next item."""
    q: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
            put((True, done))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            put((False, err))

    thread = threading.Thread(target=produce, name="rcat-ray-batch-reader", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
