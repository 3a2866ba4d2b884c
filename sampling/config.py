"""generate_images.py's command line: every flag, checked and resolved before anything loads.

Bad input costs nothing and writes nothing: every value is checked here (one-line `error: ...`, exit 2),
the prompts are read and planned into one `ImageJob` per image (sampling/prompts.py), and only then does
sampling/generate.py check the output folder, load the model and make the images.
"""

import argparse
import math
from pathlib import Path

from common.cli import Parser, add_flag, add_verbose, fail
from common.files import check_writable
from sampling.prompts import MAX_SEED, PromptSpec, plan_images, read_prompt_file

PRECISIONS = ("fp32", "bf16", "fp16")  # common/runtime.py's DTYPES, named here so that --help needs no torch


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="generate_images.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate a COCO-style image folder (00000.png, 00000.txt, 00000.json, ...) from prompts with "
                    "SDXL, SD 3.5 or FLUX.1 and LoRAs. Re-running the same command fills in only the missing images.",
        epilog="examples:\n"
        "  python generate_images.py --pretrained-model ./weights/sdxl-base-1.0 \\\n"
        "      --lora-checkpoint my_lora.safetensors --prompt-file prompts.txt --num-images 1000 \\\n"
        "      --batch-size 4 --output-dir ./synthetic\n"
        "  python generate_images.py --pretrained-model tiny --prompt 'a red circle' --num-images 4 \\\n"
        "      --image-size 64 --num-inference-steps 4 --output-dir /tmp/tiny_images      # CPU, seconds\n"
        "  torchrun --nproc_per_node 8 generate_images.py ...   # shard the images over 8 GPUs",
    )
    g = p.add_argument_group("model")
    add_flag(g, "pretrained-model", "the base model (its family is found from it): a diffusers folder, the vendor's "
         "single .safetensors file, or a tiny CPU test model: tiny (SDXL), tiny-sd3, tiny-flux (required)",
         required=True, metavar="PATH")
    add_flag(g, "vae-model", "diffusers VAE folder to decode with, e.g. sdxl-vae-fp16-fix (default: the model's)",
         metavar="DIR")
    add_flag(g, "lora-checkpoint", "LoRA to merge: a .safetensors file (kohya or diffusers/peft keys) or a training "
         "checkpoint folder (checkpoints/step_000500); repeat the flag for several (default: none)",
         action="append", default=[], metavar="PATH")
    add_flag(g, "lora-scale", "strength of each LoRA: once for all of them, or once per --lora-checkpoint in the same "
         "order (default: 1.0)", action="append", type=float, default=[], metavar="S")

    g = p.add_argument_group("prompts")
    source = g.add_mutually_exclusive_group(required=True)
    add_flag(source, "prompt", "a prompt; repeat the flag for several (this or --prompt-file is required)",
         action="append", metavar="TEXT")
    add_flag(source, "prompt-file", ".txt with one prompt per line (blank and #-lines skipped), or .jsonl with "
         '{"prompt": ..., "negative_prompt": ..., "seed": ...} per line', metavar="FILE")
    add_flag(g, "negative-prompt", "negative prompt of every image (a .jsonl line's own wins); empty = the model's "
         "unconditional input, e.g. SDXL's zero embedding (default: empty)", default="", metavar="TEXT")
    add_flag(g, "num-images", "images to make; the prompts cycle in order (default: one per prompt)", type=int,
         metavar="N")
    add_flag(g, "shuffle-prompts", "cycle the prompts in an order shuffled with --seed (default: file order)",
         action="store_true")

    g = p.add_argument_group("sampling")
    add_flag(g, "image-size", "WIDTHxHEIGHT or one number for a square, multiples of 8; --resolution is the same "
             "flag (default: the model's, e.g. 1024 for SDXL)", metavar="WxH", aliases=("resolution",))
    add_flag(g, "num-inference-steps", "sampler steps, 1..1000 (default: the model's, e.g. 30 for SDXL)", type=int,
             metavar="N")
    add_flag(g, "guidance-scale", "classifier-free guidance; <= 1 turns it off; FLUX.1-dev: the value of its "
             "guidance embedding (no second pass), schnell ignores it (default: the model's: SDXL 5.0, FLUX.1-dev "
             "3.5)", type=float, metavar="G")
    add_flag(g, "true-cfg-scale", "FLUX.1: true classifier-free guidance against --negative-prompt (two transformer "
             "passes per step), as FluxPipeline's true_cfg_scale; > 1 turns it on (default: 1, off)", type=float,
             metavar="G")
    add_flag(g, "scheduler", "sampler: SDXL euler, euler_a, ddim, dpmpp_2m, each also with _karras (Karras sigmas) "
             "(default: the model's, e.g. euler for SDXL)", metavar="NAME")
    add_flag(g, "seed", "image i is seeded seed + i (a .jsonl line's seed wins) (default: 0)", type=int, default=0)
    add_flag(g, "batch-size", "images per UNet batch and device; results do not depend on it beyond float rounding "
         "(default: 1)", type=int, default=1, metavar="N")

    g = p.add_argument_group("output")
    add_flag(g, "output-dir", "folder of 00000.png, 00000.txt, 00000.json, ... (created; required)", required=True,
         metavar="DIR")
    add_flag(g, "save-metadata", "write the .json of each image (settings, seed, LoRAs) (default: on)",
         action=argparse.BooleanOptionalAction, default=True)
    add_flag(g, "overwrite", "regenerate images already in --output-dir (default: keep them, make only the missing)",
         action="store_true")

    g = p.add_argument_group("hardware")
    add_flag(g, "precision", "UNet and text-encoder dtype; the VAE is always fp32; auto = bf16 on a GPU (fp16 where "
         "bf16 is unsupported), fp32 on CPU (default: auto)", choices=["auto", *PRECISIONS], default="auto")
    add_flag(g, "device", "cpu, cuda or cuda:N; auto = cuda if available (under torchrun: cuda:LOCAL_RANK) (default: "
         "auto)", default="auto")
    add_flag(g, "compile", "torch.compile each ResNet and transformer block (regional; worth it for hundreds of "
         "images: ~1 min start-up on a GPU) (default: off)", action="store_true")
    add_verbose(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check every flag; resolve sizes, device, precision, LoRA scales, prompts (a one-line ConfigError
    or PromptError for anything wrong)."""
    args = build_parser().parse_args(argv)
    from common.runtime import resolve_device  # here, after parsing: --help and flag errors need no torch
    from sampling.inference import parse_size

    for name in ("guidance_scale", "true_cfg_scale", "lora_scale"):
        for value in args.lora_scale if name == "lora_scale" else [getattr(args, name) or 0.0]:
            if not math.isfinite(value):
                fail(name.replace("_", "-"), value, "must be a finite number")
    family = _check_paths(args)
    defaults = family.defaults(args.pretrained_model)  # what was left out is the model's
    args.image_size = args.image_size or f"{defaults['width']}x{defaults['height']}"
    args.num_inference_steps = defaults["steps"] if args.num_inference_steps is None else args.num_inference_steps
    args.guidance_scale = defaults["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
    args.scheduler = args.scheduler or defaults["sampler"]
    if args.true_cfg_scale is not None and "true_cfg_scale" not in defaults:
        fail("true-cfg-scale", args.true_cfg_scale, f"is for FLUX.1; {family.TITLE}'s --guidance-scale is its "
             "classifier-free guidance")
    args.true_cfg_scale = defaults.get("true_cfg_scale") if args.true_cfg_scale is None else args.true_cfg_scale
    if args.true_cfg_scale is not None and args.true_cfg_scale < 0:
        fail("true-cfg-scale", args.true_cfg_scale, "must be >= 0 (> 1 turns true CFG on)")
    if args.scheduler not in family.SAMPLERS:
        fail("scheduler", args.scheduler, f"invalid choice for {family.TITLE}: use one of "
             f"{', '.join(family.SAMPLERS)}")
    try:
        args.width, args.height = parse_size(args.image_size)
    except ValueError as e:
        fail("image-size", args.image_size, str(e))
    if not 1 <= args.num_inference_steps <= 1000:
        fail("num-inference-steps", args.num_inference_steps, "must be in 1..1000, e.g. 30")
    if args.guidance_scale < 0:
        fail("guidance-scale", args.guidance_scale, "must be >= 0 (SDXL: 5 to 8; <= 1 turns guidance off)")
    if args.batch_size < 1:
        fail("batch-size", args.batch_size, "must be >= 1")
    if args.num_images is not None and args.num_images < 1:
        fail("num-images", args.num_images, "must be >= 1")
    args.device, args.precision = resolve_device(args.device, args.precision)

    specs = read_prompt_file(args.prompt_file) if args.prompt_file else [PromptSpec(p) for p in args.prompt]
    args.num_images = args.num_images or len(specs)
    if not 0 <= args.seed <= MAX_SEED - args.num_images:
        fail("seed", args.seed, f"must be in [0, 2^63 - {args.num_images}] (image i uses seed + i)")
    args.jobs = plan_images(specs, args.num_images, args.seed, args.negative_prompt, args.shuffle_prompts)
    check_writable("output-dir", args.output_dir)  # now, not after the models load
    return args


def _check_paths(args: argparse.Namespace):
    """The model (-> its family module), VAE, LoRAs and output folder, checked and made absolute."""
    import families  # here: --help needs no torch

    if not args.pretrained_model.startswith("tiny"):
        args.pretrained_model = str(Path(args.pretrained_model).expanduser().absolute())
    family = families.name_of(args.pretrained_model)
    if family is None:
        problem = families.get("sdxl").model_problem(args.pretrained_model) or "is not a model of a known family " \
            "(SDXL, SD 3.5, FLUX.1): no model_index.json naming its pipeline and no single-file layout we know"
        fail("pretrained-model", args.pretrained_model, problem)
    family = families.get(family)
    if problem := family.model_problem(args.pretrained_model):
        fail("pretrained-model", args.pretrained_model, problem)
    if args.vae_model:
        args.vae_model = str(Path(args.vae_model).expanduser().absolute())
        if problem := family.vae_problem(args.vae_model):
            fail("vae-model", args.vae_model, problem)
    loras = [Path(p).expanduser().absolute() for p in args.lora_checkpoint]
    for path in loras:
        if not path.exists():
            fail("lora-checkpoint", path, "does not exist; give a LoRA .safetensors file or a training checkpoint "
                  "folder (OUTPUT_DIR/checkpoints/step_XXXXXX)")
        if path.suffix in (".pt", ".pth") and path.is_file():  # the original scripts' LoRAs: pickles, never loaded
            fail("lora-checkpoint", path, "is a .pt file, which is never loaded here (a pickle can run code); convert "
                 f"it once with: python extract_lora_weights.py {path} -o {path.with_suffix('.safetensors')}")
    scales = args.lora_scale or [1.0]
    if not loras and args.lora_scale:
        fail("lora-scale", args.lora_scale[0], "needs a --lora-checkpoint to apply to; add one or drop the scale")
    if len(scales) == 1:
        scales = scales * len(loras)
    elif len(scales) != len(loras):
        fail("lora-scale", " ".join(map(str, scales)), f"{len(scales)} scales for {len(loras)} --lora-checkpoint; "
              "give one scale for all, or one per LoRA")
    args.loras = [(str(p), float(s)) for p, s in zip(loras, scales, strict=True)]
    out = Path(args.output_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        fail("output-dir", out, "is an existing file; give a folder (it is created if missing)")
    args.output_dir = out
    return family


def run_settings(args: argparse.Namespace) -> dict:
    """What every image of the run shares, as written to (and checked against) each .json."""
    settings = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
                "sampler": args.scheduler, "width": args.width, "height": args.height,
                "base_model": args.pretrained_model, "vae_model": args.vae_model,
                "loras": [{"path": p, "scale": s} for p, s in args.loras], "precision": args.precision}
    if getattr(args, "true_cfg_scale", None) is not None:  # a family option (FLUX.1); others' .json are unchanged
        settings["true_cfg_scale"] = args.true_cfg_scale
    return settings
