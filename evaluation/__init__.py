"""Evaluating a generated image dataset against real images (evaluate_images.py).

FID and KID on the TorchScript Inception-v3 of clean-fid/StyleGAN, CLIP score with a transformers CLIP
folder, SSIM/MS-SSIM nearest-real fidelity and pairwise diversity, LPIPS where torchvision exists; all
computed by torchmetrics, per prompt or class folder. Modules, in reading order:

    folders.py    finding, reading and grouping images        inception.py  the Inception-v3 feature network
    clip.py       CLIP score                                  extract.py    one batched pass over a set of images
    metrics.py    FID, KID, SSIM, MS-SSIM, LPIPS (torchmetrics)  evaluate.py   per-group rows; the API for training
    report.py     table, JSON, targets                        summary.py    the PNG summary
    config.py     evaluate_images.py's flags
"""

from common.errors import EvalError, LpipsUnavailable
from evaluation.clip import ClipScorer
from evaluation.evaluate import Settings, reference_features, score_images
from evaluation.inception import InceptionFeatures, load_inception
from evaluation.metrics import load_lpips

__all__ = ["ClipScorer", "EvalError", "InceptionFeatures", "LpipsUnavailable", "Settings", "load_inception",
           "load_lpips", "reference_features", "score_images"]
