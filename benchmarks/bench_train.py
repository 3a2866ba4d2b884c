"""Benchmark: one optimizer step of our LoRA training vs the same step on diffusers' UNet + a peft LoRA.

Our side: `SDXLUNet` with our `LoRALinear`s (sdxl/lora.py). Reference: diffusers' `UNet2DConditionModel`
with `add_adapter(peft.LoraConfig(...))` on the same target modules, trainable params cast to fp32 as
diffusers' train_text_to_image_lora_sdxl.py does. Both: the same base weights (shared tensors), the same
LoRA A/B values, batch, noise and timesteps; the loss of training/loss.py `diffusion_loss` under
autocast over the --precision base weights; backward; clip; AdamW step. Prints a table with the ratio
ours/diffusers (below 1 = we are faster / smaller) and the first step's loss of each (equal in fp32).
Time: ms per optimizer step, the best of --rounds rounds of --steps steps that alternate the two models.
Memory: on CUDA the peak allocated during the steps; on CPU the bytes of activations saved for the
backward pass (distinct storages), the part of training memory the model code decides.

    python benchmarks/bench_train.py                                      # tiny config, CPU, fp32, 128px, batch 4
    python benchmarks/bench_train.py --full --precision bf16 --resolution 1024 --gradient_checkpointing --device cuda
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_unet import SavedBytes, sync  # noqa: E402

from common.runtime import DTYPES  # noqa: E402
from sdxl.configs import unet_config_to_diffusers  # noqa: E402
from sdxl.diffusion import alphas_cumprod  # noqa: E402
from sdxl.lora import LoRAConfig, apply_lora  # noqa: E402
from sdxl.tiny import TINY_UNET_CONFIG  # noqa: E402
from sdxl.unet import SDXL_CONFIG, SDXLUNet, UNetConfig  # noqa: E402
from training.loss import diffusion_loss  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="full SDXL base config with random weights (default: tiny)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="base weights dtype and autocast dtype; LoRA params stay fp32")
    p.add_argument("--image_size", "--resolution", dest="resolution", metavar="PX", type=int, default=128,
                   help="image side in pixels (latent side = resolution/8)")
    p.add_argument("--batch_size", type=int, default=4, help="images per optimizer step")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    p.add_argument("--target_mode", choices=["attention", "attention_out", "all"], default="attention_out",
                   help="which Linear layers get a LoRA, as --lora_target_mode of train_sdxl.py")
    p.add_argument("--gradient_checkpointing", action="store_true", help="enable it in both models")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per model and round")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds, alternating the models; best round counts")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    return p.parse_args(argv)


def make_batch(cfg: UNetConfig, args, device):
    """What the loop feeds `diffusion_loss`: fp32 latents and noise, text embeddings, time ids, timesteps."""
    g = torch.Generator().manual_seed(0)
    b, s, r = args.batch_size, args.resolution // 8, args.resolution
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    x = {
        "x0": torch.randn(b, cfg.in_channels, s, s, generator=g),  # (B, 4, H/8, W/8)
        "noise": torch.randn(b, cfg.in_channels, s, s, generator=g),
        "embeds": torch.randn(b, 77, cfg.cross_attention_dim, generator=g),  # (B, 77, 2048)
        "pooled": torch.randn(b, pooled, generator=g),  # (B, 1280)
        "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * b, dtype=torch.float32),  # (B, 6)
        "t": torch.randint(0, 1000, (b,), generator=g),
    }
    return {k: v.to(device) for k, v in x.items()}


class DiffusersCall(torch.nn.Module):
    """diffusers' UNet called like ours: (sample, t, context, added_cond_kwargs) -> prediction."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, t, context, cond):
        return self.unet(sample, t, context, added_cond_kwargs=cond).sample


def build(cfg: UNetConfig, args, device, dtype):
    """(diffusers UNet + peft LoRA, our UNet + our LoRA): same base tensors, same A/B values."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging
    from peft import LoraConfig

    logging.set_verbosity_error()  # not the `to(dtype)` advice: the bench casts on purpose
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith("_")})
    ref = ref.to(device=device, dtype=dtype).train()
    with torch.device("meta"):
        ours = SDXLUNet(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # the very same tensors
    wrapped = apply_lora(ours, LoRAConfig(rank=args.rank, alpha=args.rank, target_mode=args.target_mode))
    ours.train()

    ref.requires_grad_(False)
    ref.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(wrapped)))
    for p in ref.parameters():  # fp32 trainable params over a bf16 base, as diffusers' LoRA example
        if p.requires_grad:
            p.data = p.data.float()
    ref_modules = dict(ref.named_modules())
    for name, m in wrapped.items():
        ref_modules[name].lora_A["default"].weight.data.copy_(m.lora_down.weight)
        ref_modules[name].lora_B["default"].weight.data.copy_(m.lora_up.weight)
    if args.gradient_checkpointing:
        ref.enable_gradient_checkpointing()
        ours.set_gradient_checkpointing(True)
    return DiffusersCall(ref), ours


class Side:
    """One model's training step: diffusion_loss, backward, clip, AdamW step (as training/train_loop.py)."""

    def __init__(self, name, unet, x, device, dtype):
        self.name, self.x, self.dtype = name, x, dtype
        self.params = [p for p in unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-2)
        self.unet, self.ac = unet, alphas_cumprod().to(device)
        self.losses, self.times_ms = [], []

    def loss(self):
        x = self.x
        return diffusion_loss(self.unet, x["x0"], x["embeds"], x["pooled"], x["time_ids"], x["t"], x["noise"],
                              alphas_cumprod=self.ac, autocast_dtype=self.dtype).mean()

    def step(self):
        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())  # the loop reads the loss every step too


def memory(side, device):
    """CUDA: peak allocated during one step. CPU: bytes autograd saves for backward in one forward."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        side.step()
        sync(device)
        return torch.cuda.max_memory_allocated()
    counter = SavedBytes()
    with counter:
        loss = side.loss()
    del loss
    return counter.nbytes


def timed(side, device, steps):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        side.step()
    sync(device)
    side.times_ms.append((time.perf_counter() - t0) / steps * 1000)


def bench(sides, device, args):
    """Warm both up (so both optimizer states exist), memory of each, then timing rounds that alternate
    the two models; each model's time is its best round (robust to other load on a shared machine)."""
    for side in sides:
        for _ in range(args.warmup):
            side.step()
    mem = [memory(side, device) for side in sides]
    for _ in range(args.rounds):
        for side in sides:
            timed(side, device, args.steps)
    return [{"model": s.name, "step_ms": min(s.times_ms), "mem": m, "loss": s.losses[0],
             "params": sum(p.numel() for p in s.params)} for s, m in zip(sides, mem, strict=True)]


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.precision]
    cfg = SDXL_CONFIG if args.full else TINY_UNET_CONFIG
    ref, ours = build(cfg, args, device, dtype)
    x = make_batch(cfg, args, device)
    rows = bench([Side("diffusers+peft", ref, x, device, dtype), Side("ours", ours, x, device, dtype)], device, args)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    mem_label = "peak MiB" if device.type == "cuda" else "saved-act MiB"
    print(f"# train step, {'SDXL' if args.full else 'tiny'}, {args.precision}, {args.resolution}px, "
          f"batch {args.batch_size}, LoRA {args.target_mode} rank {args.rank}, checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {dev_name}, torch {torch.__version__}")
    print(f"| model | ms / optimizer step | {mem_label} | LoRA params | first loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['step_ms']:.1f} | {r['mem'] / 2**20:.1f} | {r['params']:,} | {r['loss']:.6f} |")
    a, b = rows[1], rows[0]
    print(f"| ratio ours/diffusers | {a['step_ms'] / b['step_ms']:.3f} | {a['mem'] / b['mem']:.3f} | | |")


if __name__ == "__main__":
    main()
