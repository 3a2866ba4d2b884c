"""evaluate_images.py's command line: check everything, load the networks, one pass per folder, report.

Order of work, so that bad input costs nothing and writes nothing: parse and check every flag (one-line
`error: ...`, exit 2), scan both folders (missing or empty: the same), load Inception, CLIP and LPIPS (a
missing Inception file: the download command), then decode each image once, compute the metrics per
group, print the table, and only then write --out and --png.

Exit status: 0 done; 1 done but a --target was missed; 2 bad input (nothing written).
"""

import argparse
import logging
import re
import sys
from pathlib import Path

import torch

from evaluation import metrics
from evaluation.evaluate import METRICS, Settings, evaluate_groups, extract_folder
from evaluation.folders import TOP_LEVEL, EvalError, make_groups, scan_folder
from evaluation.inception import default_inception_path, file_digest, load_inception
from evaluation.report import (
    apply_targets,
    build_report,
    format_table,
    format_targets,
    parse_target,
    write_json,
)
from evaluation.summary import pairs_grid, write_summary

DEFAULTS = Settings()


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors as one line too
        self.exit(2, f"error: {message}; see python {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="evaluate_images.py", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare a folder of generated images with a folder of real ones: FID, KID, CLIP score, "
                    "SSIM/MS-SSIM and LPIPS, for the whole set and per prompt or class folder.",
        epilog="examples:\n"
        "  python evaluate_images.py data/wounds_128 outputs/synthetic_wounds --groups folder \\\n"
        "      --inception-weights inception-2015-12-05.pt --ssim-size 128 --out report.json --png report.png \\\n"
        "      --target 'fid<40' --target 'ssim_nearest_real>0.75' --target 'lpips_nearest_real<0.25'\n"
        "  python evaluate_images.py REAL GENERATED --metrics ssim,ms_ssim     # no network files needed",
    )
    p.add_argument("real", metavar="REAL", help="folder of real images (searched recursively)")
    p.add_argument("generated", metavar="GENERATED", help="folder of generated images, e.g. generate_images.py's "
                   "--output-dir (prompts read from the .json/.txt next to each image)")

    g = p.add_argument_group("metrics")
    g.add_argument("--metrics", default=",".join(METRICS), metavar="LIST",
                   help=f"comma-separated subset of {','.join(METRICS)} (default: all; clip needs --clip-model, "
                        "lpips needs torchvision)")
    g.add_argument("--groups", default="auto", choices=["auto", "folder", "prompt", "none"],
                   help="per-group rows besides the whole set: folder = GENERATED's top-level subfolders against "
                        "REAL's of the same name; prompt = each prompt of GENERATED (against REAL's images of that "
                        "prompt if any, else all of REAL); auto = folder if both have a subfolder of the same "
                        "name, else prompt if GENERATED has prompts, else none (default: auto)")
    g.add_argument("--inception-weights", metavar="FILE",
                   help=f"the TorchScript Inception-v3 inception-2015-12-05.pt of clean-fid/StyleGAN, for fid and "
                        f"kid (default: {default_inception_path()})")
    g.add_argument("--clip-model", metavar="DIR",
                   help="local transformers CLIP folder for the CLIP score, e.g. a download of "
                        "openai/clip-vit-large-patch14 (default: no CLIP score)")
    g.add_argument("--lpips-net", default=DEFAULTS.lpips_net, choices=["alex", "vgg", "squeeze"],
                   help=f"LPIPS backbone (default: {DEFAULTS.lpips_net})")
    g.add_argument("--kid-subsets", type=int, default=DEFAULTS.kid_subsets, metavar="N",
                   help=f"KID is averaged over N random subsets (default: {DEFAULTS.kid_subsets})")
    g.add_argument("--kid-subset-size", type=int, default=DEFAULTS.kid_subset_size, metavar="N",
                   help=f"images per KID subset, capped by the smaller set of each group (default: "
                        f"{DEFAULTS.kid_subset_size})")
    g.add_argument("--ssim-size", type=int, default=DEFAULTS.thumbnail_size, metavar="PX",
                   help="SSIM, MS-SSIM and LPIPS compare each image's centered square crop resized to PX x PX; "
                        "MS-SSIM uses all 5 scales from 176 px, fewer below (128: 4, 64: 3) (default: "
                        f"{DEFAULTS.thumbnail_size}; use your images' size, e.g. 128, to compare at it)")
    g.add_argument("--max-real-pool", type=int, default=DEFAULTS.max_real_pool, metavar="N",
                   help="nearest-real SSIM/LPIPS search each generated image among at most N real images of its "
                        f"group (a fixed-seed sample) (default: {DEFAULTS.max_real_pool})")
    g.add_argument("--max-pairs", type=int, default=DEFAULTS.max_pairs, metavar="N",
                   help=f"pairwise MS-SSIM/LPIPS use at most N random pairs per group (default: {DEFAULTS.max_pairs})")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help=f"seed of KID's subsets and of the pool and pair samples (default: {DEFAULTS.seed})")
    g.add_argument("--target", action="append", default=[], metavar="METRIC<VALUE",
                   help="a goal to check, e.g. 'fid<40' or 'ssim_nearest_real>0.75' (also <=, >=); repeatable; "
                        "a missed one makes the exit status 1 (default: none)")

    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="FILE", help="write the JSON report here (default: only the table)")
    g.add_argument("--png", metavar="FILE", help="write a PNG summary here: bars per group and the most/least "
                   "similar generated-real pairs; needs matplotlib (default: none)")

    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="cpu, cuda or cuda:N; auto = cuda if available (default: auto)")
    g.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, metavar="N",
                   help=f"images per network batch (default: {DEFAULTS.batch_size})")
    return p


def _fail(flag: str, value, what: str):
    raise EvalError(f"{flag} {value}: {what}")


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check every flag (EvalError on a bad value); resolve device and metrics."""
    args = build_parser().parse_args(argv)
    args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in args.metrics if m not in METRICS]
    if unknown or not args.metrics:
        _fail("--metrics", ",".join(unknown) or "''", f"must be a comma-separated subset of {','.join(METRICS)}")
    for flag, value, least in (("--kid-subsets", args.kid_subsets, 1), ("--kid-subset-size", args.kid_subset_size, 2),
                               ("--ssim-size", args.ssim_size, 32), ("--max-real-pool", args.max_real_pool, 1),
                               ("--max-pairs", args.max_pairs, 1), ("--batch-size", args.batch_size, 1)):
        if value < least:
            _fail(flag, value, f"must be at least {least}")
    try:
        args.targets = [parse_target(t) for t in args.target]
    except ValueError as e:
        bad = next(t for t in args.target if not _parses(t))
        _fail("--target", repr(bad), str(e))
    for flag in ("out", "png"):
        value = getattr(args, flag)
        if value is not None:
            path = Path(value).expanduser().absolute()
            if path.is_dir():
                _fail(f"--{flag}", path, "is a folder; give a file name")
            if path.parent.exists() and not path.parent.is_dir():
                _fail(f"--{flag}", path, f"{path.parent} is a file, not a folder")
            setattr(args, flag, path)
    if args.clip_model and "clip" not in args.metrics:
        _fail("--clip-model", args.clip_model, "is given but --metrics leaves out clip; add clip or drop the flag")
    args.device = _resolve_device(args.device)
    return args


def _parses(text: str) -> bool:
    try:
        parse_target(text)
        return True
    except ValueError:
        return False


def _resolve_device(device: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        _fail("--device", device, "must be auto, cpu, cuda or cuda:N")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            _fail("--device", device, "no CUDA GPU is visible to torch; use --device cpu (or auto)")
        if int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
            _fail("--device", device, f"only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _groups_by(choice: str, real, generated) -> str:
    """auto: folder when both sets have a subfolder of the same name, else prompt when GENERATED has prompts."""
    if choice != "auto":
        return choice
    if ({f.folder for f in generated.files} & {f.folder for f in real.files}) - {TOP_LEVEL}:
        return "folder"
    return "prompt" if any(f.prompt for f in generated.files) else "none"


def run(args: argparse.Namespace) -> int:
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
                   "compared_with": g.compared_with} for g in groups]
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


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        return run(parse_args(argv))
    except EvalError as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
