"""generate_images.py's command line, checks and run loop: prompts -> a COCO-style image folder.

Order of work, so that bad input costs nothing and writes nothing: parse and check every value (one-line
`error: ...`, exit 2), plan the images, check the output folder against the plan (`sampling/writer.py`),
load the model and LoRAs, and only then create the folder and generate the missing images.

Under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK set) the missing images are cut into batches in index
order, exactly as one process would, and batch k goes to rank k % WORLD_SIZE: each index is made once,
by a batch of the same composition as in a one-process run, so the files are the same bytes.
"""

import argparse
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from sampling.inference import DEFAULTS, parse_size
from sampling.prompts import MAX_SEED, PromptError, PromptSpec, plan_images, read_prompt_file
from sampling.samplers import sampler_names
from sampling.writer import SettingsMismatch, metadata, missing_jobs, write_group

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CliError(ValueError):
    """A bad flag value; its message is one line naming the flag, the value and what to do."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors as one line too (its default prints the usage first)
        self.exit(2, f"error: {message}; see python {self.prog} --help\n")


def _add(group, name: str, help: str, **kwargs) -> argparse.Action:
    """`--na-me` plus its underscore spelling `--na_me`; dest is the underscore name."""
    names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
    action = group.add_argument(*names, help=help, **kwargs)
    action.help = help  # BooleanOptionalAction on Python 3.10 appends its own "(default: ...)"; ours says it
    return action


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="generate_images.py", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate a COCO-style image folder (00000.png, 00000.txt, 00000.json, ...) from prompts with "
                    "SDXL and LoRAs. Re-running the same command fills in only the missing images.",
        epilog="examples:\n"
        "  python generate_images.py --pretrained-model ./weights/sdxl-base-1.0 \\\n"
        "      --lora-checkpoint my_lora.safetensors --prompt-file prompts.txt --num-images 1000 \\\n"
        "      --batch-size 4 --output-dir ./synthetic\n"
        "  python generate_images.py --pretrained-model tiny --prompt 'a red circle' --num-images 4 \\\n"
        "      --image-size 64 --num-inference-steps 4 --output-dir /tmp/tiny_images      # CPU, seconds\n"
        "  torchrun --nproc_per_node 8 generate_images.py ...   # shard the images over 8 GPUs",
    )
    g = p.add_argument_group("model")
    _add(g, "pretrained-model", "SDXL base: a diffusers folder, a single-file .safetensors, or `tiny` (the tiny "
         "CPU test model) (required)", required=True, metavar="PATH")
    _add(g, "vae-model", "diffusers VAE folder to decode with, e.g. sdxl-vae-fp16-fix (default: the model's)",
         metavar="DIR")
    _add(g, "lora-checkpoint", "LoRA to merge: a .safetensors file (kohya or diffusers/peft keys) or a training "
         "checkpoint folder (checkpoints/step_000500); repeat the flag for several (default: none)",
         action="append", default=[], metavar="PATH")
    _add(g, "lora-scale", "strength of each LoRA: once for all of them, or once per --lora-checkpoint in the same "
         "order (default: 1.0)", action="append", type=float, default=[], metavar="S")

    g = p.add_argument_group("prompts")
    source = g.add_mutually_exclusive_group(required=True)
    _add(source, "prompt", "a prompt; repeat the flag for several (this or --prompt-file is required)",
         action="append", metavar="TEXT")
    _add(source, "prompt-file", ".txt with one prompt per line (blank and #-lines skipped), or .jsonl with "
         '{"prompt": ..., "negative_prompt": ..., "seed": ...} per line', metavar="FILE")
    _add(g, "negative-prompt", "negative prompt of every image (a .jsonl line's own wins); empty = SDXL's zero "
         "embedding (default: empty)", default="", metavar="TEXT")
    _add(g, "num-images", "images to make; the prompts cycle in order (default: one per prompt)", type=int,
         metavar="N")
    _add(g, "shuffle-prompts", "cycle the prompts in an order shuffled with --seed (default: file order)",
         action="store_true")

    g = p.add_argument_group("sampling")
    _add(g, "image-size", f"WIDTHxHEIGHT or one number for a square, multiples of 8 (default: {DEFAULTS['width']})",
         default=str(DEFAULTS["width"]), metavar="WxH")
    _add(g, "num-inference-steps", f"sampler steps, 1..1000 (default: {DEFAULTS['steps']})", type=int,
         default=DEFAULTS["steps"], metavar="N")
    _add(g, "guidance-scale", f"classifier-free guidance; <= 1 turns it off (default: {DEFAULTS['guidance_scale']})",
         type=float, default=DEFAULTS["guidance_scale"], metavar="G")
    _add(g, "scheduler", f"sampler; _karras = Karras sigmas (default: {DEFAULTS['sampler']})",
         choices=sampler_names(), default=DEFAULTS["sampler"])
    _add(g, "seed", "image i is seeded seed + i (a .jsonl line's seed wins) (default: 0)", type=int, default=0)
    _add(g, "batch-size", "images per UNet batch and device; results do not depend on it beyond float rounding "
         "(default: 1)", type=int, default=1, metavar="N")

    g = p.add_argument_group("output")
    _add(g, "output-dir", "folder of 00000.png, 00000.txt, 00000.json, ... (created; required)", required=True,
         metavar="DIR")
    _add(g, "save-metadata", "write the .json of each image (settings, seed, LoRAs) (default: on)",
         action=argparse.BooleanOptionalAction, default=True)
    _add(g, "overwrite", "regenerate images already in --output-dir (default: keep them, make only the missing)",
         action="store_true")

    g = p.add_argument_group("hardware")
    _add(g, "precision", "UNet and text-encoder dtype; the VAE is always fp32; auto = bf16 on a GPU (fp16 where "
         "bf16 is unsupported), fp32 on CPU (default: auto)", choices=["auto", *DTYPES], default="auto")
    _add(g, "device", "cpu, cuda or cuda:N; auto = cuda if available (under torchrun: cuda:LOCAL_RANK) (default: "
         "auto)", default="auto")
    return p


def _fail(flag: str, value, what: str):
    raise CliError(f"--{flag} {value}: {what}")


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check every flag; resolve sizes, device, precision, LoRA scales, prompts (CliError/PromptError)."""
    args = build_parser().parse_args(argv)
    for name in ("guidance_scale", "lora_scale"):
        for value in args.lora_scale if name == "lora_scale" else [args.guidance_scale]:
            if not math.isfinite(value):
                _fail(name.replace("_", "-"), value, "must be a finite number")
    try:
        args.width, args.height = parse_size(args.image_size)
    except ValueError as e:
        _fail("image-size", args.image_size, str(e))
    if not 1 <= args.num_inference_steps <= 1000:
        _fail("num-inference-steps", args.num_inference_steps, "must be in 1..1000, e.g. 30")
    if args.guidance_scale < 0:
        _fail("guidance-scale", args.guidance_scale, "must be >= 0 (SDXL: 5 to 8; <= 1 turns guidance off)")
    if args.batch_size < 1:
        _fail("batch-size", args.batch_size, "must be >= 1")
    if args.num_images is not None and args.num_images < 1:
        _fail("num-images", args.num_images, "must be >= 1")
    _check_paths(args)
    _resolve_device(args)

    specs = read_prompt_file(args.prompt_file) if args.prompt_file else [PromptSpec(p) for p in args.prompt]
    args.num_images = args.num_images or len(specs)
    if not 0 <= args.seed <= MAX_SEED - args.num_images:
        _fail("seed", args.seed, f"must be in [0, 2^63 - {args.num_images}] (image i uses seed + i)")
    args.jobs = plan_images(specs, args.num_images, args.seed, args.negative_prompt, args.shuffle_prompts)
    return args


def _check_paths(args: argparse.Namespace) -> None:
    from sdxl.loading import DOWNLOAD_HINT

    if args.pretrained_model != "tiny":
        model = Path(args.pretrained_model).expanduser().absolute()
        if not model.exists():
            _fail("pretrained-model", model, f"does not exist; {DOWNLOAD_HINT}")
        if model.is_file() and model.suffix != ".safetensors":
            _fail("pretrained-model", model, "only .safetensors single files are loaded (never pickled .ckpt/.bin); "
                  "convert it or give a diffusers folder")
        if model.is_dir() and not (model / "unet" / "config.json").is_file():
            _fail("pretrained-model", model, f"is not a diffusers SDXL folder (no unet/config.json); {DOWNLOAD_HINT}")
        args.pretrained_model = str(model)
    if args.vae_model:
        vae = Path(args.vae_model).expanduser().absolute()
        if not ((vae / "config.json").is_file() or (vae / "vae" / "config.json").is_file()):
            _fail("vae-model", vae, "is not a diffusers VAE folder (no config.json); give one such as "
                  "./weights/sdxl-vae-fp16-fix (./download_weights.sh --vae-fp16-fix), or leave the flag out")
        args.vae_model = str(vae)
    loras = [Path(p).expanduser().absolute() for p in args.lora_checkpoint]
    for path in loras:
        if not path.exists():
            _fail("lora-checkpoint", path, "does not exist; give a LoRA .safetensors file or a training checkpoint "
                  "folder (OUTPUT_DIR/checkpoints/step_XXXXXX)")
    scales = args.lora_scale or [1.0]
    if not loras and args.lora_scale:
        _fail("lora-scale", args.lora_scale[0], "needs a --lora-checkpoint to apply to; add one or drop the scale")
    if len(scales) == 1:
        scales = scales * len(loras)
    elif len(scales) != len(loras):
        _fail("lora-scale", " ".join(map(str, scales)), f"{len(scales)} scales for {len(loras)} --lora-checkpoint; "
              "give one scale for all, or one per LoRA")
    args.loras = [(str(p), float(s)) for p, s in zip(loras, scales, strict=True)]
    out = Path(args.output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        _fail("output-dir", out, "is an existing file; give a folder (it is created if missing)")
    args.output_dir = out


def _resolve_device(args: argparse.Namespace) -> None:
    device, local_rank = args.device, int(os.environ.get("LOCAL_RANK", 0))
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        _fail("device", device, "must be auto, cpu, cuda or cuda:N")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            _fail("device", device, "no CUDA GPU is visible to torch; use --device cpu (or auto)")
        if distributed and device != "cuda":
            _fail("device", device, "under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda (or auto)")
        device = f"cuda:{local_rank}" if distributed else device
        if int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
            _fail("device", device, f"only {torch.cuda.device_count()} CUDA device(s) are visible; use a lower index")
    precision = args.precision
    if precision == "auto":
        precision = "fp32" if device == "cpu" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "cpu" and precision == "fp16":
        _fail("precision", "fp16", "fp16 needs a CUDA GPU; on CPU use --precision fp32 or bf16")
    if device != "cpu" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        _fail("precision", "bf16", f"{device} does not support bf16; use --precision fp16 or fp32")
    args.device, args.precision = device, precision


def run_settings(args: argparse.Namespace) -> dict:
    """What every image of the run shares, as written to (and checked against) each .json."""
    return {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
            "sampler": args.scheduler, "width": args.width, "height": args.height,
            "base_model": args.pretrained_model, "vae_model": args.vae_model,
            "loras": [{"path": p, "scale": s} for p, s in args.loras], "precision": args.precision}


# ---------------------------------------------------------------------------------------------------
# The run


def _init_distributed(device: str) -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group (NCCL on GPUs, gloo on CPU) when there is one."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def _agree(value, rank: int, world: int):
    """Rank 0's value on every rank (a no-op in one process)."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _total(n: int, world: int) -> int:
    if world == 1:
        return n
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return int(t.item())


def generate(args: argparse.Namespace, rank: int, world: int) -> int:
    """Fill the missing images of `args.jobs` into args.output_dir; returns the exit status."""
    from tqdm import tqdm

    from sampling.inference import SDXLGenerator

    out, settings = args.output_dir, run_settings(args)
    try:  # rank 0 reads the folder before anyone writes: every rank then plans from the same state
        check = (missing_jobs(out, args.jobs, settings, args.overwrite), None) if rank == 0 else None
    except SettingsMismatch as e:
        check = (None, str(e))
    missing, problem = _agree(check, rank, world)
    if problem:
        return _error(problem, rank)
    if not missing:
        if rank == 0:
            print(f"nothing to do: all {len(args.jobs)} images are already in {out} (--overwrite remakes them)")
        return 0

    try:
        gen = SDXLGenerator.from_pretrained(args.pretrained_model, args.vae_model, args.loras, args.device,
                                            DTYPES[args.precision])
    except (OSError, ValueError) as e:
        return _error(str(e), rank)
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return _error(f"--output-dir {out}: cannot create it ({e.strerror}); choose a folder you can write to")
    sample = {"width": args.width, "height": args.height, "steps": args.num_inference_steps,
              "guidance_scale": args.guidance_scale, "sampler": args.scheduler}
    batches = [missing[i : i + args.batch_size] for i in range(0, len(missing), args.batch_size)]
    mine = batches[rank::world]
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the folder exists

    start = time.perf_counter()
    bar = tqdm(total=sum(map(len, mine)), unit="img", disable=rank != 0,
               desc="generating" if world == 1 else f"rank 0 of {world}")
    with ThreadPoolExecutor(max_workers=1) as writer:  # PNG encoding and fsync overlap the next batch
        pending = []
        for batch in mine:
            images = gen.generate_unique_batch([j.prompt for j in batch], [j.seed for j in batch],
                                               [j.negative_prompt for j in batch], **sample)
            for job, image in zip(batch, images, strict=True):
                meta = metadata(job, settings) if args.save_metadata else None
                pending.append(writer.submit(write_group, out, job.index, image, job.prompt, meta))
            while len(pending) > len(batch):  # at most one batch waits; a write error surfaces here
                pending.pop(0).result()
            bar.update(len(batch))
        for f in pending:
            f.result()
    bar.close()
    made, seconds = _total(sum(map(len, mine)), world), time.perf_counter() - start
    if rank == 0:
        rate = made / max(seconds, 1e-9)
        print(f"done: {made} image{'s' * (made != 1)} in {seconds:.1f} s ({rate:.2f} images/s on {world} "
              f"process{'es' * (world > 1)}), {len(args.jobs) - len(missing)} already there, {len(args.jobs)} in {out}")
    return 0


def _error(message: str, rank: int = 0) -> int:
    if rank == 0:
        print("error: " + " ".join(message.splitlines()), file=sys.stderr)
    return 2


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except (CliError, PromptError) as e:
        return _error(str(e))
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars of the text encoders
    rank, world = _init_distributed(args.device)
    try:
        return generate(args, rank, world)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
