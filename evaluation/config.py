"""evaluate_images.py's command line: every flag, checked and resolved before anything loads (one-line
`error: ...`, exit 2, nothing written). The run itself is `evaluation.evaluate.evaluate_folders`.
"""

import argparse
from pathlib import Path

from common.cli import Parser, add_flag, add_verbose, fail
from common.files import check_writable
from evaluation.report import parse_target
from evaluation.settings import METRICS, Settings, default_inception_path

DEFAULTS = Settings  # the class: its fields' defaults, without __post_init__ (which imports torch)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="evaluate_images.py", formatter_class=argparse.RawDescriptionHelpFormatter,
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
    add_flag(g, "metrics", default=",".join(METRICS), metavar="LIST",
                   help=f"comma-separated subset of {','.join(METRICS)} (default: all; clip needs --clip-model, "
                        "lpips needs torchvision)")
    add_flag(g, "groups", default="auto", choices=["auto", "folder", "prompt", "none"],
                   help="per-group rows besides the whole set: folder = GENERATED's top-level subfolders against "
                        "REAL's of the same name; prompt = each prompt of GENERATED (against REAL's images of that "
                        "prompt if any, else all of REAL); auto = folder if both have a subfolder of the same "
                        "name, else prompt if GENERATED has prompts, else none (default: auto)")
    add_flag(g, "inception-weights", metavar="FILE",
                   help=f"the TorchScript Inception-v3 inception-2015-12-05.pt of clean-fid/StyleGAN, for fid and "
                        f"kid (default: {default_inception_path()})")
    add_flag(g, "clip-model", metavar="DIR",
                   help="local transformers CLIP folder for the CLIP score, e.g. a download of "
                        "openai/clip-vit-large-patch14 (default: no CLIP score)")
    add_flag(g, "lpips-net", default=DEFAULTS.lpips_net, choices=["alex", "vgg", "squeeze"],
                   help=f"LPIPS backbone (default: {DEFAULTS.lpips_net})")
    add_flag(g, "kid-subsets", type=int, default=DEFAULTS.kid_subsets, metavar="N",
                   help=f"KID is averaged over N random subsets (default: {DEFAULTS.kid_subsets})")
    add_flag(g, "kid-subset-size", type=int, default=DEFAULTS.kid_subset_size, metavar="N",
                   help=f"images per KID subset, capped by the smaller set of each group (default: "
                        f"{DEFAULTS.kid_subset_size})")
    add_flag(g, "ssim-size", type=int, default=DEFAULTS.thumbnail_size, metavar="PX",
                   help="SSIM, MS-SSIM and LPIPS compare each image's centered square crop resized to PX x PX; "
                        "MS-SSIM uses all 5 scales from 176 px, fewer below (128: 4, 64: 3) (default: "
                        f"{DEFAULTS.thumbnail_size}; use your images' size, e.g. 128, to compare at it)")
    add_flag(g, "max-real-pool", type=int, default=DEFAULTS.max_real_pool, metavar="N",
                   help="nearest-real SSIM/LPIPS search each generated image among at most N real images of its "
                        f"group (a fixed-seed sample) (default: {DEFAULTS.max_real_pool})")
    add_flag(g, "max-pairs", type=int, default=DEFAULTS.max_pairs, metavar="N",
                   help=f"pairwise MS-SSIM/LPIPS use at most N random pairs per group (default: {DEFAULTS.max_pairs})")
    add_flag(g, "seed", type=int, default=DEFAULTS.seed,
                   help=f"seed of KID's subsets and of the pool and pair samples (default: {DEFAULTS.seed})")
    add_flag(g, "target", action="append", default=[], metavar="METRIC<VALUE",
                   help="a goal to check, e.g. 'fid<40' or 'ssim_nearest_real>0.75' (also <=, >=); repeatable; "
                        "a missed one makes the exit status 1 (default: none)")

    g = p.add_argument_group("output")
    add_flag(g, "out", metavar="FILE", help="write the JSON report here (default: only the table)")
    add_flag(g, "png", metavar="FILE", help="write a PNG summary here: bars per group and the most/least "
                   "similar generated-real pairs; needs matplotlib (default: none)")

    g = p.add_argument_group("hardware")
    add_flag(g, "device", default="auto", help="cpu, cuda or cuda:N; auto = cuda if available (default: auto)")
    add_flag(g, "batch-size", type=int, default=DEFAULTS.batch_size, metavar="N",
                   help=f"images per network batch (default: {DEFAULTS.batch_size})")
    add_verbose(p)
    return p


def _fail(flag: str, value, what: str):
    fail(flag.removeprefix("--"), value, what)


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
    for flag in ("out", "png"):
        if getattr(args, flag) is not None:
            check_writable(flag, getattr(args, flag).parent)  # now, not after minutes of feature extraction
    from common.runtime import resolve_device  # here, after parsing: --help and flag errors need no torch

    args.device = resolve_device(args.device, "fp32")[0]
    return args


def _parses(text: str) -> bool:
    try:
        parse_target(text)
        return True
    except ValueError:
        return False
