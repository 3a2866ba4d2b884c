"""The FLUX.1 transformer (dev and schnell), written out in plain PyTorch.

A rectified-flow transformer over packed latent tokens (2x2 patches of the 16-channel VAE latent, 64 values
each) and T5 text tokens: 19 double-stream blocks (separate weights for the image and text streams, one joint
attention over both, qk RMSNorm), then 38 single-stream blocks over the concatenated sequence (attention and
MLP in parallel from one modulated input), 3-axis rotary position embeddings, and a conditioning vector from
the timestep, the pooled CLIP-L embedding and (dev only) the distilled guidance scale that modulates every block.

The layout follows Black Forest Labs' reference (github.com/black-forest-labs/flux, `model.py` and
`modules/layers.py`); the module names follow diffusers' `FluxTransformer2DModel`
(diffusers/models/transformers/transformer_flux.py), so `state_dict()` keys are exactly diffusers' and a diffusers
`transformer/` folder loads with `strict=True`. Single files in BFL's own names are renamed by flux/bfl.py.
Attention goes through `F.scaled_dot_product_attention`.

Reference: Black Forest Labs 2024, "FLUX.1"; Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis" (MM-DiT, arXiv:2403.03206).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class FluxConfig:
    """What varies between FLUX-shaped transformers. Field names follow diffusers' config; the translation to and
    from a diffusers `config.json`, and the configs of FLUX.1-dev/schnell, live in flux/configs.py."""

    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38  # single-stream blocks
    num_attention_heads: int = 24
    attention_head_dim: int = 128  # = sum(axes_dims_rope)
    joint_attention_dim: int = 4096  # T5-XXL width
    pooled_projection_dim: int = 768  # CLIP-L pooled width
    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 64
    guidance_embeds: bool = True  # dev: guidance-distilled; schnell: False
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)  # rotary channels per id axis (unused, height, width)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


ROPE_THETA = 10000.0
TIME_CHANNELS = 256  # sinusoidal width of the timestep and guidance embeddings


def run(block: nn.Module, *args):
    """block(*args), recomputed in the backward pass when its `gradient_checkpointing` is on (and grads are)."""
    if block.gradient_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


# ---------------------------------------------------------------------------------------------------
# Conditioning: timestep, guidance and pooled text -> one vector per sample


def timestep_embedding(t: torch.Tensor, dim: int = TIME_CHANNELS, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (fractional) timesteps (diffusers' Timesteps, flip_sin_to_cos, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class MLPEmbedder(nn.Module):
    """Linear, SiLU, Linear (diffusers' TimestepEmbedding and PixArtAlphaTextProjection(act_fn="silu"); BFL's
    MLPEmbedder in_layer/out_layer)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """temb = MLP(sin(1000 t)) [+ MLP(sin(1000 g)) for dev] + MLP(pooled CLIP) (diffusers'
    CombinedTimestep(Guidance)TextProjEmbeddings)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIME_CHANNELS, dim)
        self.guidance_embedder = MLPEmbedder(TIME_CHANNELS, dim) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, t, guidance, pooled):
        temb = self.timestep_embedder(timestep_embedding(t).to(pooled.dtype))  # (B, D)
        if self.guidance_embedder is not None:
            temb = temb + self.guidance_embedder(timestep_embedding(guidance).to(pooled.dtype))
        return temb + self.text_embedder(pooled)  # (B, D)


class Modulation(nn.Module):
    """silu(temb) -> n vectors (shift, scale, gate, ...), each (B, 1, D) (BFL's Modulation; diffusers'
    AdaLayerNormZero(.linear) with n=6, AdaLayerNormZeroSingle with n=3)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb):
        return self.linear(F.silu(temb))[:, None].chunk(self.n, dim=-1)


def modulate(x, shift, scale):
    """LayerNorm without affine weights, then the adaptive scale and shift (adaLN)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------------
# Rotary position embedding over 3 id axes


def rope(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (S, head_dim/2) of the rotation angles of S tokens with ids (S, n_axes): axis i owns
    axes_dims[i] channels, i.e. axes_dims[i]/2 frequencies theta^(-2j/axes_dims[i]). Angles in float64 (as BFL and
    diffusers compute them; MPS has no float64)."""
    dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    angles = []
    for i, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim)  # (dim/2,)
        angles.append(ids[:, i].to(dtype)[:, None] * freqs[None])  # (S, dim/2)
    angles = torch.cat(angles, dim=-1)  # (S, head_dim/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of x (B, H, S, head_dim) by angle j of each token, in fp32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, S, head_dim/2) each
    out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (B, H, S, head_dim/2, 2)
    return out.flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Attention and the two kinds of block


class Attention(nn.Module):
    """q, k, v projections with RMSNorm on q and k per head (diffusers' FluxAttention); with `context`, a second
    set of projections for the text stream (add_*_proj, norm_added_*, to_add_out) joins the same attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, context: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)
        self.to_q = nn.Linear(dim, heads * head_dim)
        self.to_k = nn.Linear(dim, heads * head_dim)
        self.to_v = nn.Linear(dim, heads * head_dim)
        if context:  # double-stream block: output projections for both streams
            self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim), nn.Dropout(0.0)])
            self.norm_added_q = nn.RMSNorm(head_dim, eps=1e-6)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6)
            self.add_q_proj = nn.Linear(dim, heads * head_dim)
            self.add_k_proj = nn.Linear(dim, heads * head_dim)
            self.add_v_proj = nn.Linear(dim, heads * head_dim)
            self.to_add_out = nn.Linear(heads * head_dim, dim)

    def qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        """Projected, per-head, normalised q and k, and v: each (B, H, S, head_dim)."""
        q, k, v = (f(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2) for f in (to_q, to_k, to_v))
        return norm_q(q), norm_k(k), v

    def attend(self, q, k, v, pe):
        """Rotary embedding on q and k, attention, heads merged: (B, S, H * head_dim)."""
        q, k = apply_rope(q, *pe), apply_rope(k, *pe)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own modulation, projections and MLPs, attending jointly over
    [text, image] (BFL's DoubleStreamBlock; diffusers' FluxTransformerBlock)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = Modulation(dim, 6)  # image: shift, scale, gate for attention, then for the MLP
        self.norm1_context = Modulation(dim, 6)  # text: the same
        self.attn = Attention(dim, heads, head_dim, context=True)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)
        self.gradient_checkpointing = False

    def forward(self, x, txt, temb, pe):
        """x (B, N, D) image tokens, txt (B, L, D) text tokens, temb (B, D), pe: rope of [text, image].
        Returns (txt, x)."""
        a = self.attn
        # 1. modulated inputs -> q, k, v of both streams, text first
        shift, scale, gate, shift2, scale2, gate2 = self.norm1(temb)  # each (B, 1, D)
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = self.norm1_context(temb)
        q, k, v = a.qkv(modulate(x, shift, scale), a.to_q, a.to_k, a.to_v, a.norm_q, a.norm_k)
        cq, ck, cv = a.qkv(modulate(txt, c_shift, c_scale), a.add_q_proj, a.add_k_proj, a.add_v_proj,
                           a.norm_added_q, a.norm_added_k)
        # 2. joint attention over [text, image], split back
        out = a.attend(torch.cat([cq, q], dim=2), torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2), pe)
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]  # (B, L, HD), (B, N, HD)
        # 3. image stream: gated attention and MLP residuals
        x = x + gate * a.to_out[0](img_out.contiguous())
        x = x + gate2 * self.ff(modulate(x, shift2, scale2))
        # 4. text stream: the same with its own weights
        txt = txt + c_gate * a.to_add_out(txt_out.contiguous())
        txt = txt + c_gate2 * self.ff_context(modulate(txt, c_shift2, c_scale2))
        if txt.dtype == torch.float16:  # as diffusers: keep fp16 text activations finite
            txt = txt.clip(-65504, 65504)
        return txt, x


class GELU(nn.Module):
    """Linear then tanh-approximated GELU (diffusers' GELU(approximate="tanh"), the `net.0.proj` of FeedForward)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class SingleStreamBlock(nn.Module):
    """One stream over [text, image]: from one modulated input, attention and an MLP in parallel, their outputs
    concatenated into one output projection (BFL's SingleStreamBlock with fused linear1/linear2; diffusers'
    FluxSingleTransformerBlock names the parts)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm = Modulation(dim, 3)  # shift, scale, gate
        self.proj_mlp = nn.Linear(dim, int(dim * mlp_ratio))
        self.proj_out = nn.Linear(dim + int(dim * mlp_ratio), dim)
        self.attn = Attention(dim, heads, head_dim, context=False)
        self.gradient_checkpointing = False

    def forward(self, x, temb, pe):
        """x (B, L + N, D) the joint sequence, temb (B, D), pe: its rope. Returns the new joint sequence."""
        a = self.attn
        shift, scale, gate = self.norm(temb)  # each (B, 1, D)
        h = modulate(x, shift, scale)  # (B, S, D)
        attn = a.attend(*a.qkv(h, a.to_q, a.to_k, a.to_v, a.norm_q, a.norm_k), pe)  # (B, S, D)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")  # (B, S, 4D)
        x = x + gate * self.proj_out(torch.cat([attn, mlp], dim=2))
        if x.dtype == torch.float16:  # as diffusers
            x = x.clip(-65504, 65504)
        return x


BLOCKS = (DoubleStreamBlock, SingleStreamBlock)  # what --compile compiles one by one (regional compilation)


class FinalNorm(nn.Module):
    """adaLN before the output projection: (scale, shift) from the conditioning, no gate (diffusers'
    AdaLayerNormContinuous; BFL's LastLayer stores the halves as (shift, scale), see flux/bfl.py)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb).to(x.dtype))[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        return modulate(x, shift, scale)


class FluxTransformer(nn.Module):
    """Velocity-prediction transformer: (packed noisy latents, T5 tokens, pooled CLIP, t in [0, 1], position ids,
    guidance) -> prediction for the packed latents."""

    def __init__(self, config: FluxConfig = FluxConfig()):
        super().__init__()
        if sum(config.axes_dims_rope) != config.attention_head_dim:
            raise ValueError(f"axes_dims_rope {config.axes_dims_rope} must sum to attention_head_dim "
                             f"{config.attention_head_dim}")
        self.config = config
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        self.time_text_embed = TimeTextEmbedding(dim, config.pooled_projection_dim, config.guidance_embeds)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [DoubleStreamBlock(dim, heads, head_dim) for _ in range(config.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [SingleStreamBlock(dim, heads, head_dim) for _ in range(config.num_single_layers)])
        self.norm_out = FinalNorm(dim)
        self.proj_out = nn.Linear(dim, config.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each double- and single-stream block in the backward pass (use_reentrant=False)."""
        for m in self.modules():
            if isinstance(m, BLOCKS):
                m.gradient_checkpointing = enabled

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        """hidden_states (B, N, 64) packed latents (`pack_latents`); encoder_hidden_states (B, L, 4096) T5;
        pooled_projections (B, 768) CLIP-L; timestep (B,) or scalar, the flow time sigma in [0, 1] (1 = noise);
        img_ids (N, 3) (`image_ids`), txt_ids (L, 3) (`text_ids`, zeros); guidance (B,) the guidance scale
        itself (e.g. 3.5) for dev, None for schnell. Returns the prediction (B, N, 64)."""
        b = hidden_states.shape[0]
        cfg = self.config
        if (guidance is None) == cfg.guidance_embeds:
            raise ValueError("this FLUX transformer " + ("is guidance-distilled (dev): pass guidance, e.g. a (B,) "
                             "tensor of 3.5" if cfg.guidance_embeds else "has no guidance embedding (schnell): "
                             "pass guidance=None"))
        # 1. tokens in, conditioning vector (time and guidance scaled by 1000 in the model's dtype, as diffusers)
        x = self.x_embedder(hidden_states)  # (B, N, D)
        t = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b).to(x.dtype) * 1000
        g = None if guidance is None else torch.as_tensor(guidance, device=x.device).reshape(-1).expand(b)
        g = None if g is None else g.to(x.dtype) * 1000
        temb = self.time_text_embed(t, g, pooled_projections)  # (B, D)
        txt = self.context_embedder(encoder_hidden_states)  # (B, L, D)

        # 2. rotary embedding of the joint sequence [text, image]
        pe = rope(torch.cat([txt_ids, img_ids], dim=0), cfg.axes_dims_rope)  # cos, sin: (L + N, head_dim/2)

        # 3. double-stream blocks
        for block in self.transformer_blocks:
            txt, x = run(block, x, txt, temb, pe)

        # 4. single-stream blocks over the concatenated sequence
        joint = torch.cat([txt, x], dim=1)  # (B, L + N, D)
        for block in self.single_transformer_blocks:
            joint = run(block, joint, temb, pe)
        x = joint[:, txt.shape[1] :]  # (B, N, D)

        # 5. out
        return self.proj_out(self.norm_out(x, temb))  # (B, N, 64)


# ---------------------------------------------------------------------------------------------------
# Latents <-> tokens (diffusers' FluxPipeline._pack_latents / _unpack_latents / _prepare_latent_image_ids)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) VAE latents (h, w even) -> (B, h/2 * w/2, 4C) tokens: each 2x2 patch, row-major, channels
    outermost (C, dy, dx)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} must be even to pack 2x2 patches (images a multiple of 16 px)")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents`: (B, h/2 * w/2, 4C) -> (B, C, h, w), h and w the latent size."""
    b, n, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids (h/2 * w/2, 3) of the packed tokens of an (h, w) latent: (0, row, column) per 2x2 patch."""
    rows = torch.arange(h // 2, device=device)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(dtype)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids (L, 3) of the text tokens: all zeros (FLUX.1 gives text no position; T5 encoded it)."""
    return torch.zeros(length, 3, device=device, dtype=dtype)
