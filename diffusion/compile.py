"""Regional compilation (`--compile`): each ResNet block and each transformer block of the UNet is compiled
with `torch.compile`, not the whole model.

The UNet repeats a few block shapes many times (SDXL: 70 transformer blocks of 3 widths, 22 ResNet blocks),
and torch.compile treats a module's parameters as inputs, so blocks that share code and shapes share one
compiled graph: start-up costs a few graphs instead of one huge one, and a new image size recompiles a few
blocks, not the model. The LoRA branches inside the blocks are compiled with them. Gradient checkpointing
wraps the compiled blocks (sdxl/unet.py `run`), as eager.
"""

import torch
from torch import nn

from sdxl.unet import BasicTransformerBlock, ResnetBlock2D


def compile_blocks(unet: nn.Module, **options) -> int:
    """Compile every ResNet and transformer block of `unet` in place (nn.Module.compile); returns how many.
    options go to torch.compile (e.g. mode="max-autotune-no-cudagraphs"); dynamic=False keeps the graphs
    specialised to the image sizes seen (bucketed training sees a few)."""
    options.setdefault("dynamic", False)
    blocks = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
    for block in blocks:
        block.compile(**options)
    # each bucket size and batch shape is a new graph per block kind; the default limit (8) is too low for
    # bucketed training with several block widths
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return len(blocks)
