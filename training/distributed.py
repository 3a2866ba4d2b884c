"""Data-parallel training under torchrun: one process per GPU (NCCL), or per CPU process (gloo, for tests).

    torchrun --nproc_per_node 4 train_sdxl.py --config my_run.yaml      # 4 GPUs, batch_size per GPU

Each rank trains on its share of every global batch (training/data_loader.py splits a batch of
batch_size x world_size samples, one bucket, into equal contiguous shares) and draws the noise and
timesteps of the whole global batch, keeping its own rows; after backward the LoRA gradients are
averaged over the ranks (an explicit all-reduce: only the small LoRA tensors travel). So N processes
compute what one process with batch_size x N computes (DESIGN.md oracle 7), up to the order of
floating-point sums. Only rank 0 writes checkpoints, metrics, samples and the final LoRA.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors in place over the ranks (gradients, losses); a no-op in one process."""
        if self.size > 1:
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t.div_(self.size)

    def any(self, flag: bool, device) -> bool:
        """True if `flag` is true on any rank (so that all ranks stop at the same step)."""
        if self.size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world(device: str) -> tuple[World, str]:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and this rank's device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return World(rank, size, local_rank), device


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
