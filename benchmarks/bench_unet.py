"""Benchmark: our SDXL UNet vs diffusers' UNet2DConditionModel, same config, weights and inputs.

Times the forward pass and forward+backward, and measures memory, for both models in one process,
and prints a table with the ratio ours/diffusers (below 1 = we are faster / smaller).
Memory: on CUDA the peak allocated during the step; on CPU the bytes of activations saved for the
backward pass (distinct storages), the part of training memory the UNet code decides.

    python benchmarks/bench_unet.py                                  # tiny config, CPU, fp32
    python benchmarks/bench_unet.py --config sdxl --device cuda --dtype bf16 --resolution 1024 --batch-size 2
"""

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdxl.configs import unet_config_to_diffusers  # noqa: E402
from sdxl.tiny import TINY_UNET_CONFIG  # noqa: E402
from sdxl.unet import SDXL_CONFIG, SDXLUNet, UNetConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["tiny", "sdxl"], default="tiny", help="UNet size: tiny test model or SDXL base")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and inputs dtype")
    p.add_argument("--image_size", "--resolution", dest="resolution", metavar="PX", type=int, default=256,
                   help="image side in pixels (latent side = resolution/8)")
    p.add_argument("--batch-size", type=int, default=2, help="images per step")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--gradient-checkpointing", action="store_true", help="enable it in both models")
    return p.parse_args(argv)


def make_inputs(cfg: UNetConfig, args, device, dtype):
    g = torch.Generator().manual_seed(0)
    b, s = args.batch_size, args.resolution // 8
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    r = args.resolution
    x = {
        "sample": torch.randn(b, cfg.in_channels, s, s, generator=g),
        "timestep": torch.randint(0, 1000, (b,), generator=g),
        "encoder_hidden_states": torch.randn(b, 77, cfg.cross_attention_dim, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(b, pooled, generator=g),
            "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * b, dtype=torch.float32),
        },
    }
    cast = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    return {k: ({kk: cast(vv) for kk, vv in v.items()} if isinstance(v, dict) else cast(v)) for k, v in x.items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the distinct storages autograd saves for backward."""

    def __init__(self):
        self.storages = {}

        def pack(t):
            s = t.untyped_storage()
            self.storages[s.data_ptr()] = s.nbytes()
            return t

        super().__init__(pack, lambda t: t)

    @property
    def nbytes(self):
        return sum(self.storages.values())


def measure(fn, device, args):
    for _ in range(args.warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        fn()
    sync(device)
    ms = (time.perf_counter() - t0) / args.iters * 1000
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return ms, peak


def bench(name, model, x, device, args):
    model.requires_grad_(True)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing() if name == "diffusers" else model.set_gradient_checkpointing(True)
    call = (lambda: model(**x).sample) if name == "diffusers" else (lambda: model(**x))

    def forward():
        with torch.no_grad():
            call()

    def train_step():
        call().float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    fwd_ms, _ = measure(forward, device, args)
    step_ms, peak = measure(train_step, device, args)
    if peak is None:
        counter = SavedBytes()
        with counter:
            out = call()
        del out
        peak = counter.nbytes
    return {"model": name, "fwd_ms": fwd_ms, "step_ms": step_ms, "mem": peak}


def main(argv=None):
    args = parse_args(argv)
    from diffusers import UNet2DConditionModel

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = SDXL_CONFIG if args.config == "sdxl" else TINY_UNET_CONFIG
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**{k: v for k, v in unet_config_to_diffusers(cfg).items() if not k.startswith("_")})
    ref = ref.to(device=device, dtype=dtype).train()
    with torch.device("meta"):
        ours = SDXLUNet(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # the very same tensors
    ours.train()
    x = make_inputs(cfg, args, device, dtype)
    rows = [bench("diffusers", ref, x, device, args), bench("ours", ours, x, device, args)]

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    mem_label = "peak MiB" if device.type == "cuda" else "saved-act MiB"
    print(f"# UNet {args.config}, {args.dtype}, {args.resolution}px, batch {args.batch_size}, "
          f"checkpointing {'on' if args.gradient_checkpointing else 'off'}, {dev_name}, torch {torch.__version__}")
    print(f"| model | forward ms | fwd+bwd ms | {mem_label} |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['fwd_ms']:.1f} | {r['step_ms']:.1f} | {r['mem'] / 2**20:.0f} |")
    a, b = rows[1], rows[0]
    print(f"| ratio ours/diffusers | {a['fwd_ms'] / b['fwd_ms']:.3f} | {a['step_ms'] / b['step_ms']:.3f} | "
          f"{a['mem'] / b['mem']:.3f} |")


if __name__ == "__main__":
    main()
