"""The evaluation report: a table for the terminal, a JSON file, and target checks.

The JSON report (FORMAT_VERSION 1):

    {"format_version": 1, "created": "2025-01-01T12:00:00+00:00",
     "real":      {"folder": "/data/real", "n_found": 120, "n_used": 119, "skipped": [{"path": ..., "reason": ...}]},
     "generated": {"folder": "/data/synthetic", "n_found": 200, "n_used": 200, "skipped": []},
     "groups_by": "folder",
     "groups":  [{"name": "all", "n_real": 119, "n_generated": 200, "compared_with": "all real images",
                  "whole_real_set": false}, ...],
     "results": [{"group": "all", "metric": "fid", "value": 35.2, "n_real": 119, "n_generated": 200,
                  "target": "<40", "passed": true},
                 {"group": "all", "metric": "kid_mean", "value": 0.0041, "n_real": 119, "n_generated": 200,
                  "subset_size": 119, "subsets": 100},
                 {"group": "healthy", "metric": "clip_score", "value": null, "n_real": 0, "n_generated": 0,
                  "note": "no generated image of this group has a prompt"}, ...],
     "notes": ["..."], "unavailable": {"lpips": "needs torchvision, ..."},
     "settings": {"metrics": [...], "kid_subsets": 100, ..., "inception_weights": ..., "clip_model": ...},
     "versions": {"python": ..., "torch": ..., "torchmetrics": ..., "transformers": ..., "sdxl-lora": ...}}

n_real / n_generated of a row are the images that entered that metric (the real pool of a nearest-real
metric, the images with a prompt for the CLIP score); those of a group are its sizes. A group compared with
the whole real set (a prompt REAL does not have) has "whole_real_set": true, and its real-only rows
(`ms_ssim_real_pairs`, `lpips_real_pairs`) "set_wide": true: their value is the whole set's.
"""

import datetime
import importlib.metadata
import json
import platform
import re
from pathlib import Path

from common.files import write_text

FORMAT_VERSION = 1
TARGET_PATTERN = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*$")

# table column per metric, in display order ("kid_mean" also shows kid_std)
COLUMNS = [("fid", "FID"), ("kid_mean", "KID ± std"), ("clip_score", "CLIP"), ("ssim_nearest_real", "SSIM nn"),
           ("ms_ssim_generated_pairs", "MS-SSIM gen"), ("ms_ssim_real_pairs", "MS-SSIM real"),
           ("lpips_nearest_real", "LPIPS nn"), ("lpips_generated_pairs", "LPIPS gen"),
           ("lpips_real_pairs", "LPIPS real")]
METRIC_NAMES = ["fid", "kid_mean", "kid_std", "clip_score", "ssim_nearest_real", "ms_ssim_generated_pairs",
                "ms_ssim_real_pairs", "lpips_nearest_real", "lpips_generated_pairs", "lpips_real_pairs"]
REAL_ONLY = ("ms_ssim_real_pairs", "lpips_real_pairs")  # values of the real images alone
MAX_GROUP_WIDTH = 32
ALL = "all"  # the whole set's group (evaluation/folders.py)


# ---------------------------------------------------------------------------------------------------
# Targets: "fid<40", "ssim_nearest_real>0.75"


def parse_target(text: str) -> tuple[str, str, float]:
    """'fid<40' -> ('fid', '<', 40.0); ValueError naming the valid metric names otherwise."""
    match = TARGET_PATTERN.match(text)
    if not match or match.group(1) not in METRIC_NAMES:
        raise ValueError(f"expected METRIC<VALUE or METRIC>VALUE (also <=, >=) with METRIC one of "
                         f"{', '.join(METRIC_NAMES)}, e.g. fid<40")
    return match.group(1), match.group(2), float(match.group(3))


def apply_targets(rows: list[dict], targets: list[tuple[str, str, float]]) -> bool:
    """Mark each row with a target ("target", "passed"); True if every checked row passed."""
    compare = {"<": float.__lt__, ">": float.__gt__, "<=": float.__le__, ">=": float.__ge__}
    ok = True
    for metric, op, bound in targets:
        for r in rows:  # a set-wide value is checked in the row "all"
            if r["metric"] == metric and r["value"] is not None and not r.get("set_wide"):
                r["target"], r["passed"] = f"{op}{bound:g}", bool(compare[op](float(r["value"]), bound))
                ok &= r["passed"]
    return ok


# ---------------------------------------------------------------------------------------------------
# Terminal


def format_table(groups: list[dict], rows: list[dict]) -> str:
    """One line per group, the whole set first, with its sizes (real and generated images), one column per metric
    present; '-' where a group has no value of its own. A group compared with the whole real set is starred: its
    real-only values (`set_wide` rows) are the whole set's and appear in the row "all" only (a footnote says so)."""
    values = {(r["group"], r["metric"]): r["value"] for r in rows if not r.get("set_wide")}
    present = {r["metric"] for r in rows}
    columns = [(m, title) for m, title in COLUMNS if m in present]
    header = ["group", "n_real", "n_gen"] + [title for _, title in columns]
    lines, starred = [], False
    for g in sorted(groups, key=lambda g: g["name"] != ALL):  # stable: the whole set first, the rest in order
        star = g.get("whole_real_set", False)
        starred |= star
        cells = [_short(g["name"]), f"{g['n_real']}{'*' if star else ''}", str(g["n_generated"])]
        for metric, _ in columns:
            value = values.get((g["name"], metric))
            text = "-" if value is None else f"{value:.4g}"
            if metric == "kid_mean" and value is not None:
                text += f" ± {values.get((g['name'], 'kid_std')):.2g}"
            cells.append(text)
        lines.append(cells)
    widths = [max(len(c[k]) for c in [header, *lines]) for k in range(len(header))]

    def fmt(cells):
        return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths,
                                                                                             strict=True)))

    table = [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)]
    if starred:
        real_only = [title for m, title in columns if m in REAL_ONLY]
        n_all = next((g["n_real"] for g in groups if g["name"] == ALL), "all")
        table.append(f"* REAL has no image of this prompt: compared with all {n_all} real images"
                     + (f" ({', '.join(real_only)}: see the row {ALL})" if real_only else ""))
    return "\n".join(table)


def format_targets(rows: list[dict]) -> str:
    checked = [r for r in rows if "target" in r]
    return "\n".join(f"target {r['metric']} {r['target']} in {_short(r['group'])}: {r['value']:.4g} "
                     f"{'ok' if r['passed'] else 'MISSED'}" for r in checked)


def _short(name: str) -> str:
    name = " ".join(name.split())
    return name if len(name) <= MAX_GROUP_WIDTH else name[: MAX_GROUP_WIDTH - 3] + "..."


# ---------------------------------------------------------------------------------------------------
# JSON


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("sdxl-lora", "torch", "torchmetrics", "transformers", "pillow", "numpy", "matplotlib"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def build_report(real: dict, generated: dict, groups_by: str, groups: list[dict], rows: list[dict], notes: list[str],
                 unavailable: dict, settings: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "real": real,
        "generated": generated,
        "groups_by": groups_by,
        "groups": groups,
        "results": rows,
        "notes": notes,
        "unavailable": unavailable,
        "settings": settings,
        "versions": versions(),
    }


def write_json(path: Path, report: dict) -> None:
    """Write the report to a temporary name and rename it into place (never a half-written file)."""
    write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
