"""Compare a generated image folder with real images: FID, KID, CLIP score, SSIM/MS-SSIM, LPIPS, per group.

    python evaluate_images.py data/wounds_128 outputs/synthetic_wounds --groups folder --ssim-size 128 \\
        --inception-weights inception-2015-12-05.pt --out report.json --png report.png --target 'fid<40'
    python evaluate_images.py /tmp/real /tmp/tiny_images --metrics ssim,ms_ssim --ssim-size 64   # CPU, seconds

The Inception-v3 file (for FID and KID) comes from
https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt .
Flags: `python evaluate_images.py --help` (evaluation/config.py); the run: evaluation/evaluate.py.

Exit status: 0 done; 1 done but a --target was missed; 2 bad input (one line `error: ...`, nothing written).
"""

import logging

from common.cli import print_error, run_script
from common.console import quiet_libraries
from common.errors import WriteError
from evaluation.config import parse_args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")  # skipped files, one line each
    quiet_libraries()  # before transformers loads (the CLIP model); --verbose turns it back on
    try:
        args = parse_args(argv)
        quiet_libraries(args.verbose)
        from evaluation.evaluate import evaluate_folders  # here, after parsing: --help needs no torch

        return evaluate_folders(args)
    except (ValueError, WriteError) as e:  # ConfigError (a flag), EvalError (a folder, a network file), a full disk
        return print_error(str(e))


if __name__ == "__main__":
    run_script(main)
