"""The SDXL UNet, written out in plain PyTorch.

Mirrors diffusers' `UNet2DConditionModel` with SDXL's settings (linear-projection transformers,
GEGLU feed-forward, "text_time" micro-conditioning) so that its `state_dict()` keys are exactly
diffusers' and a diffusers `unet/` folder loads with `strict=True`. The same code builds the full
SDXL base UNet (`SDXL_CONFIG`, 2.6 B parameters) and the tiny test model (see `sdxl/tiny.py`).
Attention goes through `F.scaled_dot_product_attention`.

References: Podell et al. 2023, "SDXL" (arXiv:2307.01952); Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models"; diffusers `models/unets/unet_2d_condition.py`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class UNetConfig:
    """What varies between SDXL-shaped UNets. Field names follow diffusers' config; the translation to and from
    a diffusers `config.json` lives in sdxl/configs.py."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    cross_attention: tuple[bool, ...] = (False, True, True)  # per level: DownBlock2D or CrossAttn
    layers_per_block: int = 2
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)  # mid block uses the last
    num_attention_heads: tuple[int, ...] = (5, 10, 20)  # diffusers stores these as attention_head_dim
    cross_attention_dim: int = 2048  # CLIP-L 768 + OpenCLIP-bigG 1280
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 2816  # pooled 1280 + 6 time ids * 256
    in_channels: int = 4
    out_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-5


SDXL_CONFIG = UNetConfig()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (fractional) timesteps, as diffusers' flip_sin_to_cos=True, shift 0."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)


def run(block: nn.Module, *args):
    """block(*args), recomputed in the backward pass when its `gradient_checkpointing` is on (and grads are)."""
    if block.gradient_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.gradient_checkpointing = False

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, c = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(b, -1, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): proj to 2x inner, gelu(gate) * value."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim)
        self.gradient_checkpointing = False

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, linear projection to tokens, `depth` transformer blocks, back to a feature map."""

    def __init__(self, ch: int, heads: int, depth: int, context_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(ch, heads, context_dim, eps) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x, context):
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = run(block, tokens, context)
        tokens = self.proj_out(tokens)
        return x + tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)


class Downsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        # To the size the down path had here (2x, or less for odd latent sizes), as diffusers does.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def level_transformers(cfg: UNetConfig, level: int, ch: int, n: int, mid: bool = False) -> nn.ModuleList | None:
    """The n transformers of a cross-attention level (one after each resnet), or None (DownBlock2D levels)."""
    if not (cfg.cross_attention[level] or mid):
        return None
    heads, depth = cfg.num_attention_heads[level], cfg.transformer_layers_per_block[level]
    g, eps = cfg.norm_num_groups, cfg.norm_eps
    return nn.ModuleList([Transformer2DModel(ch, heads, depth, cfg.cross_attention_dim, g, eps) for _ in range(n)])


class DownBlock(nn.Module):
    """One level of the down path (diffusers' DownBlock2D / CrossAttnDownBlock2D): resnets, each followed by
    a transformer at cross-attention levels, then a stride-2 conv (except the last level). Every output is a
    skip for the up path."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, cfg: UNetConfig, level: int, downsample: bool):
        super().__init__()
        n = cfg.layers_per_block
        self.attentions = level_transformers(cfg, level, out_ch, n)  # registered first, as in diffusers
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_dim, cfg.norm_num_groups,
                                                    cfg.norm_eps) for j in range(n)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None

    def forward(self, x, temb, context, skips: list):
        for j, resnet in enumerate(self.resnets):
            x = run(resnet, x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class UpBlock(nn.Module):
    """One level of the up path (diffusers' UpBlock2D / CrossAttnUpBlock2D): layers_per_block + 1 resnets, each
    taking the newest skip concatenated on channels, each followed by a transformer at cross-attention levels,
    then a 2x upsampling conv (except the last level)."""

    def __init__(self, in_ch: int, out_ch: int, skip_chs: list[int], temb_dim: int, cfg: UNetConfig, level: int,
                 upsample: bool):
        super().__init__()
        self.attentions = level_transformers(cfg, level, out_ch, len(skip_chs))
        in_chs = [in_ch] + [out_ch] * (len(skip_chs) - 1)
        self.resnets = nn.ModuleList([ResnetBlock2D(i + s, out_ch, temb_dim, cfg.norm_num_groups, cfg.norm_eps)
                                      for i, s in zip(in_chs, skip_chs, strict=True)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x, temb, context, skips: list, size=None):
        for j, resnet in enumerate(self.resnets):
            x = run(resnet, torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, transformer, resnet at the lowest resolution."""

    def __init__(self, ch: int, temb_dim: int, cfg: UNetConfig):
        super().__init__()
        self.attentions = level_transformers(cfg, len(cfg.block_out_channels) - 1, ch, 1, mid=True)
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_dim, cfg.norm_num_groups, cfg.norm_eps)
                                      for _ in range(2)])

    def forward(self, x, temb, context):
        x = run(self.resnets[0], x, temb)
        x = self.attentions[0](x, context)
        return run(self.resnets[1], x, temb)


class SDXLUNet(nn.Module):
    """Noise-prediction UNet: (noisy latents, timestep, text tokens, pooled text + size ids) -> prediction."""

    def __init__(self, cfg: UNetConfig = SDXL_CONFIG):
        super().__init__()
        self.config = cfg
        chs, n, lpb = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
        temb_dim = chs[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], temb_dim)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_dim)

        self.down_blocks = nn.ModuleList()
        skip_chs = [chs[0]]  # channels of every skip tensor the down path leaves, in order
        for i in range(n):
            last = i == n - 1
            self.down_blocks.append(DownBlock(chs[max(i - 1, 0)], chs[i], temb_dim, cfg, i, downsample=not last))
            skip_chs += [chs[i]] * (lpb + (0 if last else 1))

        self.up_blocks = nn.ModuleList()  # registered before mid_block, as in diffusers' state_dict
        self.mid_block = UNetMidBlock2DCrossAttn(chs[-1], temb_dim, cfg)
        prev = chs[-1]
        for level in reversed(range(n)):
            skips = [skip_chs.pop() for _ in range(lpb + 1)]
            self.up_blocks.append(UpBlock(prev, chs[level], skips, temb_dim, cfg, level, upsample=level > 0))
            prev = chs[level]

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each resnet and each transformer block in the backward pass (use_reentrant=False)."""
        for m in self.modules():
            if isinstance(m, (ResnetBlock2D, BasicTransformerBlock)):
                m.gradient_checkpointing = enabled

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs):
        """sample (B, 4, h, w) latents; timestep scalar or (B,); encoder_hidden_states (B, 77, 2048);
        added_cond_kwargs: "text_embeds" (B, 1280) pooled text, "time_ids" (B, 6) = original size,
        crop top-left, target size (h, w order). Returns the prediction (B, 4, h, w)."""
        # 1. timestep + micro-conditioning embedding
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(sample.dtype))
        time_ids = added_cond_kwargs["time_ids"]
        time_embeds = timestep_embedding(time_ids.flatten(), self.config.addition_time_embed_dim).reshape(b, -1)
        add = torch.cat([added_cond_kwargs["text_embeds"], time_embeds], dim=-1).to(temb.dtype)  # (B, 2816)
        temb = temb + self.add_embedding(add)  # (B, 1280)
        context = encoder_hidden_states  # (B, 77, 2048)

        # 2. down: every block output is a skip; remember each size we halve, to upsample back to it
        x = self.conv_in(sample)  # (B, 320, h, w)
        skips, sizes = [x], []
        for block in self.down_blocks:  # (B, 320, h, w) -> (B, 640, h/2, w/2) -> (B, 1280, h/4, w/4)
            if block.downsamplers is not None:
                sizes.append(x.shape[-2:])
            x = block(x, temb, context, skips)

        # 3. middle
        x = self.mid_block(x, temb, context)  # (B, 1280, h/4, w/4)

        # 4. up: each resnet consumes the newest skip; upsample to the size remembered on the way down
        for block in self.up_blocks:  # (B, 1280, h/4, w/4) -> (B, 640, h/2, w/2) -> (B, 320, h, w)
            x = block(x, temb, context, skips, sizes.pop() if block.upsamplers is not None else None)

        # 5. out
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 4, h, w)
