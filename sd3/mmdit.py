"""The MMDiT of Stable Diffusion 3 / 3.5, written out in plain PyTorch.

A multimodal diffusion transformer (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution
Image Synthesis", arXiv:2403.03206, Fig. 2): image patches and text tokens keep separate weights but attend
jointly; every block is modulated by adaLN-Zero from the timestep + pooled-text embedding. Variants:
- SD3 Medium: plain joint blocks;
- SD 3.5 Large: RMS-normalised queries and keys (`qk_norm="rms_norm"`);
- SD 3.5 Medium (MMDiT-X): the first blocks add a second, image-only self-attention (`dual_attention_layers`),
  and qk_norm.
The last block is "context pre-only": the text tokens only feed its attention and are not updated after it.

Module and parameter names mirror diffusers' `SD3Transformer2DModel` (models/transformers/transformer_sd3.py,
`JointTransformerBlock` in models/attention.py, `JointAttnProcessor2_0` in models/attention_processor.py,
`PatchEmbed` / `CombinedTimestepTextProjEmbeddings` in models/embeddings.py, `AdaLayerNormZero` /
`SD35AdaLayerNormZeroX` / `AdaLayerNormContinuous` / `RMSNorm` in models/normalization.py), so that its
`state_dict()` keys are exactly diffusers' and a diffusers `transformer/` folder loads with `strict=True`.
Attention goes through `F.scaled_dot_product_attention`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class MMDiTConfig:
    """What varies between SD3-family transformers. Field names follow diffusers' config.json; the translation
    to and from it, and the released models' values, live in sd3/configs.py."""

    num_layers: int = 24
    num_attention_heads: int = 24
    attention_head_dim: int = 64
    joint_attention_dim: int = 4096  # width of the text tokens fed in (T5-XXL; CLIP zero-padded to it)
    caption_projection_dim: int = 1536  # must equal the inner width heads * head_dim
    pooled_projection_dim: int = 2048  # CLIP-L 768 + CLIP-G 1280
    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    sample_size: int = 128  # latent size the positional-embedding grid is scaled to
    pos_embed_max_size: int = 192  # the positional-embedding grid is this many patches square
    dual_attention_layers: tuple[int, ...] = ()  # MMDiT-X blocks with the extra image self-attention
    qk_norm: str | None = None  # None or "rms_norm"

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (fractional) timesteps, as diffusers' Timesteps(flip_sin_to_cos=True)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def sincos_pos_embed(dim: int, grid: int, base_size: int) -> torch.Tensor:
    """2-D sin-cos positional embedding of a grid x grid patch lattice, row-major, (grid * grid, dim) in fp32:
    [sin | cos of the column | sin | cos of the row], positions scaled to a base_size grid (MAE / DiT)."""
    pos = torch.arange(grid, dtype=torch.float32) / (grid / base_size)  # fp32 positions, as diffusers
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    angles = torch.outer(pos.double(), omega)  # (grid, dim/4), fp64
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, dim/2)
    cols = emb[None, :, :].expand(grid, grid, -1)  # (row, col, dim/2): the column's embedding
    rows = emb[:, None, :].expand(grid, grid, -1)
    return torch.cat([cols, rows], dim=-1).reshape(grid * grid, dim).float()


def run(block: nn.Module, *args):
    """block(*args), recomputed in the backward pass when its `gradient_checkpointing` is on (and grads are)."""
    if block.gradient_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class RMSNorm(nn.Module):
    """RMS norm over the last dim (Zhang & Sennrich 2019) with a gain, computed as diffusers' RMSNorm: the mean
    square in fp32, the result cast to the gain's dtype when that is half precision."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class PatchEmbed(nn.Module):
    """Latents -> patch tokens plus the centre crop of a pos_embed_max_size^2 sin-cos grid (SD3's cropping, so any
    image up to that many patches square gets positions without interpolation)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.patch_size, self.max_size = cfg.patch_size, cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.inner_dim, cfg.patch_size, stride=cfg.patch_size)
        grid = sincos_pos_embed(cfg.inner_dim, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)
        self.register_buffer("pos_embed", grid[None])  # (1, max^2, D), persistent: checkpoints carry it

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"latent of {h}x{w} patches exceeds pos_embed_max_size {self.max_size}; "
                             f"use images of at most {self.max_size * self.patch_size * 8} px a side")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2  # off-centre by half a patch when odd
        grid = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)[:, top : top + h, left : left + w]
        return grid.reshape(1, h * w, -1)  # (1, hw, D)

    def forward(self, latents):
        b, c, height, width = latents.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {p}; "
                             f"use images whose sides are multiples of {p * 8} px")
        x = self.proj(latents).flatten(2).transpose(1, 2)  # (B, hw, D)
        return (x + self.cropped_pos_embed(height // p, width // p)).to(x.dtype)


class MLPEmbedding(nn.Module):
    """linear, SiLU, linear (diffusers' TimestepEmbedding and PixArtAlphaTextProjection(act_fn="silu"))."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """The conditioning vector of every modulation: MLP(sinusoidal timestep) + MLP(pooled CLIP text)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedding(256, dim)
        self.text_embedder = MLPEmbedding(pooled_dim, dim)

    def forward(self, timestep, pooled):
        t = self.timestep_embedder(timestep_embedding(timestep).to(pooled.dtype))  # (B, D)
        return t + self.text_embedder(pooled)  # (B, D)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero (Peebles & Xie 2023): SiLU(c) -> `chunks` vectors (shift, scale, gate, ...); the first shift
    and scale modulate a parameter-free LayerNorm of x. 6 chunks (attention + MLP), 9 with MMDiT-X's attn2."""

    def __init__(self, dim: int, chunks: int = 6):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, x, temb):
        mods = self.linear(F.silu(temb)).chunk(self.chunks, dim=1)  # each (B, D)
        normed = F.layer_norm(x, x.shape[-1:], eps=1e-6)
        return normed, mods  # (shift, scale, gate, shift_mlp, scale_mlp, gate_mlp[, shift2, scale2, gate2])


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormContinuous(nn.Module):
    """Final-layer modulation: SiLU(c) -> (scale, shift) of a parameter-free LayerNorm (diffusers' chunk order;
    SAI's checkpoints store (shift, scale), see sd3/sai.py)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale)


class Attention(nn.Module):
    """Multi-head attention of the image tokens (to_q/k/v, to_out) and, when `joint`, of the text tokens too
    (add_q/k/v_proj, to_add_out unless pre-only), both streams concatenated into one softmax: image first."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None, joint: bool, pre_only: bool):
        super().__init__()
        self.heads = heads
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"qk_norm {qk_norm!r} is not supported; SD3 uses None, SD 3.5 'rms_norm'")
        inner = heads * head_dim
        # registered in diffusers' order, so that state_dict() lists the keys as diffusers does
        self.norm_q = RMSNorm(head_dim) if qk_norm else None
        self.norm_k = RMSNorm(head_dim) if qk_norm else None
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        if joint:
            self.add_k_proj, self.add_v_proj, self.add_q_proj = (nn.Linear(dim, inner), nn.Linear(dim, inner),
                                                                 nn.Linear(dim, inner))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.to_add_out = nn.Linear(inner, dim) if joint and not pre_only else None
        self.norm_added_q = RMSNorm(head_dim) if qk_norm and joint else None
        self.norm_added_k = RMSNorm(head_dim) if qk_norm and joint else None

    def heads_of(self, x, linear, norm):
        b, n, _ = x.shape
        x = linear(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, h, N, d)
        return x if norm is None else norm(x)

    def forward(self, x, context=None):
        n = x.shape[1]
        q = self.heads_of(x, self.to_q, self.norm_q)
        k = self.heads_of(x, self.to_k, self.norm_k)
        v = self.heads_of(x, self.to_v, None)
        if context is not None:  # joint attention: text tokens appended after the image tokens
            q = torch.cat([q, self.heads_of(context, self.add_q_proj, self.norm_added_q)], dim=2)
            k = torch.cat([k, self.heads_of(context, self.add_k_proj, self.norm_added_k)], dim=2)
            v = torch.cat([v, self.heads_of(context, self.add_v_proj, None)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N + L, d)
        out = out.transpose(1, 2).flatten(2)  # (B, N + L, h * d)
        x_out = self.to_out[0](out[:, :n])
        if context is None:
            return x_out
        c_out = out[:, n:]
        return x_out, (c_out if self.to_add_out is None else self.to_add_out(c_out))


class GELUProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear to 4x, tanh-GELU, linear back (diffusers' FeedForward(activation_fn="gelu-approximate"))."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class JointTransformerBlock(nn.Module):
    """One MMDiT block: modulated joint attention of image and text tokens, then a modulated MLP per stream;
    MMDiT-X adds an image-only self-attention (attn2) with its own modulation; a pre-only block leaves the text
    after its attention (no text output)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None, pre_only: bool, dual: bool):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        self.norm1 = AdaLayerNormZero(dim, 9 if dual else 6)
        self.norm1_context = AdaLayerNormContinuous(dim) if pre_only else AdaLayerNormZero(dim, 6)
        self.attn = Attention(dim, heads, head_dim, qk_norm, joint=True, pre_only=pre_only)
        self.attn2 = Attention(dim, heads, head_dim, qk_norm, joint=False, pre_only=False) if dual else None
        self.ff = FeedForward(dim)
        self.ff_context = None if pre_only else FeedForward(dim)
        self.gradient_checkpointing = False

    def forward(self, x, context, temb):
        """x (B, N, D) image tokens, context (B, L, D) text tokens, temb (B, D) -> (x, context or None)."""
        # 1. modulation vectors of both streams
        normed, mods = self.norm1(x, temb)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        if self.pre_only:  # the text only feeds this block's attention
            c_in = self.norm1_context(context, temb)
        else:
            c_normed, c_mods = self.norm1_context(context, temb)
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods
            c_in = modulate(c_normed, c_shift, c_scale)

        # 2. joint attention, gated residuals
        x_attn, c_attn = self.attn(modulate(normed, shift, scale), c_in)
        x = x + gate[:, None] * x_attn
        if self.dual:  # 2b. MMDiT-X: image-only self-attention on its own modulation of the same norm
            shift2, scale2, gate2 = mods[6:]
            x = x + gate2[:, None] * self.attn2(modulate(normed, shift2, scale2))

        # 3. image MLP
        x_mlp = modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * self.ff(x_mlp)
        if self.pre_only:
            return x, None

        # 4. text: attention residual and MLP
        context = context + c_gate[:, None] * c_attn
        c_mlp = modulate(F.layer_norm(context, context.shape[-1:], eps=1e-6), c_shift_mlp, c_scale_mlp)
        return x, context + c_gate_mlp[:, None] * self.ff_context(c_mlp)


BLOCKS = (JointTransformerBlock,)  # what regional compilation (--compile) compiles one by one


class SD3Transformer(nn.Module):
    """Velocity-prediction MMDiT: (noisy latents, text tokens, pooled text, timestep) -> prediction."""

    def __init__(self, cfg: MMDiTConfig = MMDiTConfig()):
        super().__init__()
        if cfg.caption_projection_dim != cfg.inner_dim:
            raise ValueError(f"caption_projection_dim {cfg.caption_projection_dim} must equal num_attention_heads * "
                             f"attention_head_dim = {cfg.inner_dim} (every SD3 model has it so)")
        self.config = cfg
        d = cfg.inner_dim
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = TimeTextEmbedding(d, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([
            JointTransformerBlock(d, cfg.num_attention_heads, cfg.attention_head_dim, cfg.qk_norm,
                                  pre_only=i == cfg.num_layers - 1, dual=i in cfg.dual_attention_layers)
            for i in range(cfg.num_layers)
        ])
        self.norm_out = AdaLayerNormContinuous(d)
        self.proj_out = nn.Linear(d, cfg.patch_size**2 * cfg.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks, in order (what gradient checkpointing and regional compilation act on)."""
        return list(self.transformer_blocks)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each joint block in the backward pass (use_reentrant=False)."""
        for block in self.transformer_blocks:
            block.gradient_checkpointing = enabled

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        """hidden_states (B, C, H, W) latents; encoder_hidden_states (B, L, joint_attention_dim) text tokens
        (CLIP-L|G zero-padded, then T5); pooled_projections (B, pooled_dim); timestep (B,) or scalar, in diffusers'
        units sigma * 1000 (float). Returns the prediction (B, C, H, W), the velocity noise - x0 for SD3."""
        # 1. tokens: patches + positions, text projected to the inner width, conditioning vector
        b, _, height, width = hidden_states.shape
        p, c_out = self.config.patch_size, self.config.out_channels
        t = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(b)
        x = self.pos_embed(hidden_states)  # (B, hw, D)
        temb = self.time_text_embed(t, pooled_projections)  # (B, D)
        context = self.context_embedder(encoder_hidden_states)  # (B, L, D)

        # 2. joint blocks (the last one leaves context None)
        for block in self.transformer_blocks:
            x, context = run(block, x, context, temb)

        # 3. final modulation and projection to patches
        x = self.proj_out(self.norm_out(x, temb))  # (B, hw, p * p * C)

        # 4. unpatchify: (B, h, w, p, q, C) -> (B, C, h, p, w, q)
        h, w = height // p, width // p
        x = x.reshape(b, h, w, p, p, c_out).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c_out, h * p, w * p)  # (B, C, H, W)
