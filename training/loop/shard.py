"""--shard_base: the frozen denoiser sharded across the torchrun processes with FSDP2, the LoRA whole on each.

FSDP2 (`torch.distributed.fsdp.fully_shard`, Zhao et al. 2023, "PyTorch FSDP"; torchtitan's layout) is applied to
each block of the denoiser (its family's `blocks`: FLUX.1's 57 double- and single-stream blocks), then to the root,
which takes what is left (embedders, final layer). Each process keeps 1/N of every frozen tensor (the fp8 weights
and scales of --base_dtype fp8 too: FSDP2 all-gathers a group of mixed dtypes as bytes); a block's weights are
all-gathered just before its forward and freed after it, and gathered again for its backward (and for its
recomputation with gradient checkpointing).

The LoRA is not sharded: its parameters are FSDP2's `ignored_params`, plain tensors on every process, as with DDP.
So the optimizer, EMA, gradient clipping, the non-finite check and checkpoints see exactly what an unsharded run
has (a checkpoint holds the whole LoRA under its usual names: a sharded run resumes on one process unsharded, and
the other way round). FSDP2 reduces no gradient here (the base has none, the LoRA is ignored): the LoRA gradients
are averaged by `average_gradients`, one all-reduce of flat buckets after the step's last backward. The LoRA is
small next to the base (FLUX.1-dev attention, rank 16: 26 M parameters, 0.4 GB with AdamW's state, vs 24 GB of
base), so keeping it whole costs little and keeps every other part of the loop as it is.

Every process must run every forward of the sharded model (each block's all-gather needs all of them): validation,
sample grids and scores run on every process under --shard_base, and rank 0 alone writes and logs.
"""

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

BUCKET = 2**25  # elements per all-reduce of flattened gradients (128 MB of fp32)


def shard_base(denoiser: nn.Module, blocks: list[nn.Module], world) -> None:
    """fully_shard each block, then the root, over all processes; the trainable (LoRA) parameters are left out,
    whole on every process (they must be on `world.device` already: FSDP2 moves only what it shards)."""
    lora = {p for p in denoiser.parameters() if p.requires_grad}
    # A Linear over (B, N, C) returns a view of its 2-D matmul; FSDP2 warns that an in-place op on the root's output
    # would skip its backward hook. The loss never changes the prediction in place (training/loop/loss.py).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(world.device.type, (world.size,))
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=lora)
    fully_shard(denoiser, mesh=mesh, ignored_params=lora)


@torch.no_grad()
def average_gradients(params: list[torch.Tensor], world) -> None:
    """Average the gradients of `params` over the processes in place (those without one are left out: the same on
    every process, as every process runs the same model): flat buckets of one dtype, one all-reduce each."""
    if world.size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        start = 0
        while start < len(same):
            end, size = start, 0
            while end < len(same) and (end == start or size + same[end].numel() <= BUCKET):
                size, end = size + same[end].numel(), end + 1
            bucket = torch.cat([g.reshape(-1) for g in same[start:end]])
            dist.all_reduce(bucket, op=dist.ReduceOp.SUM)
            bucket.div_(world.size)
            offset = 0
            for g in same[start:end]:
                g.copy_(bucket[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            start = end


def local_bytes(module: nn.Module) -> int:
    """Bytes of the frozen parameters this process holds (its shards, for a sharded module)."""
    total = 0
    for p in module.parameters():
        if not p.requires_grad:
            local = p.to_local() if isinstance(p, DTensor) else p
            total += local.numel() * local.element_size()
    return total
