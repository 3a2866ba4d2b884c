"""Compare a generated image folder with real images: FID, KID, CLIP score, SSIM/MS-SSIM, LPIPS, per group.

    python evaluate_images.py data/wounds_128 outputs/synthetic_wounds --groups folder --ssim-size 128 \\
        --inception-weights inception-2015-12-05.pt --out report.json --png report.png --target 'fid<40'
    python evaluate_images.py /tmp/real /tmp/tiny_images --metrics ssim,ms_ssim --ssim-size 64   # CPU, seconds

The Inception-v3 file (for FID and KID) comes from
https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt .
Flags: `python evaluate_images.py --help`; the metrics and their choices: evaluation/metrics.py.
"""

import sys

from evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
