"""Benchmark: one optimizer step of our LoRA training vs the same step on diffusers' UNet + a peft LoRA.

Our side: `SDXLUNet` with our `LoRALayer`s (lora/layer.py). Reference: diffusers' `UNet2DConditionModel`
with `add_adapter(peft.LoraConfig(...))` on the same target modules, trainable params cast to fp32 as
diffusers' train_text_to_image_lora_sdxl.py does. Both: the same base weights (shared tensors), the same
LoRA A/B values, batch, noise and timesteps; the loss of training/loop/loss.py `diffusion_loss` under
autocast over the --precision base weights; backward; clip; AdamW step. Prints a table with the ratio
ours/diffusers (below 1 = we are faster / smaller) and the first step's loss of each (equal in fp32).
Time: ms per optimizer step, the best of --rounds rounds of --steps steps; each round runs the models in turn,
so load from other jobs hits them alike. With --compile two more sides, our UNet with its blocks compiled (on
the same base tensors, its own LoRA with the same values) and diffusers' UNet + peft compiled the same way (each
ResNet and transformer block), are timed too; their first steps (compilation) are reported on their own line,
never in the table.
Memory: on CUDA the peak allocated during the steps; on CPU the bytes of activations saved for the
backward pass (distinct storages), the part of training memory the model code decides.

    python benchmarks/bench_train.py                                      # tiny config, CPU, fp32, 128px, batch 4
    python benchmarks/bench_train.py --full --precision bf16 --resolution 1024 --gradient_checkpointing --device cuda
    python benchmarks/bench_train.py --smoke                              # 64 px, one round: checks it runs
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import (  # noqa: E402,I001
    SavedBytes, add_speed_flags, alternate, compile_peer, compile_unet, device_name, seconds, set_up, sync)

from common.runtime import DTYPES  # noqa: E402
from sdxl.configs import unet_config_to_diffusers  # noqa: E402
from diffusion.ddpm import DDPMObjective, alphas_cumprod  # noqa: E402
from lora.layer import LoRAConfig  # noqa: E402
from sdxl.lora import apply_lora  # noqa: E402
from sdxl.tiny import TINY_UNET_CONFIG  # noqa: E402
from sdxl.unet import SDXL_CONFIG, SDXLUNet, UNetConfig  # noqa: E402
from training.loop.loss import diffusion_loss  # noqa: E402

SMOKE = ["--resolution", "64", "--batch_size", "1", "--steps", "1", "--rounds", "1", "--warmup", "1"]


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
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (at least 1)")
    p.add_argument("--smoke", action="store_true", help=f"tiny settings to check it runs: {' '.join(SMOKE)}")
    add_speed_flags(p)
    args = p.parse_args(argv)
    if args.smoke:
        args = p.parse_args([*SMOKE, *(argv if argv is not None else sys.argv[1:])])
    args.warmup = max(args.warmup, 1)
    return args


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


def diffusers_unet(cfg: UNetConfig, device) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith("_")})


def add_peft_lora(ref, names: list[str], values: dict[str, torch.Tensor], args) -> None:
    """A peft LoRA on `names`, trainable params in fp32 (as diffusers' LoRA example), A/B set to `values`
    (our `<name>.lora_down.weight` / `.lora_up.weight`)."""
    from peft import LoraConfig

    ref.requires_grad_(False)
    ref.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=names))
    for p in ref.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    modules = dict(ref.named_modules())
    for name in names:
        modules[name].lora_A["default"].weight.data.copy_(values[f"{name}.lora_down.weight"])
        modules[name].lora_B["default"].weight.data.copy_(values[f"{name}.lora_up.weight"])


def build(cfg: UNetConfig, args, device, dtype) -> dict[str, torch.nn.Module]:
    """diffusers UNet + peft LoRA and our UNet + our LoRA, and with --compile a second of each with its blocks
    compiled: the same base tensors (made on the device), the same LoRA A/B values, each side its own LoRA."""
    from diffusers.utils import logging

    logging.set_verbosity_error()  # not the `to(dtype)` advice: the bench casts on purpose
    torch.manual_seed(0)
    ref = diffusers_unet(cfg, device).to(dtype=dtype).train()
    base = ref.state_dict()
    ours = {}
    for name in ["ours", "ours compiled"] if args.compile else ["ours"]:
        with torch.device("meta"):
            unet = SDXLUNet(cfg)
        unet.load_state_dict(base, strict=True, assign=True)  # the very same tensors
        wrapped = apply_lora(unet, LoRAConfig(rank=args.rank, alpha=args.rank, target_mode=args.target_mode))
        ours[name] = unet.train()
    lora = {k: v for k, v in ours["ours"].state_dict().items() if ".lora_" in k}
    for unet in ours.values():
        unet.load_state_dict(lora, strict=False)  # the same LoRA values everywhere
    peers = {"diffusers+peft": ref}
    if args.compile:
        peers["diffusers+peft compiled"] = diffusers_unet(cfg, "meta")
        peers["diffusers+peft compiled"].load_state_dict(base, strict=True, assign=True)
        peers["diffusers+peft compiled"].train()
    for peer in peers.values():
        add_peft_lora(peer, list(wrapped), lora, args)
    if args.gradient_checkpointing:
        for peer in peers.values():
            peer.enable_gradient_checkpointing()
        for unet in ours.values():
            unet.set_gradient_checkpointing(True)
    if args.compile:
        compile_unet(ours["ours compiled"])
        compile_peer(peers["diffusers+peft compiled"])
    models = {"diffusers+peft": DiffusersCall(ref), "ours": ours["ours"]}
    if args.compile:
        models |= {"diffusers+peft compiled": DiffusersCall(peers["diffusers+peft compiled"]),
                   "ours compiled": ours["ours compiled"]}
    return models


class Side:
    """One model's training step: diffusion_loss, backward, clip, AdamW step (as training/loop/train.py)."""

    def __init__(self, name, unet, x, device, dtype):
        self.name, self.x, self.dtype = name, x, dtype
        self.params = [p for p in unet.parameters() if p.requires_grad]
        # fused on CUDA, as the loop: one kernel for all LoRA tensors, no per-tensor launches
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-2, fused=device.type == "cuda")
        self.unet, self.objective = unet, DDPMObjective(alphas_cumprod().to(device))
        self.losses = []

    def loss(self):
        x = self.x
        cond = {"text_embeds": x["pooled"], "time_ids": x["time_ids"]}
        return diffusion_loss(lambda x_t, t: self.unet(x_t, t, x["embeds"], cond), self.objective, x["x0"], x["t"],
                              x["noise"], autocast_dtype=self.dtype).mean()

    def step(self):
        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.detach())  # stays on the device, as in the loop (read at --log_interval)


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


def bench(sides, device, args) -> tuple[list[dict], dict]:
    """Warm each up (its first step timed: compilation; both optimizer states then exist), memory of each,
    then timing rounds that alternate the models; each model's time is its best round."""
    first = {}
    for side in sides:
        first[side.name] = seconds(side.step, device)
        for _ in range(args.warmup - 1):
            side.step()
    mem = [memory(side, device) for side in sides]
    times = alternate({s.name: s.step for s in sides}, device, args.rounds, args.steps)
    rows = [{"model": s.name, "step_ms": min(times[s.name]) * 1000, "mem": m, "loss": s.losses[0].item(),
             "params": sum(p.numel() for p in s.params)} for s, m in zip(sides, mem, strict=True)]
    return rows, first


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.precision]
    set_up(args.threads, device)
    cfg = SDXL_CONFIG if args.full else TINY_UNET_CONFIG
    models = build(cfg, args, device, dtype)
    x = make_batch(cfg, args, device)
    rows, first = bench([Side(name, m, x, device, dtype) for name, m in models.items()], device, args)

    mem_label = "peak MiB" if device.type == "cuda" else "saved-act MiB"
    print(f"# train step, {'SDXL' if args.full else 'tiny'}, {args.precision}, {args.resolution}px, "
          f"batch {args.batch_size}, LoRA {args.target_mode} rank {args.rank}, checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {device_name(device)}, torch {torch.__version__}")
    print(f"| model | ms / optimizer step | {mem_label} | LoRA params | first loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['step_ms']:.1f} | {r['mem'] / 2**20:.1f} | {r['params']:,} | {r['loss']:.6f} |")
    by_name = {r["model"]: r for r in rows}
    pairs = [("ours", "diffusers+peft")]
    if args.compile:
        pairs += [("ours compiled", "diffusers+peft"), ("diffusers+peft compiled", "diffusers+peft"),
                  ("ours compiled", "diffusers+peft compiled")]
    for a, b in pairs:
        print(f"| ratio {a} / {b} | {by_name[a]['step_ms'] / by_name[b]['step_ms']:.3f} | "
              f"{by_name[a]['mem'] / by_name[b]['mem']:.3f} | | |")
    if args.compile:
        print(f"compile (first step, not in the table): ours {first['ours compiled']:.1f} s, diffusers+peft "
              f"{first['diffusers+peft compiled']:.1f} s (eager first steps {first['ours']:.1f} s, "
              f"{first['diffusers+peft']:.1f} s)")


if __name__ == "__main__":
    main()
