"""Benchmark: our SDXL UNet vs diffusers' UNet2DConditionModel, same config, weights and inputs.

Times the forward pass and forward+backward, and measures memory, for both models in one process (and, with
--compile, both UNets again with their ResNet and transformer blocks compiled, on the same tensors), and prints
a table with the ratios to diffusers (below 1 = we are faster / smaller). Time: the best of --rounds rounds of
--iters calls; each round runs the models in turn, so load from other jobs hits them alike. The compiled
models' first calls (compilation) are reported on their own line, never in the table.
Memory: on CUDA the peak allocated during one step; on CPU the bytes of activations saved for the backward
pass (distinct storages), the part of training memory the UNet code decides.

    python benchmarks/bench_unet.py                                  # tiny config, CPU, fp32
    python benchmarks/bench_unet.py --config sdxl --device cuda --dtype bf16 --resolution 1024 --batch-size 2
    python benchmarks/bench_unet.py --smoke                          # 64 px, one round: checks it runs
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import (  # noqa: E402,I001
    SavedBytes, add_speed_flags, alternate, compile_peer, compile_unet, device_name, seconds, set_up, sync)

from sdxl.configs import unet_config_to_diffusers  # noqa: E402
from sdxl.tiny import TINY_UNET_CONFIG  # noqa: E402
from sdxl.unet import SDXL_CONFIG, SDXLUNet, UNetConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SMOKE = ["--resolution", "64", "--batch-size", "1", "--iters", "1", "--rounds", "1", "--warmup", "1"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "sdxl"], default="tiny", help="UNet size: tiny test model or SDXL base")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and inputs dtype")
    p.add_argument("--image_size", "--resolution", dest="resolution", metavar="PX", type=int, default=256,
                   help="image side in pixels (latent side = resolution/8)")
    p.add_argument("--batch-size", type=int, default=2, help="images per step")
    p.add_argument("--iters", type=int, default=5, help="timed calls per model and round")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds, alternating the models; best round counts")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (at least 1 with --compile)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="enable it in all models")
    p.add_argument("--smoke", action="store_true", help=f"tiny settings to check it runs: {' '.join(SMOKE)}")
    add_speed_flags(p)
    args = p.parse_args(argv)
    if args.smoke:
        args = p.parse_args([*SMOKE, *(argv if argv is not None else sys.argv[1:])])
    if args.compile:
        args.warmup = max(args.warmup, 1)
    return args


def make_inputs(cfg: UNetConfig, args, device, dtype):
    g = torch.Generator().manual_seed(0)
    b, s = args.batch_size, args.resolution // 8
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    r = args.resolution
    x = {
        "sample": torch.randn(b, cfg.in_channels, s, s, generator=g),  # (B, 4, H/8, W/8)
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "encoder_hidden_states": torch.randn(b, 77, cfg.cross_attention_dim, generator=g),  # (B, 77, 2048)
        "added_cond_kwargs": {
            "text_embeds": torch.randn(b, pooled, generator=g),  # (B, 1280)
            "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * b, dtype=torch.float32),  # (B, 6)
        },
    }
    cast = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    return {k: ({kk: cast(vv) for kk, vv in v.items()} if isinstance(v, dict) else cast(v)) for k, v in x.items()}


def build(cfg: UNetConfig, args, device, dtype) -> dict[str, torch.nn.Module]:
    """diffusers' UNet (random init, made on the device), ours on the very same tensors, and with --compile
    a second one of each, on the same tensors too, with its blocks compiled."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging

    logging.set_verbosity_error()  # not the `to(dtype)` advice: the bench casts on purpose
    torch.manual_seed(0)
    with torch.device(device):
        ref = UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith("_")})
    models = {"diffusers": ref.to(dtype=dtype).train().requires_grad_(True)}
    if args.compile:
        with torch.device("meta"):
            peer = UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(cfg).items()
                                           if not k.startswith("_")})
        peer.load_state_dict(ref.state_dict(), strict=True, assign=True)
        models["diffusers compiled"] = compile_peer(peer.train().requires_grad_(True))
    for name in ["ours", "ours compiled"] if args.compile else ["ours"]:
        with torch.device("meta"):
            ours = SDXLUNet(cfg)
        ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # the very same tensors
        models[name] = ours.train().requires_grad_(True)
    if args.compile:
        compile_unet(models["ours compiled"])
    if args.gradient_checkpointing:
        for name, model in models.items():
            if name.startswith("diffusers"):
                model.enable_gradient_checkpointing()
            else:
                model.set_gradient_checkpointing(True)
    return models


class Side:
    """One model's two measured calls: a no-grad forward and forward + backward."""

    def __init__(self, name, model, x):
        self.name, self.model = name, model
        self.call = (lambda: model(**x).sample) if name.startswith("diffusers") else (lambda: model(**x))

    def forward(self):
        with torch.no_grad():
            self.call()

    def train_step(self):
        self.call().float().square().mean().backward()
        self.model.zero_grad(set_to_none=True)

    def memory(self, device) -> int:
        """CUDA: peak allocated during one step. CPU: bytes autograd saves for backward in one forward."""
        if device.type == "cuda":
            sync(device)
            torch.cuda.reset_peak_memory_stats()
            self.train_step()
            sync(device)
            return torch.cuda.max_memory_allocated()
        counter = SavedBytes()
        with counter:
            out = self.call()
        del out
        return counter.nbytes


def bench(sides: list[Side], device, args) -> tuple[list[dict], dict]:
    """Warm-up (the first forward and first step of each side timed: compilation), memory, then alternating
    rounds of forwards and rounds of steps."""
    first = {}
    for s in sides:
        first[s.name] = (seconds(s.forward, device), seconds(s.train_step, device))
        for _ in range(args.warmup - 1):
            s.forward(), s.train_step()
    mem = {s.name: s.memory(device) for s in sides}
    fwd = alternate({s.name: s.forward for s in sides}, device, args.rounds, args.iters)
    step = alternate({s.name: s.train_step for s in sides}, device, args.rounds, args.iters)
    rows = [{"model": s.name, "fwd_ms": min(fwd[s.name]) * 1000, "step_ms": min(step[s.name]) * 1000,
             "mem": mem[s.name]} for s in sides]
    return rows, first


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    set_up(args.threads, device)
    cfg = SDXL_CONFIG if args.config == "sdxl" else TINY_UNET_CONFIG
    models = build(cfg, args, device, dtype)
    x = make_inputs(cfg, args, device, dtype)
    rows, first = bench([Side(name, m, x) for name, m in models.items()], device, args)

    mem_label = "peak MiB" if device.type == "cuda" else "saved-act MiB"
    print(f"# UNet {args.config}, {args.dtype}, {args.resolution}px, batch {args.batch_size}, "
          f"checkpointing {'on' if args.gradient_checkpointing else 'off'}, {device_name(device)}, "
          f"torch {torch.__version__}")
    print(f"| model | forward ms | fwd+bwd ms | {mem_label} |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['fwd_ms']:.1f} | {r['step_ms']:.1f} | {r['mem'] / 2**20:.0f} |")
    by_name = {r["model"]: r for r in rows}
    pairs = [("ours", "diffusers")]
    if args.compile:
        pairs += [("ours compiled", "diffusers"), ("diffusers compiled", "diffusers"),
                  ("ours compiled", "diffusers compiled")]
    for a, b in pairs:
        a, b = by_name[a], by_name[b]
        print(f"| ratio {a['model']} / {b['model']} | {a['fwd_ms'] / b['fwd_ms']:.3f} | "
              f"{a['step_ms'] / b['step_ms']:.3f} | {a['mem'] / b['mem']:.3f} |")
    if args.compile:
        print("compile (first calls, not in the table): " + ", ".join(
            f"{name} forward {first[name][0]:.1f} s, fwd+bwd {first[name][1]:.1f} s" for name in first))


if __name__ == "__main__":
    main()
