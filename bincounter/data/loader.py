"""Streaming the split's WebDataset shards into a DataLoader, for training and evaluation.

Each rank reads its share of the shards and each DataLoader worker a share of that
(``distributed.partition``), so an epoch sees every sample exactly once; when there
are fewer shards than ranks, ranks share shards sample by sample.
"""

from __future__ import annotations

import io
import multiprocessing
import random
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bincounter import distributed as dist_utils
from bincounter.data import shards


class ShardDataset(IterableDataset):
    """Streams ``(image, label)`` from WebDataset shards: this rank's and this worker's share only.

    ``set_epoch`` reshuffles the shard order and the shuffle buffer (the same
    shard order on every rank, so the shares never overlap). The epoch lives in
    shared memory so that persistent DataLoader workers see it too.
    """

    def __init__(self, shard_uris: list[str], transform: Callable, max_count: int, k_or_more: bool = False,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0, seed: int = 0,
                 shard_sizes: list[int] | None = None):
        self.shard_uris, self.transform = list(shard_uris), transform
        # Samples each shard yields after the label filter (``shard_sample_counts``); with them
        # ranks and workers get shards by sample count (``distributed.balance``), not round robin.
        if shard_sizes is not None and len(shard_sizes) != len(self.shard_uris):
            raise ValueError(f"{len(shard_sizes)} shard sizes for {len(self.shard_uris)} shards")
        self.shard_sizes = shard_sizes
        self.max_count, self.k_or_more = max_count, k_or_more
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self._epoch = multiprocessing.Value("i", 0)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def label(self, count: int) -> int | None:
        if count <= self.max_count:
            return count
        return self.max_count if self.k_or_more else None

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shard_uris)))
        if self.shuffle_buffer:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)  # identical on every rank
        return order

    def _sizes(self, order: list[int]) -> list[int] | None:
        return None if self.shard_sizes is None else [self.shard_sizes[s] for s in order]

    def steps(self, epoch: int, batch_size: int, num_workers: int) -> int | None:
        """Batches the longest rank yields this epoch (None without shard sizes): the epoch's step count."""
        sizes = self._sizes(self._order(epoch))
        if sizes is None:
            return None
        return max(dist_utils.batches_per_rank(sizes, self.world_size, num_workers, batch_size))

    def _samples(self, epoch: int, worker: int, num_workers: int):
        order = self._order(epoch)
        picked, rank_stride, worker_stride, worker_offset = dist_utils.partition(
            len(order), self.rank, self.world_size, worker, num_workers, self._sizes(order))
        seen = 0
        for i in picked:
            s = order[i]
            for j, sample in enumerate(shards.iter_shard(self.shard_uris[s])):
                if rank_stride > 1 and (s + j) % rank_stride != self.rank:
                    continue
                seen += 1
                if (seen - 1) % worker_stride != worker_offset:
                    continue
                label = self.label(sample.count)
                if label is not None:
                    yield sample, label

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self._epoch.value
        if info is not None:
            # Persistent workers keep their RNG across epochs; reseed so that an epoch's augmentation
            # depends only on (seed, epoch, rank, worker) and a resumed epoch replays exactly.
            torch.manual_seed((self.seed * 1_000_003 + epoch * 1_009 + self.rank * 101 + worker) % 2 ** 31)
        samples = self._samples(epoch, worker, num_workers)
        if self.shuffle_buffer:
            samples = _shuffled(samples, self.shuffle_buffer,
                                random.Random(hash((self.seed, epoch, self.rank, worker))))
        for sample, label in samples:
            yield self.decode(sample), label

    def decode(self, sample: shards.Sample) -> torch.Tensor:
        try:
            image = Image.open(io.BytesIO(sample.jpeg)).convert("RGB")
        except (OSError, SyntaxError) as e:
            raise ValueError(f"Sample {sample.id!r} is not a readable image: {e}") from e
        return self.transform(image)


def _shuffled(items, size: int, rng: random.Random):
    """Reservoir-style shuffle buffer (as webdataset's ``shuffle``): bounded memory, streaming."""
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf


def make_loader(dataset: ShardDataset, batch_size: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


def shard_sample_counts(manifest: dict, split: str, max_count: int, k_or_more: bool) -> list[int] | None:
    """Samples each shard of ``split`` yields after the label filter (None for manifests without
    per-shard counts, written before ``shard_class_counts`` existed)."""
    per_shard = manifest.get("splits", {}).get(split, {}).get("shard_class_counts")
    if per_shard is None:
        return None
    return [sum(n for c, n in counts.items() if int(c) <= max_count or k_or_more) for counts in per_shard]


def count_samples(manifest: dict, split: str, max_count: int, k_or_more: bool) -> int | None:
    """Samples of ``split`` that training keeps, from the manifest's class counts (None when unknown)."""
    info = manifest.get("splits", {}).get(split, {})
    counts = info.get("class_counts")
    if counts:
        return sum(n for c, n in counts.items() if int(c) <= max_count or k_or_more)
    return info.get("samples")
