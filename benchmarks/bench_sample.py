"""Benchmark: our sampler (`sampling.inference.ImageGenerator`) vs diffusers' `StableDiffusionXLPipeline`.

Both run in one process on the same UNet and text-encoder tensors (ours takes the pipeline's), the same
prompt, seeds, scheduler (Euler), steps, guidance, size and batch, from prompt to PIL images (no file
writing). Prints images/s and peak memory for each and the ratio ours/diffusers (images/s above 1 = we
are faster; memory below 1 = we use less), plus the largest pixel difference between the two outputs.

Timed calls alternate between the samplers (a change of load hits both alike) and each one's median counts.
With --compile both again with their UNet's ResNet and transformer blocks compiled (a second UNet each, on the
same tensors) are timed too; their first calls (compilation) are reported on their own line, never in the table.

Memory is what a call needs above the resident weights: on CUDA the peak allocated minus the allocated
memory before the call; on CPU the peak of glibc's in-use heap (`mallinfo2`, sampled every millisecond)
minus its value before the call.

    python benchmarks/bench_sample.py                      # tiny model, CPU, fp32, 256px, 20 steps, CFG 5
    python benchmarks/bench_sample.py --full --device cuda # SDXL-size random weights, fp16, 1024px, 30 steps
    python benchmarks/bench_sample.py --smoke              # 64 px, 2 steps, one call each: checks it runs

`--full` builds full-size SDXL models (UNet as in benchmarks/bench_unet.py, CLIP ViT-L, OpenCLIP bigG,
the SDXL VAE) with random weights on the device, so nothing is downloaded. Its default dtype is fp16,
where diffusers decodes in fp32 as we do (it upcasts SDXL's VAE, `force_upcast`); with --dtype bf16
diffusers' pipeline decodes in bf16 (its VAE cannot take bf16 latents in fp32) while ours stays fp32.
"""

import argparse
import copy
import ctypes
import sys
import threading
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import add_speed_flags, compile_peer, compile_unet, device_name, seconds, set_up  # noqa: E402,I001

import families  # noqa: E402
from sampling.inference import ImageGenerator  # noqa: E402
from sdxl.configs import unet_config_from_diffusers, unet_config_to_diffusers  # noqa: E402
from sdxl.configs import SDXL_SCHEDULER_CONFIG  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SMOKE = ["--resolution", "64", "--steps", "2", "--batch-size", "1", "--iters", "1", "--warmup", "1"]
PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="full-size SDXL with random weights (for a GPU) instead of tiny")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="UNet and text-encoder dtype (default: fp32; fp16 with --full)")
    p.add_argument("--image_size", "--resolution", dest="resolution", metavar="PX", type=int,
                   help="image side in pixels (default: 256; 1024 with --full)")
    p.add_argument("--steps", type=int, help="sampler steps (default: 20; 30 with --full)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="CFG scale; > 1 runs the UNet on 2x the batch")
    p.add_argument("--batch-size", type=int, default=2, help="images per call (default: 2)")
    p.add_argument("--iters", type=int, default=3, help="timed calls each, alternating; median counts (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first, at least 1 (default: 1)")
    p.add_argument("--smoke", action="store_true", help=f"tiny settings to check it runs: {' '.join(SMOKE)}")
    add_speed_flags(p)
    args = p.parse_args(argv)
    if args.smoke:
        args = p.parse_args([*SMOKE, *(argv if argv is not None else sys.argv[1:])])
    args.warmup = max(args.warmup, 1)
    args.dtype = args.dtype or ("fp16" if args.full else "fp32")
    args.resolution = args.resolution or (1024 if args.full else 256)
    args.steps = args.steps or (30 if args.full else 20)
    return args


def full_pipeline(device, dtype):
    """StableDiffusionXLPipeline of SDXL-size modules with random weights, built on `device`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffusion.tokenizers import build_clip_tokenizer
    from sdxl.configs import CLIP_L_CONFIG, OPENCLIP_BIGG_CONFIG, SDXL_VAE_CONFIG
    from sdxl.unet import SDXL_CONFIG

    torch.manual_seed(0)
    with torch.device(device):
        config = {k: v for k, v in unet_config_to_diffusers(SDXL_CONFIG).items() if not k.startswith("_")}
        unet = UNet2DConditionModel(**config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_CONFIG))
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    tokenizers = {"tokenizer": build_clip_tokenizer("<|endoftext|>"), "tokenizer_2": build_clip_tokenizer("!")}
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG), **tokenizers)
    return pipe.to(device=device, dtype=dtype)


def ours_from(pipe) -> ImageGenerator:
    """Our generator on the pipeline's UNet and text-encoder tensors (shared, not copied); a fp32 VAE copy."""
    from diffusion.vae import LatentVAE
    from sdxl.text_encoders import SDXLTextEncoder
    from sdxl.unet import SDXLUNet

    with torch.device("meta"):
        unet = SDXLUNet(unet_config_from_diffusers(dict(pipe.unet.config)))
    unet.load_state_dict(pipe.unet.state_dict(), strict=True, assign=True)
    text_encoder = SDXLTextEncoder(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2)
    vae = LatentVAE(copy.deepcopy(pipe.vae))  # LatentVAE makes its VAE fp32; the pipeline keeps its own dtype
    return ImageGenerator(families.get("sdxl"), unet.eval(), text_encoder, vae, dict(pipe.scheduler.config))


def compiled_pipeline(pipe):
    """`pipe` with a second UNet on the same tensors whose blocks are compiled (benchmarks/harness.py)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(pipe.unet.config)
    unet.load_state_dict(pipe.unet.state_dict(), strict=True, assign=True)
    compiled = StableDiffusionXLPipeline(**{**pipe.components, "unet": compile_peer(unet.eval())})
    compiled.set_progress_bar_config(disable=True)
    return compiled


def compiled_from(ours: ImageGenerator) -> ImageGenerator:
    """`ours` with a second UNet on the same tensors whose blocks are compiled (benchmarks/harness.py)."""
    from sdxl.unet import SDXLUNet

    with torch.device("meta"):
        unet = SDXLUNet(ours.denoiser.config)
    unet.load_state_dict(ours.denoiser.state_dict(), strict=True, assign=True)
    return ImageGenerator(ours.family, compile_unet(unet.eval()), ours.text_encoder, ours.vae, ours.scheduler_config)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


class PeakMemory:
    """Peak memory of a block above its start: CUDA allocator stats, or glibc's in-use heap sampled each ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0
        if device.type != "cuda":
            self._mallinfo = ctypes.CDLL("libc.so.6").mallinfo2
            self._mallinfo.restype = _MallInfo2

    def _heap(self) -> int:
        m = self._mallinfo()
        return m.uordblks + m.hblkhd  # small allocations + mmap'd large ones (tensors)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start, self._stop = self._heap(), threading.Event()

        def sample():
            while not self._stop.wait(0.001):
                self.peak = max(self.peak, self._heap() - self.start)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self._stop.set()
            self._thread.join()


def timed(call, device) -> tuple[float, list]:
    out = []
    return seconds(lambda: out.append(call()), device), out[0]


def bench(calls: dict, args, device) -> tuple[dict, dict]:
    """Warm each up (its first call timed: compilation), then alternate the timed calls (a load change on a
    shared machine hits all alike) and take each one's median; then one call each under PeakMemory."""
    first = {}
    for name, call in calls.items():
        first[name] = seconds(call, device)
        for _ in range(args.warmup - 1):
            call()
    times, images = {name: [] for name in calls}, {}
    for _ in range(args.iters):
        for name, call in calls.items():
            s, images[name] = timed(call, device)
            times[name].append(s)
    rows = {}
    for name, call in calls.items():
        with PeakMemory(device) as mem:
            call()
        rows[name] = {"images_s": args.batch_size / float(np.median(times[name])), "mem": mem.peak,
                      "images": images[name]}
    return rows, first


def main(argv=None):
    args = parse_args(argv)
    from diffusers import StableDiffusionXLPipeline

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    set_up(args.threads, device)
    if args.full:
        pipe = full_pipeline(device, dtype)
    else:
        from sdxl.tiny import tiny_model_path

        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_path(), torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    ours = ours_from(pipe)
    b, r = args.batch_size, args.resolution
    seeds = list(range(b))
    settings = {"width": r, "height": r, "steps": args.steps, "guidance_scale": args.guidance_scale,
                "sampler": "euler"}

    def run_diffusers(pipe=pipe):
        return pipe([PROMPT] * b, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, height=r,
                    width=r, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images

    calls = {"diffusers": run_diffusers, "ours": lambda: ours.generate_unique_batch([PROMPT] * b, seeds, **settings)}
    if args.compile:
        peer, compiled = compiled_pipeline(pipe), compiled_from(ours)
        calls["diffusers compiled"] = lambda: run_diffusers(peer)
        calls["ours compiled"] = lambda: compiled.generate_unique_batch([PROMPT] * b, seeds, **settings)
    rows, first = bench(calls, args, device)
    diff = max(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(o, dtype=np.int16)).max()
               for a, o in zip(rows["diffusers"]["images"], rows["ours"]["images"], strict=True))

    mem_label = "peak MiB above weights" if device.type == "cuda" else "peak heap MiB above start"
    print(f"# sampling {'SDXL (random weights)' if args.full else 'tiny'}, {args.dtype}, {r}x{r}, {args.steps} "
          f"steps euler, CFG {args.guidance_scale}, batch {b}, {device_name(device)}, torch {torch.__version__}")
    print(f"| sampler | images/s | s/image | {mem_label} |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['images_s']:.3f} | {1 / row['images_s']:.3f} | {row['mem'] / 2**20:.0f} |")
    pairs = [("ours", "diffusers")]
    if args.compile:
        pairs += [("ours compiled", "diffusers"), ("diffusers compiled", "diffusers"),
                  ("ours compiled", "diffusers compiled")]
    for a, b in pairs:
        o, d = rows[a], rows[b]
        print(f"| ratio {a} / {b} | {o['images_s'] / d['images_s']:.3f} | {d['images_s'] / o['images_s']:.3f} "
              f"| {o['mem'] / max(d['mem'], 1):.3f} |")
    print(f"largest pixel difference between diffusers' and our outputs: {diff}/255")
    if args.compile:
        print("compile (first call, not in the table): " + ", ".join(f"{n} {s:.1f} s" for n, s in first.items()))


if __name__ == "__main__":
    main()
