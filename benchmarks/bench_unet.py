"""Benchmark: our denoiser vs diffusers' model of the same config, weights and inputs, for each family
(`--family`): SDXL's UNet vs `UNet2DConditionModel`, SD 3.5's MMDiT vs `SD3Transformer2DModel`, FLUX.1's
transformer vs `FluxTransformer2DModel` (benchmarks/denoisers.py).

Times the forward pass and forward+backward, and measures memory, for both models in one process (and, with
--compile, both models again with their blocks compiled, on the same tensors), and prints a table with the ratios
to diffusers (below 1 = we are faster / smaller). Time: the best of --rounds rounds of --iters calls; each round
runs the models in turn, so load from other jobs hits them alike. The compiled models' first calls (compilation)
are reported on their own line, never in the table.
Memory: on CUDA the peak allocated during one step; on CPU the bytes of activations saved for the backward
pass (distinct storages), the part of training memory the model code decides.

    python benchmarks/bench_unet.py                                  # tiny SDXL config, CPU, fp32
    python benchmarks/bench_unet.py --config full --device cuda --dtype bf16 --resolution 1024 --batch-size 2
    python benchmarks/bench_unet.py --family sd3 --config full --device cuda --dtype bf16 --resolution 1024
    python benchmarks/bench_unet.py --family flux --smoke            # 64 px, one round: checks it runs
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from denoisers import SPECS, model_inputs, ours_on, peer_model  # noqa: E402,I001
from harness import (  # noqa: E402,I001
    SavedBytes, add_speed_flags, alternate, compile_peer, compile_unet, device_name, seconds, set_up, sync)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SMOKE = ["--resolution", "64", "--batch-size", "1", "--iters", "1", "--rounds", "1", "--warmup", "1"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=list(SPECS), default="sdxl",
                   help="which denoiser: sdxl (UNet), sd3 (SD 3.5 MMDiT), flux (FLUX.1 transformer)")
    p.add_argument("--config", choices=["tiny", "full", "sdxl"], default="tiny",
                   help="model size: the family's tiny test model, or full: the released model's config with random "
                        "weights (SDXL base, SD 3.5 Medium, FLUX.1-dev); sdxl = full (the older spelling)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and inputs dtype")
    p.add_argument("--image_size", "--resolution", dest="resolution", metavar="PX", type=int, default=256,
                   help="image side in pixels (latent side = resolution/8; a multiple of 16 for sd3 and flux)")
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
    if args.config == "sdxl" and args.family != "sdxl":
        p.error("--config sdxl is SDXL's full size; give --config full for the other families")
    if args.family != "sdxl" and args.resolution % 16:
        p.error(f"--resolution {args.resolution}: {args.family} patches 2x2 latents; give a multiple of 16")
    return args


def make_inputs(cfg, args, device, dtype):
    """The denoiser's keyword inputs on the device; floats in `dtype` but the position ids (FLUX.1's, kept fp32)."""
    spec = SPECS[args.family]
    x = model_inputs(args.family, cfg, args.batch_size, args.resolution, spec.tokens[1 if args.config == "tiny" else 0],
                     torch.Generator().manual_seed(0))

    def cast(k, t):
        return t.to(device=device, dtype=dtype if t.is_floating_point() and not k.endswith("_ids") else t.dtype)

    return {k: ({kk: cast(kk, vv) for kk, vv in v.items()} if isinstance(v, dict) else cast(k, v))
            for k, v in x.items()}


def build(cfg, args, device, dtype) -> dict[str, torch.nn.Module]:
    """diffusers' model (random init, made on the device), ours on the very same tensors, and with --compile
    a second one of each, on the same tensors too, with its blocks compiled."""
    spec = SPECS[args.family]
    torch.manual_seed(0)
    ref = peer_model(spec, cfg, device, dtype)
    models = {"diffusers": ref.train().requires_grad_(True)}
    if args.compile:
        peer = peer_model(spec, cfg, "meta", dtype)
        peer.load_state_dict(ref.state_dict(), strict=True, assign=True)
        models["diffusers compiled"] = compile_peer(peer.train().requires_grad_(True), args.family)
    for name in ["ours", "ours compiled"] if args.compile else ["ours"]:
        models[name] = ours_on(spec, cfg, ref.state_dict()).train().requires_grad_(True)  # the very same tensors
    if args.compile:
        compile_unet(models["ours compiled"], args.family)
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
    spec = SPECS[args.family]
    cfg = spec.tiny if args.config == "tiny" else spec.full
    models = build(cfg, args, device, dtype)
    x = make_inputs(cfg, args, device, dtype)
    rows, first = bench([Side(name, m, x) for name, m in models.items()], device, args)

    mem_label = "peak MiB" if device.type == "cuda" else "saved-act MiB"
    title = f"tiny {args.family}" if args.config == "tiny" else spec.title
    print(f"# denoiser {title}, {args.dtype}, {args.resolution}px, batch {args.batch_size}, "
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
