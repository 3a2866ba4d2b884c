"""The training datasets: a scanned folder (`FolderDataset`, map-style, a reproducible batch plan) or streamed
WebDataset shards (`ShardDataset`, training/data/shards.py), both yielding aspect-bucketed batches
(training/data/images.py), and `build_dataset`, which picks one for a `data_dir`.

Determinism and exact resume (folder sources): the optimizer steps of epoch e are a pure function of (seed, epoch,
the scanned file list, the effective batch = batch_size x accumulation x processes), each step's images are cut
into micro-batches and processes in a fixed way (training/data/buckets.py `micro_batches`), and each sample's
augmentation is a pure function of (seed, epoch, sample index). So `iter_epoch(e, start=k)` reproduces micro-batches
k, k+1, ... of epoch e exactly, with any number of DataLoader workers; a checkpoint needs only (epoch, step); and
1, 2 or 3 processes with the same effective batch train on the same images in the same steps.

Steps are whole: a bucket's images that do not fill a step sit out the epoch (different ones each epoch). Every
sample carries its noise key (epoch, step, position in the step), from which the loop draws its noise and time
(training/loop/loss.py). Shards stream, so their order is reproducible only for the same num_workers and
processes, and their epochs have no fixed length.
"""

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from itertools import chain
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from common.errors import DataError
from common.images import open_rgb
from training.data.buckets import (
    closest_bucket,
    cover_size,
    make_buckets,
    merge_small_buckets,
    micro_batches,
    plan_steps,
)
from training.data.captions import CaptionStyle, finish_caption
from training.data.checks import warn_about_images
from training.data.dataset_config import read_dataset_config, scan_subsets
from training.data.images import ORDER_STREAM, Augmentation, Example, collate, make_example, own_generator
from training.data.masks import MaskSource, check_masks, is_mask_file, mask_crop, read_mask
from training.data.scan import ScanResult, find_shards, scan_folder
from training.data.shards import ShardDataset
from training.data.workers import Epochs, init_worker
from training.flags import SIZE_MULTIPLE

logger = logging.getLogger(__name__)

class TrainingData(Protocol):
    """What the training loop uses of its data: `FolderDataset` (a scanned folder) or `ShardDataset` (streamed)."""

    records: list | None  # the scanned images with their captions; None for streamed shards

    def batches_per_epoch(self) -> int | None: ...  # None: streamed, an epoch ends when the shards do
    def epochs(self, num_workers: int = 0, **kwargs) -> Epochs: ...  # epochs(epoch, start); close()
    def iter_epoch(self, epoch: int, start: int = 0, num_workers: int = 0, **kwargs) -> Iterator[dict]: ...
    def summary(self) -> dict: ...


class EpochBatches:
    """The batch sampler of a FolderDataset's DataLoader: the (epoch, index) pairs of batches start, start + 1, ...
    of the epoch it is `set` to, so one DataLoader (and its workers) serves every epoch and resume point."""

    def __init__(self, dataset: "FolderDataset"):
        self.dataset, self.epoch, self.start = dataset, 0, 0

    def set(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= len(self.dataset):
            raise ValueError(f"start must be a batch position in 0..{len(self.dataset)}, got {start}")
        self.epoch, self.start = epoch, start

    def __iter__(self):
        for batch in self.dataset.batches_for_epoch(self.epoch)[self.start:]:
            yield [(self.epoch, *item) for item in batch]

    def __len__(self) -> int:
        return len(self.dataset) - self.start


class FolderDataset(torch.utils.data.Dataset):
    """Scanned images, bucketed; this rank's micro-batches of epoch e are `batches_for_epoch(e)`, loaded by
    `iter_epoch`.

    An epoch is a list of optimizer steps of batch_size * accumulation * world_size images (one bucket each,
    `plan_steps`); each step is cut into `accumulation` micro-batches per rank, batch_size images each
    (`micro_batches`). Every rank runs the same number of micro-batches of the same size, the ranks' samples are
    disjoint, and the steps are the same for any split of the same effective batch (docs/ARCHITECTURE.md, "Seeds").
    Items are (epoch, index, step, position), since a sample's augmentation depends on the epoch and its noise on
    its place in the step.
    """

    def __init__(
        self,
        scan: ScanResult,
        buckets: list[tuple[int, int]],
        batch_size: int,
        aug: Augmentation,
        rank: int = 0,
        world_size: int = 1,
        accumulation: int = 1,
        whole_steps: bool = True,
    ):
        self.scan, self.buckets, self.batch_size, self.aug = scan, buckets, batch_size, aug
        self.rank, self.world_size, self.accumulation, self.whole_steps = rank, world_size, accumulation, whole_steps
        self.step_images = batch_size * accumulation * world_size  # the effective batch
        self.records = scan.records
        self.bucket_of = [closest_bucket(r.height, r.width, buckets) for r in self.records]
        self.bucket_of, self.merged_buckets = merge_small_buckets(self.bucket_of, buckets, self.step_images)
        self._same_bucket = {b: [] for b in set(self.bucket_of)}  # bucket -> its sample indices, ascending
        for index, bucket in enumerate(self.bucket_of):
            self._same_bucket[bucket].append(index)
        self._position = {i: n for members in self._same_bucket.values() for n, i in enumerate(members)}
        self._failed: set[int] = set()  # indices that failed to load in this process
        self.decode = True  # False once the latents are cached: samples then carry no pixels
        self.masks: MaskSource | None = None  # --masked_loss: where each image's mask comes from
        self._num_batches = len(self.batches_for_epoch(0))  # the same for every epoch

    def steps_for_epoch(self, epoch: int) -> list[list[int]]:
        """The epoch's optimizer steps (every rank's images, `step_images` each; see `plan_steps`)."""
        rng = np.random.default_rng([self.aug.seed % 2**64, epoch, ORDER_STREAM])
        return plan_steps(self.bucket_of, self.step_images, rng, keep_partial=not self.whole_steps)

    def batches_for_epoch(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        """This rank's micro-batches of the epoch, [(sample index, step, position in the step)] each: a pure function
        of (seed, epoch, data, effective batch) and the split (batch_size, accumulation, rank, world_size)."""
        return [[(index, s, position) for index, position in mb]
                for s, step in enumerate(self.steps_for_epoch(epoch))
                for mb in micro_batches(step, self.accumulation, self.batch_size, self.rank, self.world_size)]

    def batches_per_epoch(self) -> int:
        return len(self)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._num_batches

    def load_example(self, index: int, epoch: int) -> Example:
        """Sample `index` as seen in `epoch`, before the flip.

        A file that no longer loads (changed or removed since the scan) is skipped with a warning, and
        the next image of the same bucket (in index order, wrapping around; if none loads, any other image,
        cropped to this bucket) takes its place, so the batch keeps its size and its bucket; the
        replacement is augmented with the skipped slot's (epoch, index) randomness, so the run stays
        deterministic.
        """
        bucket = self.buckets[self.bucket_of[index]]
        if not self.decode:
            record = self.records[index]
            example = make_example(None, (record.height, record.width), bucket, record.caption, record.key, self.aug,
                                   epoch, index)
            return self.with_mask(example, record.path)
        same = self._same_bucket[self.bucket_of[index]]
        start = self._position[index]
        others = (i for i, b in enumerate(self.bucket_of) if b != self.bucket_of[index])
        for candidate in chain(same[start:], same[:start], others):
            if candidate in self._failed:
                continue
            record = self.records[candidate]
            try:
                image, original_size = open_rgb(record.path, lambda h, w: cover_size(h, w, bucket))
            except Exception as error:
                self._failed.add(candidate)
                logger.warning("cannot load %s any more, replacing it in its batch: %s", record.path, error)
                continue
            example = make_example(image, original_size, bucket, record.caption, record.key, self.aug, epoch, index)
            return self.with_mask(example, record.path)
        raise DataError(f"none of the images under {self.scan.root} can be loaded any more; see the warnings above")

    def with_mask(self, example: Example, image_path: str) -> Example:
        """--masked_loss: the example with its image's mask, cropped as the image (read even when the latents are
        cached and the image is not decoded)."""
        if self.masks is not None:
            example.mask = mask_crop(read_mask(image_path, self.masks), example.original_size, example.target_size,
                                     example.crop_top_left)
        return example

    def __getitem__(self, item: tuple[int, int, int, int]) -> dict:
        epoch, index, step, position = item
        return {**self.load_example(index, epoch).to_sample(), "noise_key": (epoch, step, position)}

    def dataloader(self, epoch: int, start: int = 0, num_workers: int = 0, **kwargs) -> torch.utils.data.DataLoader:
        """A DataLoader over batches start, start + 1, ... of the epoch (kwargs: pin_memory, prefetch_factor...)."""
        batches = EpochBatches(self)
        batches.set(epoch, start)
        return torch.utils.data.DataLoader(
            self, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
            worker_init_fn=init_worker, generator=own_generator(self.aug.seed, epoch), **kwargs
        )

    def iter_epoch(self, epoch: int, start: int = 0, num_workers: int = 0, **kwargs) -> Iterator[dict]:
        """Collated batches of the epoch from batch position `start` (the resume point) to its end."""
        return iter(self.dataloader(epoch, start, num_workers, **kwargs))

    def epochs(self, num_workers: int = 0, **kwargs) -> Epochs:
        """`iter_epoch` for a whole run: one DataLoader whose workers live from epoch to epoch (each sample's
        randomness depends only on (seed, epoch, index), so which worker loads it changes nothing)."""
        loader = self.dataloader(0, 0, num_workers, persistent_workers=num_workers > 0, **kwargs)

        def at(epoch: int, start: int = 0) -> torch.utils.data.DataLoader:
            loader.batch_sampler.set(epoch, start)
            return loader

        return Epochs(at)

    def fingerprint(self) -> str:
        """A short hash of what defines the batch plan (files, sizes, captions); compare it when resuming."""
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(f"{record.key}\0{record.height}x{record.width}\0{record.caption}\n".encode())
        return digest.hexdigest()[:16]

    def summary(self) -> dict:
        counts = Counter(self.bucket_of)
        return {
            "source": "folder",
            "data_dir": str(self.scan.root),
            "num_images": self.scan.num_images,
            "bad_files": self.scan.bad_files,
            "missing_captions": self.scan.missing_captions,
            "links_outside": self.scan.links_outside,
            "empty_captions": self.scan.empty_captions,
            "buckets": {f"{h}x{w}": counts[i] for i, (h, w) in enumerate(self.buckets) if counts[i]},
            "merged_buckets": {"{}x{}".format(*self.buckets[b]): f"{n} images trained in bucket "
                               "{}x{} (fewer than one global batch)".format(*self.buckets[to])
                               for b, (n, to) in self.merged_buckets.items()},
            "batches_per_epoch": len(self),
            "fingerprint": self.fingerprint(),
        }


# ----------------------------------------------------------------------------------------------------


def build_dataset(
    data_dir: str | Path,
    resolution: int,
    batch_size: int,
    bucketing: bool = True,
    center_crop: bool = False,
    random_flip: bool = False,
    caption_dropout: float = 0.0,
    shuffle_tags: bool = False,
    keep_tokens: int = 0,
    seed: int = 0,
    max_bad_fraction: float = 0.05,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 1000,
    captions: CaptionStyle | None = None,
    dataset_config: str | Path | None = None,
    masks: MaskSource | None = None,
    accumulation: int = 1,
    whole_steps: bool = True,
) -> FolderDataset | ShardDataset:
    """The training dataset for data_dir (a folder, a metadata.jsonl folder, or .tar shards), or for the subsets of
    a dataset_config file (training/data/dataset_config.py); see the module doc. `accumulation`: micro-batches per
    optimizer step; `whole_steps` False keeps every image (the last step of a bucket smaller: validation).

    bucketing=False trains at a fixed resolution x resolution: short side resized to it, then cropped.
    """
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    if not 0.0 <= caption_dropout <= 1.0 or keep_tokens < 0:
        raise ValueError(f"need 0 <= caption_dropout <= 1 and keep_tokens >= 0, got {caption_dropout}, {keep_tokens}")
    if resolution % SIZE_MULTIPLE or resolution < 2 * SIZE_MULTIPLE:
        raise ValueError(f"resolution {resolution} must be a multiple of {SIZE_MULTIPLE} and at least "
                         f"{2 * SIZE_MULTIPLE} (VAE /8, UNet /4)")
    buckets = make_buckets(resolution) if bucketing else [(resolution, resolution)]
    captions = captions or CaptionStyle()
    aug = Augmentation(center_crop, random_flip, caption_dropout, shuffle_tags, keep_tokens, seed, captions)
    if dataset_config is not None:
        scan = scan_subsets(dataset_config, read_dataset_config(dataset_config, captions), max_bad_fraction,
                            shuffle_tags)
        return _folder_dataset(scan, buckets, (batch_size, accumulation, whole_steps), aug, rank, world_size, masks,
                               resolution, bucketing)
    shards = find_shards(data_dir)
    if shards is not None and masks is not None:
        raise DataError(f"--masked_loss needs a folder of images; {data_dir} is .tar shards")
    if shards is not None:
        dataset = ShardDataset(shards, buckets, batch_size, aug, rank, world_size, shuffle_buffer)
        logger.info("training data: %d webdataset shards from %s", len(shards), data_dir)
        return dataset
    scan = scan_folder(data_dir, max_bad_fraction, captions.extension)
    scan.records = [replace(r, caption=finish_caption(r.caption, captions, shuffle_tags)) for r in scan.records]
    return _folder_dataset(scan, buckets, (batch_size, accumulation, whole_steps), aug, rank, world_size, masks,
                           resolution, bucketing)


def _folder_dataset(scan: ScanResult, buckets, batching: tuple[int, int, bool], aug: Augmentation, rank: int,
                    world_size: int, masks: MaskSource | None, resolution: int, bucketing: bool) -> FolderDataset:
    scan.records = [r for r in scan.records if not is_mask_file(r.path, masks)]
    scan.missing_captions = [p for p in scan.missing_captions if not is_mask_file(p, masks)]
    if masks is not None:
        check_masks(scan, masks)
    batch_size, accumulation, whole_steps = batching
    dataset = FolderDataset(scan, buckets, batch_size, aug, rank, world_size, accumulation, whole_steps)
    if len(dataset) == 0:
        raise DataError(f"{scan.root} has {len(scan.records)} usable images, fewer than one optimizer step of "
                        f"{dataset.step_images} (batch_size {batch_size} x accumulation {accumulation} x {world_size} "
                        "process(es)); lower --batch_size or --gradient_accumulation_steps, or add images")
    dataset.masks = masks
    warn_about_images(dataset.scan.records, resolution, bucketing)  # odd images and captions, named
    summary = dataset.summary()
    logger.info(
        "training data: %d images (%d bad, %d without caption, %d links out of the folder skipped) in buckets %s; "
        "%d batches per epoch",
        summary["num_images"],
        len(summary["bad_files"]),
        len(summary["missing_captions"]),
        len(summary["links_outside"]),
        summary["buckets"],
        summary["batches_per_epoch"],
    )
    for bucket, how in summary["merged_buckets"].items():
        logger.warning("bucket %s: %s", bucket, how)
    return dataset
