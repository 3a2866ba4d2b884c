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
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class UNetConfig:
    """What varies between SDXL-shaped UNets. Field names follow diffusers' config."""

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

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetConfig":
        """Read a diffusers `unet/config.json` dict; refuse what this UNet does not implement."""
        down = list(cfg.get("down_block_types", []))
        n = len(down)
        expected_up = [t.replace("Down", "Up") for t in reversed(down)]
        checks = {
            "down_block_types": all(t in ("DownBlock2D", "CrossAttnDownBlock2D") for t in down) and n > 0,
            "up_block_types": list(cfg.get("up_block_types", [])) == expected_up,
            "use_linear_projection": cfg.get("use_linear_projection") is True,
            "addition_embed_type": cfg.get("addition_embed_type") == "text_time",
            "mid_block_type": cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn",
            "time_embedding_type": cfg.get("time_embedding_type", "positional") == "positional",
            "resnet_time_scale_shift": cfg.get("resnet_time_scale_shift", "default") == "default",
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{k}={cfg.get(k)!r}" for k in bad)
            raise ValueError(f"UNet config is not SDXL-shaped: unsupported {values}")

        def per_level(value):
            return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n

        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim")
        tlpb = per_level(cfg.get("transformer_layers_per_block", 1))
        if any(isinstance(t, (list, tuple)) for t in tlpb) or cfg.get("reverse_transformer_layers_per_block"):
            raise ValueError("UNet config is not SDXL-shaped: per-layer transformer depths are not supported")
        return cls(
            block_out_channels=tuple(cfg["block_out_channels"]),
            cross_attention=tuple(t == "CrossAttnDownBlock2D" for t in down),
            layers_per_block=int(cfg.get("layers_per_block", 2)),
            transformer_layers_per_block=tlpb,
            num_attention_heads=per_level(heads),
            cross_attention_dim=int(cfg["cross_attention_dim"]),
            addition_time_embed_dim=int(cfg["addition_time_embed_dim"]),
            projection_class_embeddings_input_dim=int(cfg["projection_class_embeddings_input_dim"]),
            in_channels=int(cfg.get("in_channels", 4)),
            out_channels=int(cfg.get("out_channels", 4)),
            norm_num_groups=int(cfg.get("norm_num_groups", 32)),
            norm_eps=float(cfg.get("norm_eps", 1e-5)),
        )

    def to_diffusers(self) -> dict:
        """The diffusers `UNet2DConditionModel` config for the same network."""
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.cross_attention]
        cfg = {f.name: getattr(self, f.name) for f in fields(self)}
        del cfg["cross_attention"], cfg["num_attention_heads"]
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
        return {
            "_class_name": "UNet2DConditionModel",
            **cfg,
            "attention_head_dim": list(self.num_attention_heads),
            "down_block_types": down,
            "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "addition_embed_type": "text_time",
            "use_linear_projection": True,
            "act_fn": "silu",
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "upcast_attention": False,
            "sample_size": 128,
        }


SDXL_CONFIG = UNetConfig()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (fractional) timesteps, as diffusers' flip_sin_to_cos=True, shift 0."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)


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
        self.gradient_checkpointing = False

    def forward(self, x, context):
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, context, use_reentrant=False)
            else:
                tokens = block(tokens, context)
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
        # Upsample to the skip's size (2x, or less for odd latent sizes), as diffusers does.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNetBlock(nn.Module):
    """One resolution level: resnets, each optionally followed by a transformer; then a resampler.

    Serves as diffusers' DownBlock2D / CrossAttnDownBlock2D (skip_channels=None) and
    UpBlock2D / CrossAttnUpBlock2D (each resnet first concatenates one skip tensor).
    """

    def __init__(self, in_chs, out_ch, temb_dim, cfg: UNetConfig, level: int, skip_chs=None, resample=None):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        skips = skip_chs or [0] * len(in_chs)
        if cfg.cross_attention[level]:  # registered before resnets, as in diffusers' state_dict
            heads, depth = cfg.num_attention_heads[level], cfg.transformer_layers_per_block[level]
            self.attentions = nn.ModuleList(
                [Transformer2DModel(out_ch, heads, depth, cfg.cross_attention_dim, g, eps) for _ in in_chs]
            )
        else:
            self.attentions = None
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(i + s, out_ch, temb_dim, g, eps) for i, s in zip(in_chs, skips, strict=True)]
        )
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_ch)])
        self.gradient_checkpointing = False

    def resnet(self, j, x, temb):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self.resnets[j], x, temb, use_reentrant=False)
        return self.resnets[j](x, temb)

    def down(self, x, temb, context):
        """Returns the output and the skips it leaves for the up path."""
        skips = []
        for j in range(len(self.resnets)):
            x = self.resnet(j, x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips

    def up(self, x, temb, context, skips, next_size):
        """Consumes `skips` from the end; upsamples to `next_size` (the next level's skip size)."""
        for j in range(len(self.resnets)):
            x = self.resnet(j, torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x, next_size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, ch, temb_dim, cfg: UNetConfig):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        heads, depth = cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1]
        self.attentions = nn.ModuleList([Transformer2DModel(ch, heads, depth, cfg.cross_attention_dim, g, eps)])
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_dim, g, eps) for _ in range(2)])
        self.gradient_checkpointing = False

    def forward(self, x, temb, context):
        for j, resnet in enumerate(self.resnets):
            if j > 0:
                x = self.attentions[j - 1](x, context)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(resnet, x, temb, use_reentrant=False)
            else:
                x = resnet(x, temb)
        return x


class SDXLUNet(nn.Module):
    """Noise-prediction UNet: (noisy latents, timestep, text tokens, pooled text + size ids) -> prediction."""

    def __init__(self, cfg: UNetConfig = SDXL_CONFIG):
        super().__init__()
        self.config = cfg
        chs, n = cfg.block_out_channels, len(cfg.block_out_channels)
        temb_dim = chs[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], temb_dim)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_dim)

        lpb = cfg.layers_per_block
        self.down_blocks = nn.ModuleList()
        skip_chs = [chs[0]]  # channels of every skip tensor, in order
        for i in range(n):
            in_ch = chs[i - 1] if i > 0 else chs[0]
            last = i == n - 1
            self.down_blocks.append(
                UNetBlock([in_ch] + [chs[i]] * (lpb - 1), chs[i], temb_dim, cfg, i, resample=None if last else "down")
            )
            skip_chs += [chs[i]] * (lpb + (0 if last else 1))

        self.up_blocks = nn.ModuleList()  # registered before mid_block, as in diffusers' state_dict
        self.mid_block = UNetMidBlock2DCrossAttn(chs[-1], temb_dim, cfg)

        prev = chs[-1]
        for level in reversed(range(n)):
            in_chs = [prev] + [chs[level]] * lpb
            skips = [skip_chs.pop() for _ in range(lpb + 1)]
            self.up_blocks.append(
                UNetBlock(in_chs, chs[level], temb_dim, cfg, level, skips, resample="up" if level > 0 else None)
            )
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
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = enabled

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs):
        """sample (B, 4, h, w) latents; timestep scalar or (B,); encoder_hidden_states (B, 77, 2048);
        added_cond_kwargs: "text_embeds" (B, 1280) pooled text, "time_ids" (B, 6) = original size,
        crop top-left, target size (h, w order). Returns the prediction (B, 4, h, w)."""
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        temb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(sample.dtype))
        time_ids = added_cond_kwargs["time_ids"]
        time_embeds = timestep_embedding(time_ids.flatten(), self.config.addition_time_embed_dim).reshape(b, -1)
        add = torch.cat([added_cond_kwargs["text_embeds"], time_embeds], dim=-1).to(temb.dtype)  # (B, 2816)
        temb = temb + self.add_embedding(add)  # (B, 1280)
        context = encoder_hidden_states

        x = self.conv_in(sample)  # (B, 320, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block.down(x, temb, context)
            skips += block_skips
        x = self.mid_block(x, temb, context)  # (B, 1280, h/4, w/4)
        for block in self.up_blocks:
            n_skips = len(block.resnets)
            next_size = skips[-n_skips - 1].shape[-2:] if len(skips) > n_skips else None
            x = block.up(x, temb, context, skips, next_size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 4, h, w)
