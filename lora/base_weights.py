"""How the frozen base weights a LoRA trains on are stored: narrower than they compute, cast up per layer at use.

`--base_dtype fp8` keeps every Linear of the denoiser's blocks (its family's `blocks`: FLUX.1's double- and
single-stream blocks, SD 3.5's joint blocks, SDXL's ResNet and transformer blocks) as float8_e4m3fn with one
power-of-two scale per output row (weight-only fp8, as torchao's float8 weight-only and ComfyUI's scaled fp8 files):

    stored = round_e4m3(W / s),  s = 2^ceil(log2(max|W_row| / 448))   (448: e4m3's largest value)
    W~ = stored * s, in the compute dtype, made in the forward and again in the backward (never kept)

A power-of-two scale makes W~ exact in bf16 and fp32 (3 mantissa bits times 2^k) and the row's largest value
lands in [224, 448], so each weight keeps e4m3's relative precision: |W~ - W| <= 2^-4 |W| (half of the 3-bit
mantissa's step), or 2^-10 s in the subnormal range. The stored bytes are half of bf16's (plus 4 bytes a row).
`--base_dtype bf16` / `fp16` under fp32 compute stores those dtypes the same way (no scale). Other layers (norms,
embedders, convolutions) stay in the compute dtype: a small share of the parameters.

`StoredLinear` is an `nn.Linear` (so LoRA targets, `LoRALayer` and FSDP2 see a Linear) whose parameters are the
stored weight, its scale and the bias; its `weight` is the cast-up weight (DoRA's row norms, shapes). The matmul is
a small autograd function that saves the stored weight for the backward, not a cast-up copy: autograd would
otherwise keep one compute-dtype copy per layer until the backward, a whole bf16 model's worth.
"""

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
STORAGE = {"fp8": FP8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def fp8_scale(weight: torch.Tensor) -> torch.Tensor:
    """(out, 1) fp32 powers of two: the smallest s per row with max|row| / s <= 448 (1 for an all-zero row)."""
    amax = weight.detach().float().abs().amax(dim=1, keepdim=True)  # (out, 1)
    return torch.where(amax > 0, torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX))), torch.ones_like(amax))


def cast_up(stored: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`: stored * scale (exact: the scale is a power of two)."""
    w = stored.to(dtype)
    return w if scale is None else w * scale.to(dtype)


class _StoredMatmul(torch.autograd.Function):
    """x W~^T + b, W~ cast up from the stored weight in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, x, stored, scale, bias):
        ctx.save_for_backward(stored, scale)
        return F.linear(x, cast_up(stored, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        stored, scale = ctx.saved_tensors
        grad_x = grad @ cast_up(stored, scale, grad.dtype) if ctx.needs_input_grad[0] else None  # (..., in)
        return grad_x, None, None, None


class StoredLinear(nn.Linear):
    """A frozen Linear stored as `weight_stored` (fp8 + `weight_scale`, or bf16/fp16) that computes in the input's
    dtype (the autocast dtype under autocast), as nn.Linear does."""

    def __init__(self, linear: nn.Linear, storage: torch.dtype, device=None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype  # what `weight` gives, e.g. bf16
        w = linear.weight.detach().to(device)
        scale = fp8_scale(w) if storage == FP8 else None
        stored = (w.float() / scale).to(FP8) if storage == FP8 else w.to(storage)  # exact division: powers of two
        self.weight_stored = nn.Parameter(stored, requires_grad=False)  # (out, in)
        self.weight_scale = None if scale is None else nn.Parameter(scale, requires_grad=False)  # (out, 1)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(device), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The cast-up weight (out, in) in the dtype the layer was loaded in: a new tensor, not a parameter."""
        return cast_up(self.weight_stored, self.weight_scale, self.compute_dtype)

    def forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        b = self.bias.to(dtype) if bias and self.bias is not None else None
        return _StoredMatmul.apply(x.to(dtype), self.weight_stored, self.weight_scale, b)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` casts every floating tensor, float8 included: the stored weight and its scale keep their
        dtypes (casting them would undo the saving, or drop the scale's meaning); device moves apply."""
        kept = [t for t in (self.weight_stored, self.weight_scale) if t is not None]
        return super()._apply(lambda t: t.to(fn(t[:0]).device) if any(t is k for k in kept) else fn(t), recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"stored={self.weight_stored.dtype}, computes={self.compute_dtype}")


def store_linears(blocks: list[nn.Module], storage: torch.dtype, device=None) -> int:
    """Replace every nn.Linear inside `blocks` by a StoredLinear of `storage` on `device` (default: where it is),
    one layer at a time (a GPU holds one cast-up layer at most); before a LoRA wraps them. Returns how many."""
    count = 0
    for block in blocks:
        for name, module in list(block.named_modules()):
            if type(module) is nn.Linear:  # not a StoredLinear already
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent), child, StoredLinear(module, storage, device))
                count += 1
    return count


def stored_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's frozen parameters by dtype, e.g. {"torch.float8_e4m3fn": ..., "torch.float32": ...}."""
    sizes = {}
    for p in model.parameters():
        if not p.requires_grad:
            sizes[str(p.dtype)] = sizes.get(str(p.dtype), 0) + p.numel() * p.element_size()
    return sizes
