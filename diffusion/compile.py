"""Regional compilation (`--compile`): each block of the denoiser (its family's `blocks`: SDXL's ResNet and
transformer blocks, SD 3.5's joint blocks, FLUX.1's double- and single-stream blocks) is compiled with
`torch.compile`, not the whole model.

A denoiser repeats a few block shapes many times (SDXL: 70 transformer blocks of 3 widths, 22 ResNet blocks),
and torch.compile treats a module's parameters as inputs, so blocks that share code and shapes share one
compiled graph: start-up costs a few graphs instead of one huge one, and a new image size recompiles a few
blocks, not the model. The LoRA branches inside the blocks are compiled with them. Gradient checkpointing
wraps the compiled blocks (sdxl/unet.py `run`), as eager.
"""

import torch
from torch import nn


def compile_blocks(blocks: list[nn.Module], **options) -> int:
    """Compile each block in place (nn.Module.compile); returns how many. options go to torch.compile (e.g.
    mode="max-autotune-no-cudagraphs"); dynamic=False keeps the graphs specialised to the image sizes seen
    (bucketed training sees a few)."""
    options.setdefault("dynamic", False)
    for block in blocks:
        block.compile(**options)
    # each bucket size and batch shape is a new graph per block kind; the default limit (8) is too low for
    # bucketed training with several block widths
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return len(blocks)
