"""The PNG summary (--png): a bar chart per metric (one bar per group) and the most/least similar pairs.

The pairs are generated images next to their nearest real image by SSIM (whole set): the top row the most
similar (with a very high SSIM, look for copies of training images), the bottom row the least similar.
Needs matplotlib (the `eval` extra); without it `write_summary` returns a one-line note and writes nothing.
"""

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from common.files import atomic_write

PAIRS_SHOWN = 4  # pairs per row
BAR_METRICS = ["fid", "kid_mean", "clip_score", "ssim_nearest_real", "ms_ssim_generated_pairs", "ms_ssim_real_pairs",
               "lpips_nearest_real", "lpips_generated_pairs", "lpips_real_pairs"]


def pairs_grid(generated: torch.Tensor, real: torch.Tensor, pairs: list[tuple[int, int, float]],
               count: int = PAIRS_SHOWN) -> Image.Image | None:
    """Two rows of (generated | nearest real) tiles: the `count` most similar pairs, then the least similar."""
    if not pairs or generated is None or real is None:
        return None
    ranked = sorted(pairs, key=lambda p: -p[2])
    rows = [ranked[:count], ranked[::-1][:count]]
    size = generated.shape[-1]
    gap, label = 4, 14
    width = count * (2 * size + 3 * gap)
    grid = Image.new("RGB", (width, 2 * (size + label + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for r, chosen in enumerate(rows):
        top = r * (size + label + gap)
        for c, (g, b, value) in enumerate(chosen):
            left = c * (2 * size + 3 * gap)
            grid.paste(Image.fromarray(generated[g].permute(1, 2, 0).numpy()), (left, top + label))
            grid.paste(Image.fromarray(real[b].permute(1, 2, 0).numpy()), (left + size + gap, top + label))
            draw.text((left, top), f"SSIM {value:.3f}", fill="black")
    return grid


def write_summary(path: Path, groups: list[dict], rows: list[dict], grid: Image.Image | None) -> str | None:
    """Write the PNG; None when written, else the one-line reason it was not."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "png: not written (needs matplotlib: pip install 'sdxl-lora[eval]' or pip install matplotlib)"
    names = [g["name"] for g in groups]
    metrics = [m for m in BAR_METRICS if any(r["metric"] == m and r["value"] is not None for r in rows)]
    cols = min(4, max(1, len(metrics)))
    bar_rows = (len(metrics) + cols - 1) // cols
    fig = Figure(figsize=(4 * cols, 3 * bar_rows + (3.5 if grid is not None else 0)), layout="constrained")
    spec = fig.add_gridspec(bar_rows + (1 if grid is not None else 0), cols)
    values = {(r["group"], r["metric"]): r["value"] for r in rows if not r.get("set_wide")}  # the group's own
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(spec[k // cols, k % cols])
        heights = [values.get((n, metric)) for n in names]
        ax.bar(range(len(names)), [h if h is not None else 0.0 for h in heights],
               color=["#4c72b0" if h is not None else "#dddddd" for h in heights])
        ax.set_xticks(range(len(names)), [n if len(n) <= 14 else n[:12] + ".." for n in names], rotation=45,
                      ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        target = next((r["target"] for r in rows if r["metric"] == metric and "target" in r), None)
        if target is not None:  # the goal as a dashed line
            ax.axhline(float(target.lstrip("<>=")), color="#c44e52", linestyle="--", linewidth=1)
    if grid is not None:
        ax = fig.add_subplot(spec[bar_rows, :])
        ax.imshow(grid)
        ax.set_axis_off()
        ax.set_title("generated | nearest real (SSIM): most similar (top), least similar (bottom)", fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return None
