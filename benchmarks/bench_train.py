"""Benchmark: one optimizer step of our LoRA training vs the same step on diffusers' model + a peft LoRA, for each
family (`--family sdxl|sd3|flux`).

Our side: our denoiser (SDXL's UNet, SD 3.5's MMDiT, FLUX.1's transformer) with our `LoRALayer`s (lora/layer.py)
on the family's targets (`lora_targets`, --target_mode). Reference: diffusers' `UNet2DConditionModel`,
`SD3Transformer2DModel` or `FluxTransformer2DModel` with `add_adapter(peft.LoraConfig(...))` on the same modules,
trainable params cast to fp32 as diffusers' LoRA examples do. Both: the same base weights (shared tensors), the same
LoRA A/B values, batch, noise and times; the family's objective (DDPM epsilon for SDXL, rectified flow for SD 3.5 and
FLUX.1, with the model's defaults) and its `predict` (SDXL's size conditioning, FLUX.1's packing, ids and training
guidance), the loss of training/loop/loss.py `diffusion_loss` under autocast over the --precision base weights;
backward; clip; AdamW step. Prints a table with the ratio ours/diffusers (below 1 = we are faster / smaller) and the
first step's loss of each (equal in fp32).
Time: ms per optimizer step, the best of --rounds rounds of --steps steps; each round runs the models in turn,
so load from other jobs hits them alike. With --compile two more sides, ours with its blocks compiled (on the same
base tensors, its own LoRA with the same values) and diffusers' + peft compiled the same way (harness.py
`PEER_BLOCKS`), are timed too; their first steps (compilation) are reported on their own line, never in the table.
Memory: on CUDA the peak allocated during one step (the shared base weights included); on CPU the bytes of
activations saved for the backward pass (distinct storages), the part of training memory the model code decides.
--full is the released model's config with random weights (SDXL base, SD 3.5 Medium, FLUX.1-dev: 2.6, 2.5 and 11.9 B
parameters), made on the device in the --precision dtype; nothing is downloaded.

    python benchmarks/bench_train.py                                      # tiny SDXL, CPU, fp32, 128px, batch 4
    python benchmarks/bench_train.py --full --precision bf16 --resolution 1024 --gradient_checkpointing --device cuda
    python benchmarks/bench_train.py --family sd3 --full --precision bf16 --resolution 1024 --device cuda
    python benchmarks/bench_train.py --family flux --full --precision bf16 --resolution 1024 --batch_size 1 \
        --gradient_checkpointing --device cuda                            # FLUX.1-dev: 23.8 GB of bf16 weights
    python benchmarks/bench_train.py --family flux --full --precision bf16 --resolution 1024 --batch_size 1 \
        --gradient_checkpointing --device cuda --base_fp8                 # and ours over an fp8-stored base
    python benchmarks/bench_train.py --family flux --smoke                # 64 px, one round: checks it runs
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from denoisers import SPECS, PeerCall, ours_on, peer_model  # noqa: E402,I001
from harness import (  # noqa: E402,I001
    SavedBytes, add_speed_flags, alternate, compile_peer, compile_unet, device_name, seconds, set_up, sync)

import families  # noqa: E402
from common.runtime import DTYPES  # noqa: E402
from lora.base_weights import FP8, store_linears, stored_bytes  # noqa: E402
from lora.layer import LoRAConfig, add_lora  # noqa: E402
from training.flags import NoiseSettings  # noqa: E402
from training.loop.loss import diffusion_loss, weighted  # noqa: E402

SMOKE = ["--resolution", "64", "--batch_size", "1", "--steps", "1", "--rounds", "1", "--warmup", "1"]
RANDOM = "<random weights>"  # a model no loader reads: a family's flag_defaults then give its main model's defaults
MODES = sorted({m for name in SPECS for m in families.get(name).LORA_MODES})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=list(SPECS), default="sdxl",
                   help="which denoiser: sdxl (UNet), sd3 (SD 3.5 MMDiT), flux (FLUX.1 transformer)")
    p.add_argument("--full", action="store_true",
                   help="the released model's config (SDXL base, SD 3.5 Medium, FLUX.1-dev) with random weights "
                        "(default: the family's tiny config)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="base weights dtype and autocast dtype; LoRA params stay fp32")
    p.add_argument("--image_size", "--resolution", dest="resolution", metavar="PX", type=int, default=128,
                   help="image side in pixels (latent side = resolution/8; a multiple of 16 for sd3 and flux)")
    p.add_argument("--batch_size", type=int, default=4, help="images per optimizer step")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank)")
    p.add_argument("--target_mode", choices=MODES, default=None,
                   help="which Linear layers get a LoRA, as --lora_target_mode of the trainers (default: the "
                        "family's: SDXL attention_out, SD 3.5 and FLUX.1 attention)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="enable it in both models")
    p.add_argument("--base_fp8", action="store_true",
                   help="one more side: ours with its blocks' Linear weights stored in fp8 and cast up per layer "
                        "(the trainers' --base_dtype fp8), from the same base weights; prints the stored bytes")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per model and round")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds, alternating the models; best round counts")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (at least 1)")
    p.add_argument("--smoke", action="store_true", help=f"tiny settings to check it runs: {' '.join(SMOKE)}")
    add_speed_flags(p)
    args = p.parse_args(argv)
    if args.smoke:
        args = p.parse_args([*SMOKE, *(argv if argv is not None else sys.argv[1:])])
    args.warmup = max(args.warmup, 1)
    family = families.get(args.family)
    args.target_mode = args.target_mode or family.flag_defaults(RANDOM)["lora_target_mode"]
    if args.target_mode not in family.LORA_MODES:
        p.error(f"--target_mode {args.target_mode} is not one of {family.TITLE}'s: {', '.join(family.LORA_MODES)}")
    if args.family != "sdxl" and args.resolution % 16:
        p.error(f"--resolution {args.resolution}: {family.TITLE} patches 2x2 latents; give a multiple of 16")
    return args


def objective(family, device):
    """The family's training objective with its main model's defaults (SDXL: DDPM epsilon, uniform times; SD 3.5:
    flow, logit-normal times shifted by 3; FLUX.1-dev: flow, flux_shift times, guidance 1), its tensors on `device`."""
    d = family.flag_defaults(RANDOM)
    noise = NoiseSettings(prediction_type=d["prediction_type"], timestep_sampling=d["timestep_sampling"],
                          flow_shift=d.get("flow_shift"))
    obj = family.objective(noise, None)
    moved = {f.name: getattr(obj, f.name).to(device) for f in dataclasses.fields(obj)
             if isinstance(getattr(obj, f.name), torch.Tensor)}  # DDPM's alphas_cumprod: no copy per step
    return dataclasses.replace(obj, **moved)


def make_batch(cfg, args, obj, device):
    """What the loop feeds `diffusion_loss` and the family's `predict`: fp32 latents and noise, text embeddings,
    pooled embeddings, the objective's times, SDXL's sizes (the other families ignore them)."""
    spec = SPECS[args.family]
    g = torch.Generator().manual_seed(0)
    b, s, r = args.batch_size, args.resolution // 8, args.resolution
    channels, text, pooled = spec.widths(cfg)
    tokens = spec.tokens[0 if args.full else 1]
    x = {
        "x0": torch.randn(b, channels, s, s, generator=g),  # (B, C, H/8, W/8)
        "noise": torch.randn(b, channels, s, s, generator=g),
        "embeds": torch.randn(b, tokens, text, generator=g),  # (B, L, text width): SDXL (B, 77, 2048)
        "pooled": torch.randn(b, pooled, generator=g),  # SDXL (B, 1280), SD 3.5 (B, 2048), FLUX.1 (B, 768)
    }
    x["t"] = obj.draw_times(b, g, x["x0"].shape)  # (B,): DDPM timesteps or flow sigmas
    x |= {"original_size": torch.tensor([[r, r]] * b), "crop_top_left": torch.zeros(b, 2, dtype=torch.long),
          "target_size": torch.tensor([[r, r]] * b)}  # (B, 2) each
    return {k: v.to(device) for k, v in x.items()}


def add_peft_lora(ref, names: list[str], values: dict[str, torch.Tensor], args) -> None:
    """A peft LoRA on `names`, trainable params in fp32 (as diffusers' LoRA examples), A/B set to `values`
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


def build(cfg, args, device, dtype) -> dict[str, torch.nn.Module]:
    """diffusers' model + peft LoRA and ours + our LoRA, and with --compile a second of each with its blocks
    compiled: the same base tensors (made on the device), the same LoRA A/B values, each side its own LoRA."""
    spec, family = SPECS[args.family], families.get(args.family)
    torch.manual_seed(0)
    ref = peer_model(spec, cfg, device, dtype).train()
    base = ref.state_dict()
    lora_config = LoRAConfig(rank=args.rank, alpha=args.rank, target_mode=args.target_mode)
    ours = {}
    for name in ["ours"] + ["ours compiled"] * args.compile + ["ours fp8"] * args.base_fp8:
        model = ours_on(spec, cfg, base)  # the very same tensors (fp8: stored anew from them, one layer at a time)
        if name == "ours fp8":
            store_linears(family.blocks(model), FP8)
        wrapped = add_lora(model, family.lora_targets(model, lora_config))
        ours[name] = model.train()
    lora = {k: v for k, v in ours["ours"].state_dict().items() if ".lora_" in k}
    for model in ours.values():
        model.load_state_dict(lora, strict=False)  # the same LoRA values everywhere
    peers = {"diffusers+peft": ref}
    if args.compile:
        peers["diffusers+peft compiled"] = peer_model(spec, cfg, "meta", dtype)
        peers["diffusers+peft compiled"].load_state_dict(base, strict=True, assign=True)
        peers["diffusers+peft compiled"].train()
    for peer in peers.values():
        add_peft_lora(peer, list(wrapped), lora, args)
    if args.gradient_checkpointing:
        for peer in peers.values():
            peer.enable_gradient_checkpointing()
        for model in ours.values():
            model.set_gradient_checkpointing(True)
    if args.compile:
        compile_unet(ours["ours compiled"], args.family)
        compile_peer(peers["diffusers+peft compiled"], args.family)
    models = {"diffusers+peft": PeerCall(ref, spec.peer_args), "ours": ours["ours"]}
    if args.base_fp8:
        models["ours fp8"] = ours["ours fp8"]
    if args.compile:
        models |= {"diffusers+peft compiled": PeerCall(peers["diffusers+peft compiled"], spec.peer_args),
                   "ours compiled": ours["ours compiled"]}
    return models


class Side:
    """One model's training step: the family's loss, backward, clip, AdamW step (as training/loop/train.py)."""

    def __init__(self, name, model, family, obj, x, device, dtype):
        self.name, self.model, self.family, self.objective, self.x, self.dtype = name, model, family, obj, x, dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        # fused on CUDA, as the loop: one kernel for all LoRA tensors, no per-tensor launches
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-2, fused=device.type == "cuda")
        self.losses = []

    def loss(self):
        x, obj = self.x, self.objective
        predict = lambda x_t, t: self.family.predict(self.model, x_t, t, x["embeds"], x["pooled"], x, obj)  # noqa: E731
        loss = diffusion_loss(predict, obj, x["x0"], x["t"], x["noise"], autocast_dtype=self.dtype)
        return weighted(loss, obj, x["t"]).mean()

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
    spec, family = SPECS[args.family], families.get(args.family)
    cfg = spec.full if args.full else spec.tiny
    models = build(cfg, args, device, dtype)
    obj = objective(family, device)
    x = make_batch(cfg, args, obj, device)
    rows, first = bench([Side(name, m, family, obj, x, device, dtype) for name, m in models.items()], device, args)

    mem_label = "peak MiB" if device.type == "cuda" else "saved-act MiB"
    print(f"# train step, {spec.title if args.full else family.TINY}, {args.precision}, {args.resolution}px, "
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
    if args.base_fp8:
        pairs.append(("ours fp8", "ours"))
        frozen = {name: sum(stored_bytes(models[name]).values()) / 2**20 for name in ("ours", "ours fp8")}
        print(f"frozen base weights: ours {frozen['ours']:,.1f} MiB, ours fp8 {frozen['ours fp8']:,.1f} MiB "
              "(a CUDA peak counts every side's: one process holds them all)")
    for a, b in pairs:
        print(f"| ratio {a} / {b} | {by_name[a]['step_ms'] / by_name[b]['step_ms']:.3f} | "
              f"{by_name[a]['mem'] / by_name[b]['mem']:.3f} | | |")
    if args.compile:
        print(f"compile (first step, not in the table): ours {first['ours compiled']:.1f} s, diffusers+peft "
              f"{first['diffusers+peft compiled']:.1f} s (eager first steps {first['ours']:.1f} s, "
              f"{first['diffusers+peft']:.1f} s)")


if __name__ == "__main__":
    main()
