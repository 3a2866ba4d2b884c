"""What an evaluation depends on besides the images (`Settings`, `METRICS`) and where the Inception-v3 file of FID
and KID is looked for: plain values, importable without torch, so that evaluate_images.py's flags (config.py) and
`--help` answer before the networks' libraries load.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

METRICS = ("fid", "kid", "clip", "ssim", "ms_ssim", "lpips")  # what --metrics can name
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"


@dataclass
class Settings:
    """What the numbers depend on besides the images (saved in the report)."""

    metrics: tuple[str, ...] = METRICS
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # capped by the smaller set of each group
    thumbnail_size: int = 256  # SSIM, MS-SSIM and LPIPS compare centered square crops of this size
    max_real_pool: int = 100  # real images searched for each generated image's nearest one
    max_pairs: int = 500  # pairs per group for the pairwise diversity metrics
    seed: int = 0  # KID subsets, pool and pair sampling
    batch_size: int = 32
    device: str = "cpu"
    lpips_net: str = "alex"
    ms_ssim_betas: tuple[float, ...] = field(default=(), init=False)

    def __post_init__(self):
        from evaluation.metrics import ms_ssim_betas  # torch(metrics): only once an evaluation is set up

        self.ms_ssim_betas = ms_ssim_betas(self.thumbnail_size)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def default_inception_path() -> Path:
    """Where we look when --inception-weights is not given: the project's cache folder (see sdxl/tiny.py)."""
    from common.files import cache_dir

    return cache_dir() / INCEPTION_FILE


def download_hint(path: Path) -> str:
    return (f"download the TorchScript Inception-v3 of clean-fid/StyleGAN (about 100 MB): "
            f"curl -L --create-dirs -o {path} {INCEPTION_URL} ; or pass --inception-weights FILE, "
            "or leave fid,kid out of --metrics")
