"""Captions as kohya-ss/sd-scripts users keep them: the caption file's extension, a trigger word put before or
after every caption, and `keep_tokens_separator` (e.g. `|||`) marking the tags that stay in place when tags are
shuffled:

    "sks dog, outdoors ||| grass, sky, sun"          -> "sks dog, outdoors" fixed, "grass, sky, sun" shuffled
    "sks dog ||| grass, sky ||| masterpiece"        -> a fixed head, shuffled middle, fixed tail

Without tag shuffling the separator is only removed (the parts joined by ", ") once, when the data is scanned,
so cached text embeddings see the caption trained on.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CaptionStyle:
    """How a folder's captions are read and finished (the flags of the same names)."""

    extension: str = ".txt"  # caption_extension
    prefix: str = ""  # caption_prefix
    suffix: str = ""  # caption_suffix
    separator: str = ""  # keep_tokens_separator; "" = none


def finish_caption(caption: str, style: CaptionStyle, shuffle_tags: bool) -> str:
    """The caption a record trains on: prefix and suffix joined with a space; the separator removed unless tags
    are shuffled (then `transform_caption` splits on it each time)."""
    caption = " ".join(part for part in (style.prefix.strip(), caption, style.suffix.strip()) if part)
    if style.separator and not shuffle_tags and style.separator in caption:
        caption = ", ".join(part.strip(" ,") for part in caption.split(style.separator) if part.strip(" ,"))
    return caption


def tags(text: str) -> list[str]:
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def shuffle_tags(caption: str, rng: np.random.Generator, keep: int, separator: str = "") -> str:
    """Shuffle the comma-separated tags: with `separator` in the caption, only those between the first and the
    (optional) second separator; else all but the first `keep`."""
    if separator and separator in caption:
        parts = caption.split(separator, 2)
        head, middle, tail = tags(parts[0]), tags(parts[1]), tags(parts[2]) if len(parts) == 3 else []
    else:
        all_tags = tags(caption)
        head, middle, tail = all_tags[:keep], all_tags[keep:], []
    return ", ".join(head + [middle[i] for i in rng.permutation(len(middle))] + tail)
