"""What the benchmarks share: --threads, TF32 on CUDA as the trainer, --compile (ours and the peer alike),
the device's name, synchronising, the memory of the activations autograd saves (CPU), and timing rounds that
alternate the compared sides.

Alternating: each round times every side once, one after the other, and each side's best (or median) round
counts, so a change of load on a shared machine hits all sides alike and the ratios hold.
"""

import platform
import time
from collections.abc import Callable

import torch
from torch import nn


def add_speed_flags(p) -> None:
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads for the run; 0 = torch's default (pin it on a shared machine)")
    p.add_argument("--compile", action="store_true",
                   help="also time our denoiser and the peer's with each of their blocks compiled (torch.compile; "
                        "SDXL: ResNet and transformer blocks, SD 3.5: joint blocks, FLUX.1: double and single "
                        "blocks); the compile time is reported separately")


def set_up(threads: int, device: torch.device) -> None:
    """--threads, and on CUDA TF32 for fp32 matmuls and convolutions, as the trainer and generator set it
    (common/runtime.py `init_world`): both sides run under the same settings."""
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


# diffusers' blocks that hold what our family's `blocks` hold (what --compile compiles one by one)
PEER_BLOCKS = {"sdxl": ("ResnetBlock2D", "BasicTransformerBlock"), "sd3": ("JointTransformerBlock",),
               "flux": ("FluxTransformerBlock", "FluxSingleTransformerBlock")}


def compile_unet(model: nn.Module, family: str = "sdxl") -> nn.Module:
    """Our denoiser with each of its family's blocks compiled in place (SDXL: every ResNet and transformer block;
    SD 3.5: the joint blocks; FLUX.1: the double- and single-stream blocks), as `--compile` of the trainers and
    generate_images.py does (diffusion/compile.py)."""
    import families
    from diffusion.compile import compile_blocks

    compile_blocks(families.get(family).blocks(model))
    return model


def compile_peer(model: nn.Module, family: str = "sdxl") -> nn.Module:
    """diffusers' model compiled as ours is (`compile_unet`, with compile_blocks' options): the same blocks
    (`PEER_BLOCKS`), with what peft put inside them (diffusers' own `compile_repeated_blocks` compiles its
    transformer blocks only)."""
    for block in model.modules():
        if type(block).__name__ in PEER_BLOCKS[family]:
            block.compile(dynamic=False)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return model


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the distinct storages autograd saves for backward."""

    def __init__(self):
        self.storages = {}

        def pack(t):
            s = t.untyped_storage()
            self.storages[s.data_ptr()] = s.nbytes()
            return t

        super().__init__(pack, lambda t: t)

    @property
    def nbytes(self):
        return sum(self.storages.values())


def seconds(fn: Callable, device: torch.device, n: int = 1) -> float:
    """Wall time of n calls of fn, the device's queued work included."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return time.perf_counter() - t0


def alternate(fns: dict[str, Callable], device: torch.device, rounds: int, n: int) -> dict[str, list[float]]:
    """Seconds per call of each fn in each round; every round runs all fns in turn (n calls each)."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(seconds(fn, device, n) / n)
    return times
