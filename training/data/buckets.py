"""Aspect-ratio buckets: the bucket list, the resize-and-crop geometry, and the batch plan of an epoch.

SDXL was trained on many aspect ratios at about 1024^2 pixels (Podell et al. 2023, "SDXL", section 2.3,
"multi-aspect training"). A bucket is an (H, W) target size; every image goes to the bucket whose aspect
ratio is closest to its own, is resized to cover the bucket and cropped to it, and every batch holds
images of one bucket only so they stack into one tensor.

Everything here is a pure function of its arguments (randomness comes in as a numpy Generator), which
is what makes the data order reproducible and a resumed run exact (see training/data/datasets.py).
"""

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

Size = tuple[int, int]  # (h, w), or (top, left) for an offset


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 4.0) -> list[Size]:
    """All (H, W) buckets for a training resolution, sorted by aspect ratio H/W (tallest first).

    Rules: sides are multiples of `step`; the area is at most resolution^2 (never above, so a bucket
    costs no more memory than the square run the user asked for); for each short side, the long side is
    the longest that still fits that area; the long/short ratio is at most `max_ratio`; both orientations
    are included, plus the largest square. For 1024 this gives the familiar SDXL list: 1024x1024,
    960x1088, 896x1152, 832x1216, 768x1344, 704x1472, 640x1600, 576x1792, 512x2048 and their transposes.
    """
    if resolution < step:
        raise ValueError(f"resolution {resolution} is smaller than the bucket step {step}; use at least {step}")
    area = resolution * resolution
    side = resolution // step * step  # the largest square bucket
    landscape = {(side, side)}
    for short in range(side, step - 1, -step):
        long = area // short // step * step
        if long >= short and long / short <= max_ratio:
            landscape.add((short, long))
    buckets = landscape | {(w, h) for h, w in landscape}
    return sorted(buckets, key=lambda hw: (-hw[0] / hw[1], hw[0]))


def closest_bucket(height: int, width: int, buckets: Sequence[Size]) -> int:
    """Index of the bucket whose aspect ratio is closest to h/w (distance in log ratio; first wins ties)."""
    log_ratio = math.log(height / width)
    distances = [abs(log_ratio - math.log(h / w)) for h, w in buckets]
    return distances.index(min(distances))


def cover_size(height: int, width: int, bucket: Size) -> Size:
    """(h, w) after resizing an image so that it covers the bucket: scale = max(H/h, W/w), aspect kept."""
    bucket_h, bucket_w = bucket
    scale = max(bucket_h / height, bucket_w / width)
    return max(bucket_h, round(height * scale)), max(bucket_w, round(width * scale))


def crop_offset(resized: Size, bucket: Size, rng: np.random.Generator | None) -> Size:
    """(top, left) of the bucket-sized crop in the resized image: uniform random, or centered if rng is None."""
    spare_h, spare_w = resized[0] - bucket[0], resized[1] - bucket[1]
    if rng is None:
        return spare_h // 2, spare_w // 2
    return int(rng.integers(spare_h + 1)), int(rng.integers(spare_w + 1))


def flipped_crop_offset(resized: Size, bucket: Size, top_left: Size) -> Size:
    """The crop offset, in the mirrored resized image, of the same crop mirrored horizontally.

    Column x of the resized image (width rw) is column rw - 1 - x of its mirror, so the crop's columns
    [left, left + W) become [rw - W - left, rw - left): mirroring the crop equals cropping the mirrored
    image at left' = rw - W - left. The top offset does not change.
    """
    top, left = top_left
    return top, resized[1] - bucket[1] - left


def crop_geometry(original_size: Size, bucket: Size, rng: np.random.Generator | None) -> tuple[Size, Size, Size]:
    """(resized (h, w), crop (top, left), the mirrored crop's (top, left)) of an image of `original_size` in
    its bucket: what `crop_to_bucket` does, without the pixels. Random crop offset from `rng`, centered if None."""
    resized = cover_size(*original_size, bucket)  # (h, w)
    top_left = crop_offset(resized, bucket, rng)
    return resized, top_left, flipped_crop_offset(resized, bucket, top_left)


def crop_to_bucket(
    image: Image.Image, original_size: Size, bucket: Size, rng: np.random.Generator | None
) -> tuple[Image.Image, Size, Size]:
    """Resize an upright image (full size `original_size`, maybe decoded smaller) to cover the bucket, crop it.

    Returns the unflipped crop, its (top, left) in the resized image, and the (top, left) that the same
    crop mirrored has in the mirrored resized image. Random crop offset from `rng`, centered if None.
    """
    resized, (top, left), flipped = crop_geometry(original_size, bucket, rng)
    if image.size != (resized[1], resized[0]):
        image = image.resize((resized[1], resized[0]), Image.Resampling.LANCZOS)
    return image.crop((left, top, left + bucket[1], top + bucket[0])), (top, left), flipped


def plan_steps(bucket_of: Sequence[int], step_images: int, rng: np.random.Generator, keep_partial: bool = False
               ) -> list[list[int]]:
    """One epoch's optimizer steps: lists of `step_images` sample indices (the effective batch: batch_size x
    accumulation x processes), each from a single bucket.

    Within each bucket (in bucket-index order) the samples are shuffled and cut into steps; the images of a bucket
    that do not fill a step sit out the epoch (fewer than `step_images`, different ones each epoch), so that every
    step is whole and can be cut the same way into any micro-batches and processes: a run's steps depend on the
    effective batch alone, not on how it is split (docs/ARCHITECTURE.md, "Seeds"). `keep_partial` keeps them as a
    smaller last step (validation: every image once). Then the order of all steps is shuffled."""
    members = defaultdict(list)
    for index, bucket in enumerate(bucket_of):
        members[bucket].append(index)
    steps = []
    for bucket in sorted(members):
        shuffled = np.asarray(members[bucket])[rng.permutation(len(members[bucket]))]
        end = len(shuffled) if keep_partial else len(shuffled) - len(shuffled) % step_images
        steps += [shuffled[i : min(i + step_images, end)].tolist() for i in range(0, end, step_images)]
    return [steps[i] for i in rng.permutation(len(steps))]


def micro_batches(step: Sequence[int], accumulation: int, batch_size: int, rank: int, world_size: int
                  ) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches of one step: [(sample index, its position in the step)], `accumulation` of them.
    Micro-batch k of rank r holds positions [(k W + r) B, (k W + r + 1) B) (W processes, B = batch_size): the
    union over ranks of each k is the same slice of the step whatever W, so one process with batch W B sees what
    W processes see together. A partial (validation) step is cut into the same slices, the last ones shorter."""
    out = []
    for k in range(accumulation):
        first = (k * world_size + rank) * batch_size
        out.append([(step[p], p) for p in range(first, min(first + batch_size, len(step)))])
    return [mb for mb in out if mb]


def group_by_bucket(items: Iterable, bucket_of: Callable[[object], Hashable], batch_size: int) -> Iterator[list]:
    """Batch a stream by bucket: one pending list per bucket, emitted when it holds batch_size items.

    At the end of the stream the incomplete lists are emitted too (smaller batches), in bucket order.
    """
    pending: dict[Hashable, list] = {}
    for item in items:
        batch = pending.setdefault(bucket_of(item), [])
        batch.append(item)
        if len(batch) == batch_size:
            yield pending.pop(bucket_of(item))
    for bucket in sorted(pending):
        yield pending[bucket]


def merge_small_buckets(bucket_of: Sequence[int], buckets: Sequence[Size], step_images: int) -> tuple[list[int], dict]:
    """Buckets holding fewer images than one step (the effective batch) give their images to the nearest bucket (in
    log aspect ratio) that holds at least that many (to the fullest bucket if none does), so that no bucket's few
    images sit out every epoch.
    Returns the new bucket of each image and {small bucket: (its images, the bucket they went to)}."""
    counts = defaultdict(int)
    for bucket in bucket_of:
        counts[bucket] += 1
    full = [b for b, n in counts.items() if n >= step_images] or [max(counts, key=lambda b: (counts[b], -b))]

    def log_ratio(b: int) -> float:
        return math.log(buckets[b][0] / buckets[b][1])

    moved = {b: min(full, key=lambda f: (abs(log_ratio(f) - log_ratio(b)), f)) for b in counts if b not in full}
    return [moved.get(b, b) for b in bucket_of], {b: (counts[b], to) for b, to in moved.items()}
