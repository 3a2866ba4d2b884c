"""Images and captions that train badly, named at the start-up scan (they are still used): aspect ratios beyond
the bucket range (cropped hard), sides under 1/8 of the resolution (upscaled, blurry), animated files (only the
first frame is used), 16-bit images (scaled to 8 bits), captions that are not UTF-8 (decoded with U+FFFD
replacement characters). Each file is one warning line (the first MAX_NAMED of a kind), and one line counts
each kind.
"""

import logging
from collections import Counter
from pathlib import Path

from PIL import Image

from training.data.buckets import make_buckets
from training.data.scan import map_in_threads

logger = logging.getLogger(__name__)

MAX_NAMED = 20  # warnings per kind named one by one; the count line covers the rest
KINDS = {
    "extreme_aspect": "aspect ratio {ratio:.1f}:1 is beyond the buckets' {limit:.1f}:1; it is cropped hard",
    "small": "{h}x{w} is smaller than 1/8 of --image_size {resolution}; it is upscaled and trains blurry",
    "animated": "animated ({frames} frames); only the first frame is used",
    "16_bit": "16-bit ({mode}); it is scaled to 8 bits",
    "caption_not_utf8": "its caption {caption} is not UTF-8; undecodable bytes became U+FFFD",
}
SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def image_problems(path: Path, height: int, width: int, resolution: int, limit: float) -> list[tuple[str, dict]]:
    """(kind, values for its message) for one image of the scan; reads only its header and caption bytes."""
    found = []
    if max(height, width) / min(height, width) > limit * 1.01:
        found.append(("extreme_aspect", {"ratio": max(height, width) / min(height, width), "limit": limit}))
    if min(height, width) < resolution / 8:
        found.append(("small", {"h": height, "w": width, "resolution": resolution}))
    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:
                found.append(("animated", {"frames": image.n_frames}))
            if image.mode in SIXTEEN_BIT:
                found.append(("16_bit", {"mode": image.mode}))
    except Exception:  # the scan checked it already; nothing more to say here
        pass
    caption = path.with_suffix(".txt")
    try:
        caption.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        found.append(("caption_not_utf8", {"caption": caption.name}))
    except OSError:  # no .txt caption (metadata.jsonl, or none)
        pass
    return found


def warn_about_images(records, resolution: int, bucketing: bool) -> Counter:
    """Warn about each image of a folder scan that trains badly; return the count of each kind."""
    limit = max(h / w for h, w in make_buckets(resolution)) if bucketing else 1.0
    limit = max(limit, 4.0)  # a fixed square size crops anything; warn only for the extreme ones
    counts = Counter()
    found = map_in_threads(lambda r: image_problems(Path(r.path), r.height, r.width, resolution, limit), records,
                           "checking images")
    for record, problems in zip(records, found, strict=True):
        for kind, values in problems:
            counts[kind] += 1
            if counts[kind] <= MAX_NAMED:
                logger.warning("%s: %s", record.path, KINDS[kind].format(**values))
    if counts:
        logger.warning("data: %s", ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in sorted(counts.items())))
    return counts
