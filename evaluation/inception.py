"""The Inception-v3 feature network of FID and KID: the TorchScript file clean-fid and StyleGAN use.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium") and KID (Binkowski et al. 2018, "Demystifying MMD GANs") compare the 2048-d pool features of
the TensorFlow Inception-v3 of 2015 (`inception-2015-12-05`). NVIDIA translated it to TorchScript for
StyleGAN2-ADA; clean-fid (Parmar et al. 2022) loads the same file. No torchvision is needed:

    https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt

It is loaded with `torch.jit.load` and called as StyleGAN calls it, `net(images, return_features=True)`,
on uint8-range (N, 3, H, W) images; it resizes to 299x299 itself and returns (N, 2048) float features.
(The `.pkl` next to it on the same server is a Python pickle for StyleGAN3's code base; we never load it.)

Images reach it as 8-bit RGB resized to 299x299 with PIL's antialiased bicubic filter (`inception_input`),
so the network's own resize is the identity: this is clean-fid's "clean" resize, quantized to 8 bits as in
StyleGAN's pipeline; non-square images are squashed to the square, as both do.
"""

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.errors import EvalError
from evaluation.settings import INCEPTION_URL, default_inception_path, download_hint

INCEPTION_SIZE = 299


class InceptionFeatures(torch.nn.Module):
    """uint8 (N, 3, H, W) images -> (N, D) float32 features of a TorchScript feature network.

    This is the `feature=` module torchmetrics' FrechetInceptionDistance and KernelInceptionDistance accept;
    `num_features` tells them D without a dummy pass.
    """

    def __init__(self, net: torch.nn.Module, num_features: int, path: Path | None = None):
        super().__init__()
        self.net, self.num_features, self.path = net, num_features, path

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images, return_features=True).float()  # (N, D)


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionFeatures:
    """The TorchScript Inception-v3 at `path` (default: `default_inception_path()`) as an InceptionFeatures.

    Raises EvalError (one line, with the download command) when the file is missing, a pickle, or not a
    TorchScript network that takes `return_features=True`.
    """
    path = Path(path).expanduser().absolute() if path else default_inception_path()
    if not path.is_file():
        raise EvalError(f"--inception-weights {path} does not exist; {download_hint(path)}")
    if path.suffix == ".pkl":
        raise EvalError(f"--inception-weights {path} is the StyleGAN3 pickle, which we never load (it runs code); "
                        f"use the TorchScript file instead: {INCEPTION_URL}")
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; the file exists only in this format
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.load.*")
            net = torch.jit.load(str(path), map_location=device).eval()
    except Exception as error:
        raise EvalError(f"--inception-weights {path} is not a TorchScript file ({type(error).__name__}); "
                        f"{download_hint(path)}") from None
    try:
        probe = torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, dtype=torch.uint8, device=device)
        with torch.no_grad():
            features = net(probe, return_features=True)
        num_features = int(features.reshape(1, -1).shape[1])
    except Exception as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise EvalError(f"--inception-weights {path} does not act like the Inception-v3 feature network "
                        f"(net(images, return_features=True) failed: {message}); use {INCEPTION_URL}") from None
    return InceptionFeatures(net, num_features, path).to(device)


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of the file's SHA-256 (recorded in the report: which weights were used)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def inception_input(image: Image.Image, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """8-bit RGB PIL image -> uint8 (3, size, size): PIL bicubic (antialiased) resize of the whole image."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class PrecomputedFeatures(torch.nn.Module):
    """The identity on (N, D) features, as torchmetrics' `feature=` module.

    We run the network once per image (`evaluation.extract`) and give torchmetrics the features: every
    group, and every evaluation during training against the same real set, reuses them. `num_features`
    spares torchmetrics its dummy pass. The tests check that this gives torchmetrics' own numbers with the
    network itself as `feature=`.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features
