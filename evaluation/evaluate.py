"""Evaluating generated images against real ones: per group for the report, or one list for training.

From Python (what training calls: the networks are loaded once, the real features computed once):

    from evaluation import ClipScorer, load_inception, reference_features, score_images
    inception = load_inception("inception-2015-12-05.pt", device="cuda")
    real = reference_features("data/real", inception, device="cuda")              # (N, 2048), once
    clip = ClipScorer.from_pretrained("weights/clip-vit-large-patch14", device="cuda")   # optional
    scores = score_images(pil_images, real, inception, clip=clip, prompts=prompts, device="cuda")
    # {"kid_mean", "kid_std", "kid_subset_size", "fid", "clip_score", "n_real", "n_generated"}

evaluate_images.py runs `evaluate_folders`: `extract_folder` on both folders, then `evaluate_groups`.
Each result is a row {"group", "metric", "value", "n_real", "n_generated", ...}: value None with a "note"
when the group cannot have that metric (too few images, no prompts, no matching real subfolder); "set_wide": true
on a real-only metric (MS-SSIM/LPIPS of real pairs) of a group compared with all real images: the value is the
whole set's, so the table shows it in the row "all" only.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from common.errors import EvalError
from common.images import to_rgb
from evaluation import metrics
from evaluation.clip import ClipScorer, clip_score
from evaluation.extract import Extracted, extract
from evaluation.folders import (
    ALL,
    TOP_LEVEL,
    Group,
    ImageFile,
    ImageFolder,
    decode,
    make_groups,
    scan_folder,
    warn_skipped,
)
from evaluation.inception import InceptionFeatures, file_digest, load_inception
from evaluation.report import apply_targets, build_report, format_table, format_targets, write_json
from evaluation.settings import Settings
from evaluation.summary import pairs_grid, write_summary


@dataclass
class Side:
    """One folder after its pass: the decodable files and what was extracted from them (same order)."""

    files: list[ImageFile]
    data: Extracted


def extract_folder(folder: ImageFolder, settings: Settings, inception: InceptionFeatures | None,
                   clip: ClipScorer | None, description: str) -> Side:
    """Decode every image of `folder` once; skipped files are warned about and added to folder.skipped."""
    def on_skip(i: int, reason: str) -> None:
        warn_skipped(folder.files[i].path, reason)
        folder.skipped.append((str(folder.files[i].path), reason))

    wants_thumbnails = {"ssim", "ms_ssim", "lpips"} & set(settings.metrics)
    data = extract(lambda i: decode(folder.files[i].path), len(folder.files),
                   prompts=[f.prompt for f in folder.files], inception=inception, clip=clip,
                   thumbnail_size=settings.thumbnail_size if wants_thumbnails else None,
                   batch_size=settings.batch_size, device=settings.device, description=description, on_skip=on_skip)
    if not data.kept:
        raise EvalError(f"{description}: none of the {len(folder.files)} images under {folder.root} could be "
                        "decoded (each is named in a warning above); fix or replace them")
    return Side([folder.files[i] for i in data.kept], data)


# ---------------------------------------------------------------------------------------------------
# The report's rows, group by group


def row(group: str, metric: str, value: float | None, n_real: int, n_generated: int, **extra) -> dict:
    return {"group": group, "metric": metric, "value": value, "n_real": n_real, "n_generated": n_generated, **extra}


class _Nearest:
    """Nearest-real results per (metric, real pool), so groups that share a pool reuse them."""

    def __init__(self):
        self.found: dict[tuple, dict[int, tuple[float, int]]] = {}

    def get(self, name: str, function, gen: Side, real: Side, gen_indices: list[int], pool: list[int],
            higher_is_closer: bool, settings: Settings) -> list[tuple[float, int]]:
        known = self.found.setdefault((name, tuple(pool)), {})
        todo = [g for g in gen_indices if g not in known]
        if todo:
            values, best = metrics.nearest(function, gen.data.thumbnails, real.data.thumbnails, todo, pool,
                                           higher_is_closer, settings.batch_size, settings.device)
            known.update({g: (float(v), b) for g, v, b in zip(todo, values, best, strict=True)})
        return [known[g] for g in gen_indices]


def evaluate_groups(real: Side, gen: Side, groups: list[Group], settings: Settings,
                    lpips: metrics.LpipsDistance | None) -> tuple[list[dict], list[tuple[int, int, float]]]:
    """Rows of every requested metric for every group, and (generated, nearest real, SSIM) of the whole set."""
    rows, nearest_pairs, cache, pair_cache = [], [], _Nearest(), {}
    wanted = set(settings.metrics)

    def pairs_row(group: Group, metric: str, function, side: Side, indices: list[int]) -> dict:
        found = _pairs_row(group.name, metric, function, side, indices, settings, pair_cache)
        if side is real and group.whole_real_set:  # the whole real set's value, not the group's
            found["set_wide"] = True
        return found

    for group in groups:
        name, ng = group.name, len(group.generated)
        if "fid" in wanted:
            rows.append(_fid_row(real, gen, group))
        if "kid" in wanted:
            rows += _kid_rows(real, gen, group, settings)
        if "clip" in wanted and gen.data.cosines is not None:
            cos = gen.data.cosines[group.generated]
            cos = cos[~cos.isnan()]
            rows.append(row(name, "clip_score", clip_score(cos), 0, len(cos)) if len(cos) else
                        row(name, "clip_score", None, 0, 0, note="no generated image of this group has a prompt"))
        pool = metrics.sample_indices(group.real, settings.max_real_pool, settings.seed)
        if "ssim" in wanted:
            if pool:
                found = cache.get("ssim", metrics.ssim_pairs, gen, real, group.generated, pool, True, settings)
                rows.append(row(name, "ssim_nearest_real", _mean(v for v, _ in found), len(pool), ng))
                if name == ALL:
                    nearest_pairs = [(g, b, v) for g, (v, b) in zip(group.generated, found, strict=True)]
            else:
                rows.append(row(name, "ssim_nearest_real", None, 0, ng, note="no real images to compare with"))
        if "ms_ssim" in wanted:
            function = metrics.ms_ssim_function(settings.thumbnail_size)
            rows.append(pairs_row(group, "ms_ssim_generated_pairs", function, gen, group.generated))
            rows.append(pairs_row(group, "ms_ssim_real_pairs", function, real, group.real))
        if "lpips" in wanted and lpips is not None:
            if pool:
                found = cache.get("lpips", lpips, gen, real, group.generated, pool, False, settings)
                rows.append(row(name, "lpips_nearest_real", _mean(v for v, _ in found), len(pool), ng))
            else:
                rows.append(row(name, "lpips_nearest_real", None, 0, ng, note="no real images to compare with"))
            rows.append(pairs_row(group, "lpips_generated_pairs", lpips, gen, group.generated))
            rows.append(pairs_row(group, "lpips_real_pairs", lpips, real, group.real))
    return rows, nearest_pairs


def _fid_row(real: Side, gen: Side, group: Group) -> dict:
    nr, ng = len(group.real), len(group.generated)
    if nr < 2 or ng < 2:
        return row(group.name, "fid", None, nr, ng, note="needs at least 2 real and 2 generated images")
    value = metrics.fid(real.data.features[group.real], gen.data.features[group.generated])
    return row(group.name, "fid", value, nr, ng)


def _kid_rows(real: Side, gen: Side, group: Group, settings: Settings) -> list[dict]:
    nr, ng = len(group.real), len(group.generated)
    if min(nr, ng) < 2:
        note = "needs at least 2 real and 2 generated images"
        return [row(group.name, m, None, nr, ng, note=note) for m in ("kid_mean", "kid_std")]
    mean, std, size = metrics.kid(real.data.features[group.real], gen.data.features[group.generated],
                                  settings.kid_subsets, settings.kid_subset_size, settings.seed)
    extra = {"subset_size": size, "subsets": settings.kid_subsets}
    return [row(group.name, "kid_mean", mean, nr, ng, **extra), row(group.name, "kid_std", std, nr, ng, **extra)]


def _pairs_row(group: str, metric: str, function, side: Side, indices: list[int], settings: Settings,
               cache: dict) -> dict:
    """Mean of `function` over sampled pairs of `indices`; groups with the same images reuse the value."""
    is_real = metric.endswith("real_pairs")
    counts = (len(indices), 0) if is_real else (0, len(indices))
    if len(indices) < 2:
        return row(group, metric, None, *counts, note="needs at least 2 images")
    key = (metric, tuple(indices))
    if key not in cache:
        pairs = metrics.sample_pairs(indices, settings.max_pairs, settings.seed)
        values = metrics.pair_values(function, side.data.thumbnails, side.data.thumbnails, pairs,
                                     settings.batch_size, settings.device)
        cache[key] = (float(values.mean()), len(pairs))
    mean, n_pairs = cache[key]
    return row(group, metric, mean, *counts, n_pairs=n_pairs)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# ---------------------------------------------------------------------------------------------------
# For training: PIL images against precomputed real features


def reference_features(real: str | Path | Sequence[Image.Image], inception: InceptionFeatures, batch_size: int = 32,
                       device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, D) Inception features of a folder of real images (unreadable files skipped with a warning) or of
    a list of PIL images; compute once, pass to `score_images` at every evaluation."""
    if isinstance(real, (str, Path)):
        folder = scan_folder(real, "real folder")
        return extract_folder(folder, Settings(metrics=("fid", "kid"), batch_size=batch_size, device=str(device)),
                              inception, None, "real images").data.features
    images = list(real)
    data = extract(lambda i: to_rgb(images[i]), len(images), inception=inception, batch_size=batch_size,
                   device=device, description="real images")
    return data.features


def score_images(images: Sequence[Image.Image], real_features: torch.Tensor, inception: InceptionFeatures,
                 clip: ClipScorer | None = None, prompts: Sequence[str] | None = None, batch_size: int = 32,
                 device: str | torch.device = "cpu", kid_subsets: int = 100, kid_subset_size: int = 1000,
                 seed: int = 0) -> dict:
    """KID (and FID, and the CLIP score with `clip` and `prompts`) of PIL images against real features."""
    images = list(images)
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    data = extract(lambda i: to_rgb(images[i]), len(images), prompts=prompts, inception=inception,
                   clip=clip if prompts is not None else None, batch_size=batch_size, device=device,
                   description="generated images")
    out = {"n_real": len(real_features), "n_generated": len(data.kept)}
    if min(len(real_features), len(data.kept)) >= 2:
        out["kid_mean"], out["kid_std"], out["kid_subset_size"] = metrics.kid(
            real_features, data.features, kid_subsets, kid_subset_size, seed)
        out["fid"] = metrics.fid(real_features, data.features)
    if data.cosines is not None and (~data.cosines.isnan()).any():
        out["clip_score"] = clip_score(data.cosines[~data.cosines.isnan()])
    return out


# ---------------------------------------------------------------------------------------------------
# evaluate_images.py's run


def _groups_by(choice: str, real, generated) -> str:
    """auto: folder when both sets have a subfolder of the same name, else prompt when GENERATED has prompts."""
    if choice != "auto":
        return choice
    if ({f.folder for f in generated.files} & {f.folder for f in real.files}) - {TOP_LEVEL}:
        return "folder"
    return "prompt" if any(f.prompt for f in generated.files) else "none"


def evaluate_folders(args) -> int:
    """evaluate_images.py's run: scan both folders (missing or empty: an EvalError), load Inception, CLIP and
    LPIPS (a missing Inception file: the download command), decode each image once, compute the metrics per
    group, print the table, and only then write --out and --png. Returns 0, or 1 if a --target was missed."""
    real_folder = scan_folder(args.real, "REAL")
    gen_folder = scan_folder(args.generated, "GENERATED")
    settings = Settings(metrics=tuple(args.metrics), kid_subsets=args.kid_subsets,
                        kid_subset_size=args.kid_subset_size, thumbnail_size=args.ssim_size,
                        max_real_pool=args.max_real_pool, max_pairs=args.max_pairs, seed=args.seed,
                        batch_size=args.batch_size, device=args.device, lpips_net=args.lpips_net)
    notes, unavailable = [], {}
    inception = clip = lpips = None
    if {"fid", "kid"} & set(args.metrics):
        inception = load_inception(args.inception_weights, args.device)
    if "clip" in args.metrics:
        if args.clip_model:
            from evaluation.clip import ClipScorer

            clip = ClipScorer.from_pretrained(args.clip_model, args.device)
        else:
            unavailable["clip_score"] = "not computed (give --clip-model DIR, a local transformers CLIP folder)"
    if "lpips" in args.metrics:
        try:
            lpips = metrics.load_lpips(args.lpips_net, args.device)
        except metrics.LpipsUnavailable as e:
            unavailable["lpips"] = f"unavailable ({e})"

    real = extract_folder(real_folder, settings, inception, None, "real images")
    gen = extract_folder(gen_folder, settings, inception, clip, "generated images")
    if clip is not None and not any(f.prompt for f in gen.files):
        unavailable["clip_score"] = "not computed (no generated image has a prompt: .json, .txt or metadata.jsonl)"
    groups_by = _groups_by(args.groups, real, gen)
    groups, group_notes = make_groups(real.files, gen.files, groups_by)
    notes += group_notes
    rows, nearest_pairs = evaluate_groups(real, gen, groups, settings, lpips)
    targets_met = apply_targets(rows, args.targets)
    if "kid" in args.metrics and any(r.get("subset_size", settings.kid_subset_size) < settings.kid_subset_size
                                     for r in rows if r["metric"] == "kid_mean"):
        notes.append(f"kid: subsets smaller than {settings.kid_subset_size} images where a group has fewer "
                     "(see subset_size; a subset that is a whole set gives std 0); KID stays unbiased, FID does "
                     "not: trust KID for small sets")

    group_rows = [{"name": g.name, "n_real": len(g.real), "n_generated": len(g.generated),
                   "compared_with": g.compared_with, "whole_real_set": g.whole_real_set}
                  for g in groups]
    print(format_table(group_rows, rows))
    for line in [format_targets(rows), *notes, *(f"{k}: {v}" for k, v in unavailable.items())]:
        if line:
            print(line)

    if args.out is not None:
        report_settings = settings.to_dict() | {
            "inception_weights": str(inception.path) if inception else None,
            "inception_sha256_16": file_digest(inception.path) if inception else None,
            "clip_model": clip.name if clip else None,
            "targets": args.target,
        }
        report = build_report(_side_info(real_folder, real), _side_info(gen_folder, gen), groups_by, group_rows,
                              rows, notes, unavailable, report_settings)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, report)
        print(f"report: {args.out}")
    if args.png is not None:
        grid = pairs_grid(gen.data.thumbnails, real.data.thumbnails, nearest_pairs)
        args.png.parent.mkdir(parents=True, exist_ok=True)
        skipped = write_summary(args.png, group_rows, rows, grid)
        print(skipped or f"summary: {args.png}")
    return 0 if targets_met else 1


def _side_info(folder, side) -> dict:
    return {"folder": str(folder.root), "n_found": len(folder.files), "n_used": len(side.files),
            "skipped": [{"path": p, "reason": r} for p, r in folder.skipped]}
