"""Evaluating a generated image dataset against real images (evaluate_images.py).

FID and KID on the TorchScript Inception-v3 of clean-fid/StyleGAN, CLIP score with a transformers CLIP
folder, SSIM/MS-SSIM nearest-real fidelity and pairwise diversity, LPIPS where torchvision exists; all
computed by torchmetrics, per prompt or class folder. Modules, in reading order:

    folders.py    finding, reading and grouping images        inception.py  the Inception-v3 feature network
    clip.py       CLIP score                                  extract.py    one batched pass over a set of images
    metrics.py    FID, KID, SSIM, MS-SSIM, LPIPS (torchmetrics)  evaluate.py   per-group rows; the API for training
    report.py     table, JSON, targets                        summary.py    the PNG summary
    config.py     evaluate_images.py's flags                  settings.py   Settings, METRICS, the Inception file
"""

from common.errors import EvalError, LpipsUnavailable

# The names below are imported on first use (PEP 562), not with the package: evaluate_images.py's flags
# (evaluation/config.py) are read before torch and torchmetrics load, so that --help answers at once.
_LAZY = {"ClipScorer": "evaluation.clip", "Settings": "evaluation.settings",
         "reference_features": "evaluation.evaluate", "score_images": "evaluation.evaluate",
         "InceptionFeatures": "evaluation.inception", "load_inception": "evaluation.inception",
         "load_lpips": "evaluation.metrics"}

__all__ = ["ClipScorer", "EvalError", "InceptionFeatures", "LpipsUnavailable", "Settings", "load_inception",
           "load_lpips", "reference_features", "score_images"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
