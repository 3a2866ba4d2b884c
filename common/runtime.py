"""Where a run executes: the device and precision its flags ask for, and the torchrun world it belongs to.

Both `train_sdxl.py` and `generate_images.py` resolve `--device` / `--precision` with `resolve_device` and
join torchrun's process group with `init_world` (NCCL on GPUs, gloo on CPUs so tests run anywhere; one
process per GPU, each on cuda:LOCAL_RANK). Multi-node runs use torchrun's own rendezvous
(`torchrun --nnodes N --rdzv_endpoint HOST:PORT ...`); nothing here re-invents it.
"""

import os
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from common.cli import fail

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torchrun_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(device: str, precision: str) -> tuple[str, str]:
    """(device, precision) for the flags' values, or a ConfigError naming the flag.

    device: auto (cuda if torch sees one, else cpu), cpu, cuda, cuda:N; under torchrun a GPU run uses
    cuda:LOCAL_RANK, so only cuda/auto are accepted there. precision: auto = bf16 on a GPU (fp16 where bf16
    is unsupported), fp32 on a CPU; fp16 needs a GPU."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        fail("device", device, "must be auto, cpu, cuda or cuda:N")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            fail("device", device, "no CUDA GPU is visible to torch; use --device cpu (or auto)")
        if torchrun_world_size() > 1:
            if device != "cuda":
                fail("device", device, "under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda (or auto)")
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
            fail("device", device, f"only {torch.cuda.device_count()} CUDA device(s) are visible; use a lower index")
    if precision == "auto":
        precision = "fp32" if device == "cpu" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "cpu" and precision == "fp16":
        fail("precision", "fp16", "fp16 needs a CUDA GPU; on CPU use --precision fp32 or bf16")
    if device != "cpu" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        fail("precision", "bf16", f"{device} does not support bf16; use --precision fp16 (with a fp16-fix VAE if the "
             "VAE overflows) or fp32")
    return device, precision


@dataclass(frozen=True)
class World:
    """This process's place among the torchrun processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors in place over the ranks; a no-op in one process."""
        if self.size > 1:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t.div_(self.size)

    def any(self, flag: bool) -> bool:
        """True if `flag` is true on any rank (so that every rank stops at the same step)."""
        if self.size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum(self, n: int) -> int:
        """The sum of `n` over the ranks."""
        if self.size == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def broadcast(self, value):
        """Rank 0's `value` (any picklable object) on every rank."""
        if self.size == 1:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world(device: str) -> World:
    """Join torchrun's process group (RANK, WORLD_SIZE, LOCAL_RANK) when there is one; `device` is the
    resolved device of this rank (see `resolve_device`). On a GPU, fp32 matmuls and convolutions may use TF32."""
    if device.startswith("cuda"):  # TF32 for the fp32 parts (VAE, LoRA branches) on Ampere and newer
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    size = torchrun_world_size()
    if size == 1:
        return World(device=torch.device(device))
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.startswith("cuda"):
            dist.init_process_group("nccl", device_id=torch.device(device))
        else:
            dist.init_process_group("gloo")
    return World(dist.get_rank(), size, torch.device(device))


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
