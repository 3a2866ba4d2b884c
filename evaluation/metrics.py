"""The metrics, each computed by torchmetrics (we choose the inputs; the library does the arithmetic).

- FID (Heusel et al. 2017) and KID (Binkowski et al. 2018): torchmetrics' FrechetInceptionDistance and
  KernelInceptionDistance on Inception features computed once per image (`inception.PrecomputedFeatures`).
  FID is strongly biased upwards for small sets (its covariance needs thousands of images); KID is unbiased,
  so it is the number to trust below ~2,000 images. KID averages `subsets` random subsets of `subset_size`
  images from each side (std over subsets reported too); the subset size is capped by the smaller set, so
  small sets and small groups still get a value (as clean-fid does; when a subset is the whole set, every
  subset is the same and the std is 0). Its subsets are drawn from torch's RNG under a fixed seed.
- SSIM (Wang et al. 2004) for unpaired sets, on square thumbnails in [0, 1] (11x11 Gaussian window,
  sigma 1.5, k1 0.01, k2 0.03: torchmetrics' defaults):
    ssim_nearest_real        for each generated image, the SSIM to its most similar real image (fidelity);
                             mean over the generated images
    ms_ssim_generated_pairs  mean MS-SSIM (Wang et al. 2003) over pairs of generated images (diversity: high
                             means the images look alike, a sign of mode collapse); ms_ssim_real_pairs is the
                             same for the real images, the baseline to compare it with
  MS-SSIM uses the standard 5 scales and weights when the thumbnail is large enough for them (torchmetrics
  needs size // 16 > 10, so >= 176 px); at smaller sizes it keeps the first scales that fit and rescales
  their weights to sum to 1 (`ms_ssim_betas`; 128 px: 4 scales, 64 px: 3). Relu normalization of each
  scale's terms is torchmetrics' default (keeps a negative contrast term from turning the product into NaN).
- LPIPS (Zhang et al. 2018): torchmetrics' LearnedPerceptualImagePatchSimilarity, on the same thumbnails,
  as lpips_nearest_real (min over the real images; lower = closer) and lpips_generated_pairs /
  lpips_real_pairs (higher = more diverse). It needs torchvision and the backbone's weights; without them
  `load_lpips` raises LpipsUnavailable with a one-line reason and the other metrics are unaffected.

Nearest-real search compares each generated image with at most `max_real_pool` real images (a fixed-seed
sample of the group's real images when there are more), and pair metrics use at most `max_pairs` random
distinct pairs: both cost one SSIM/LPIPS evaluation per pair.
"""

from collections.abc import Callable

import numpy as np
import torch

from common.errors import LpipsUnavailable
from evaluation.inception import PrecomputedFeatures

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, table 1 weights
SSIM_KERNEL = 11


# ---------------------------------------------------------------------------------------------------
# FID and KID


def fid(real: torch.Tensor, generated: torch.Tensor) -> float:
    """torchmetrics' FID between two (N, D) feature sets (at least 2 rows each)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(generated.double(), real=False)
    return float(metric.compute())


def kid(real: torch.Tensor, generated: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float, int]:
    """torchmetrics' KID (mean, std over subsets) and the subset size used: min(subset_size, both set sizes)."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(generated))
    with warnings.catch_warnings():  # "will save all extracted features in buffer": features are what we give it
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets,
                                         subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(generated.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # the subsets come from torch's global RNG: fix it, leave it as it was
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


# ---------------------------------------------------------------------------------------------------
# Choosing what to compare


def sample_indices(indices: list[int], limit: int, seed: int) -> list[int]:
    """`indices` itself, or a sorted fixed-seed sample of `limit` of them."""
    if len(indices) <= limit:
        return list(indices)
    rng = np.random.default_rng(seed)
    return sorted(int(indices[k]) for k in rng.choice(len(indices), size=limit, replace=False))


def sample_pairs(indices: list[int], limit: int, seed: int) -> list[tuple[int, int]]:
    """All unordered pairs of distinct `indices`, or `limit` of them drawn at random with a fixed seed."""
    n = len(indices)
    total = n * (n - 1) // 2
    if total <= limit:
        return [(indices[a], indices[b]) for a in range(n) for b in range(a + 1, n)]
    rng, chosen = np.random.default_rng(seed), set()
    while len(chosen) < limit:
        a, b = rng.integers(n, size=2)
        if a != b:
            chosen.add((min(a, b), max(a, b)))
    return [(indices[a], indices[b]) for a, b in sorted(chosen)]


def ms_ssim_betas(size: int) -> tuple[float, ...]:
    """The MS-SSIM scale weights for size x size images: all 5 if torchmetrics accepts them, else the first
    scales that fit, rescaled to sum to 1 (see the module docstring)."""
    for scales in range(len(MS_SSIM_BETAS), 0, -1):
        if size >= 2**scales and size // max(1, scales - 1) ** 2 > SSIM_KERNEL - 1:
            if scales == len(MS_SSIM_BETAS):
                return MS_SSIM_BETAS
            kept = MS_SSIM_BETAS[:scales]
            return tuple(b / sum(kept) for b in kept)
    raise ValueError(f"images of {size}x{size} are too small for SSIM with an {SSIM_KERNEL}x{SSIM_KERNEL} window")


# ---------------------------------------------------------------------------------------------------
# Pairwise image similarities on thumbnails


PairFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # two (B, 3, S, S) in [0, 1] -> (B,)


def ssim_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(a, b, data_range=1.0, reduction="none")


def ms_ssim_function(size: int) -> PairFunction:
    betas = ms_ssim_betas(size)

    def ms_ssim_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

        return multiscale_structural_similarity_index_measure(a, b, data_range=1.0, reduction="none", betas=betas)

    return ms_ssim_pairs


def pair_values(function: PairFunction, left: torch.Tensor, right: torch.Tensor, pairs: list[tuple[int, int]],
                batch_size: int = 32, device: str | torch.device = "cpu") -> torch.Tensor:
    """function(left[i], right[j]) for each (i, j) in pairs, in batches: float64 (P,) on the CPU.
    left and right are uint8 (N, 3, S, S) thumbnails."""
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        i = torch.tensor([p[0] for p in chunk])
        j = torch.tensor([p[1] for p in chunk])
        a = left[i].to(device, torch.float32) / 255.0
        b = right[j].to(device, torch.float32) / 255.0
        with torch.no_grad():
            out.append(function(a, b).reshape(-1).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def nearest(function: PairFunction, generated: torch.Tensor, real: torch.Tensor, gen_indices: list[int],
            real_pool: list[int], higher_is_closer: bool, batch_size: int = 32,
            device: str | torch.device = "cpu") -> tuple[torch.Tensor, list[int]]:
    """For each generated image, the value for its closest image in real_pool, and that image's index."""
    pairs = [(g, r) for g in gen_indices for r in real_pool]
    values = pair_values(function, generated, real, pairs, batch_size, device).reshape(len(gen_indices),
                                                                                        len(real_pool))
    best = values.argmax(dim=1) if higher_is_closer else values.argmin(dim=1)
    return values.gather(1, best[:, None])[:, 0], [real_pool[int(k)] for k in best]


# ---------------------------------------------------------------------------------------------------
# LPIPS


class LpipsDistance:
    """torchmetrics' LPIPS as a pair function: two (B, 3, S, S) batches in [0, 1] -> (B,) distances."""

    def __init__(self, metric, net: str):
        self.metric, self.net = metric, net

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        self.metric.reset()
        self.metric.update(a, b)
        out = self.metric.compute()
        self.metric.reset()
        return out.reshape(-1)


def load_lpips(net: str = "alex", device: str | torch.device = "cpu") -> LpipsDistance:
    """torchmetrics' LPIPS with the `net` backbone; LpipsUnavailable (one-line reason) if it cannot be built."""
    try:  # torchmetrics' LPIPS builds its backbone with torchvision; a missing or broken one stops it here
        import torchvision  # noqa: F401
    except Exception as error:
        raise LpipsUnavailable(f"needs torchvision, which does not import here ({_first_line(error)}); "
                               "pip install torchvision built for your torch") from None
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none", normalize=True)
    except Exception as error:
        raise LpipsUnavailable(f"the {net} backbone could not be built ({_first_line(error)}); its weights "
                               "download once into the torch hub cache (~/.cache/torch/hub)") from None
    return LpipsDistance(metric.to(device), net)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
