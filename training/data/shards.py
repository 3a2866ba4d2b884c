"""Streamed WebDataset shards (`ShardDataset`): shuffled, decoded and bucketed on the fly, for datasets too
large to scan (training/data/datasets.py `build_dataset` picks it for a folder of .tar files, a .tar, a brace
pattern or a URL). Its order is reproducible for the same seed, epoch, world size and num_workers; its epochs
have no fixed length, so a run over shards is given in steps.
"""

import hashlib
import io
import logging
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from webdataset.tariterators import tarfile_samples

from common.images import open_rgb
from training.data.buckets import closest_bucket, cover_size, group_by_bucket
from training.data.captions import finish_caption
from training.data.images import ORDER_STREAM, Augmentation, Example, collate, make_example, own_generator
from training.data.workers import Epochs, init_worker

logger = logging.getLogger(__name__)

SHARD_STREAM = 0x5D4D  # the random stream of a shard reader



def stable_index(key: str) -> int:
    """A sample's index for the per-sample random streams, from its key (same on every machine and run)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def buffered_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Approximate streaming shuffle: keep `size` items, emit a random one for each new item read."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            pick = int(rng.integers(len(buffer)))
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            yield buffer.pop()
    for pick in rng.permutation(len(buffer)):
        yield buffer[pick]


def split_for_slot(shards: list[str], slot: int, num_slots: int) -> tuple[list[str], int, int]:
    """This reader's shards and sample filter (keep sample n when n % stride == offset).

    A reader is one DataLoader worker of one rank. With at least as many shards as readers, shards are
    dealt out; otherwise every reader streams every shard and keeps every num_slots-th sample.
    """
    if len(shards) >= num_slots:
        return shards[slot::num_slots], 1, 0
    return shards, num_slots, slot


class ShardDataset(torch.utils.data.IterableDataset):
    """WebDataset shards streamed as collated single-bucket batches; `iter_epoch(epoch)` runs one epoch.

    Per epoch, the shard list is shuffled with (seed, epoch) and dealt out to (rank, worker) readers
    (disjoint across ranks); each reader shuffles its samples with a buffer of `shuffle_buffer` samples,
    decodes them, puts each into its bucket's pending list, and yields a batch whenever a bucket holds
    batch_size images; at the end of the epoch the incomplete batches are yielded too (smaller).
    Undecodable samples are skipped with a warning. Order is reproducible for the same seed, epoch,
    world_size and num_workers; ranks may get different numbers of batches (fix steps per epoch for DDP).
    """

    def __init__(
        self,
        shards: list[str],
        buckets: list[tuple[int, int]],
        batch_size: int,
        aug: Augmentation,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
    ):
        self.shards, self.buckets, self.batch_size, self.aug = shards, buckets, batch_size, aug
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.epoch, self.records = 0, None  # streamed: no scanned records (training/data/datasets.py `TrainingData`)
        if len(shards) < world_size:
            logger.warning("%d shards for %d ranks: each rank reads all shards; write more", len(shards), world_size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration streams (shard order, shuffle buffer and augmentation depend on it)."""
        self.epoch = epoch

    def _samples(self) -> Iterator[dict]:
        """Raw samples (dicts of member bytes) of this reader, shuffled, for self.epoch."""
        worker = torch.utils.data.get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        order = np.random.default_rng([self.aug.seed % 2**64, self.epoch, ORDER_STREAM]).permutation(len(self.shards))
        slot, num_slots = self.rank * num_workers + worker_id, self.world_size * num_workers
        shards, stride, offset = split_for_slot([self.shards[i] for i in order], slot, num_slots)
        samples = tarfile_samples([{"url": s} for s in shards], handler=_warn_and_continue)
        mine = (s for n, s in enumerate(samples) if n % stride == offset)
        rng = np.random.default_rng([self.aug.seed % 2**64, self.epoch, slot, SHARD_STREAM])
        return buffered_shuffle(mine, self.shuffle_buffer, rng)

    def _example(self, sample: dict) -> Example | None:
        """Decode one raw sample into its bucket; None (with a warning) if it has no readable image."""
        key = f"{Path(sample['__url__']).name}/{sample['__key__']}"
        member = next((ext for ext in ("jpg", "jpeg", "png", "webp") if ext in sample), None)
        if member is None:
            logger.warning("skipping %s: no jpg/jpeg/png/webp member (has %s)", key, sorted(sample))
            return None
        text = self.aug.captions.extension.lstrip(".")
        if text not in sample:
            logger.warning("no caption: %s (training it with an empty caption)", key)
        caption = finish_caption(sample.get(text, b"").decode("utf-8", errors="replace").strip(), self.aug.captions,
                                 self.aug.shuffle_tags)

        def resize_to(h: int, w: int) -> tuple[int, int]:
            return cover_size(h, w, self.buckets[closest_bucket(h, w, self.buckets)])

        try:
            image, original_size = open_rgb(io.BytesIO(sample[member]), resize_to)
        except Exception as error:
            logger.warning("skipping %s: cannot decode its %s (%s)", key, member, error)
            return None
        bucket = self.buckets[closest_bucket(*original_size, self.buckets)]
        return make_example(image, original_size, bucket, caption, key, self.aug, self.epoch, stable_index(key))

    def __iter__(self) -> Iterator[dict]:
        examples = (e for e in map(self._example, self._samples()) if e is not None)
        samples = (e.to_sample() for e in examples)
        for batch in group_by_bucket(samples, lambda s: s["target_size"], self.batch_size):
            yield collate(batch)

    def batches_per_epoch(self) -> None:
        return None  # an epoch ends when the shards do

    def epochs(self, num_workers: int = 0, **kwargs) -> Epochs:
        """`iter_epoch` for a whole run (a streamed dataset's workers start again each epoch: set_epoch)."""
        return Epochs(lambda epoch, start: self.dataloader(epoch, num_workers, **kwargs), skip_start=True)

    def iter_epoch(self, epoch: int, start: int = 0, num_workers: int = 0, **kwargs) -> Iterator[dict]:
        """Collated batches of the epoch, skipping the first `start` (decoded again; same num_workers needed)."""
        return islice(iter(self.dataloader(epoch, num_workers, **kwargs)), start, None)

    def dataloader(self, epoch: int, num_workers: int = 0, **kwargs) -> torch.utils.data.DataLoader:
        """A DataLoader over the whole epoch (kwargs: pin_memory, ...)."""
        self.set_epoch(epoch)
        return torch.utils.data.DataLoader(self, batch_size=None, num_workers=num_workers, worker_init_fn=init_worker,
                                           generator=own_generator(self.aug.seed, epoch), **kwargs)

    def summary(self) -> dict:
        return {
            "source": "webdataset",
            "shards": len(self.shards),
            "num_images": None,  # unknown until streamed
            "bad_files": [],
            "missing_captions": [],
            "buckets": {f"{h}x{w}": None for h, w in self.buckets},
        }


def _warn_and_continue(error: Exception) -> bool:
    logger.warning("skipping unreadable shard data: %s", error)
    return True
