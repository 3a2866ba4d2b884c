"""Extract a weights-only LoRA file from a training checkpoint, or convert a LoRA file between formats.

    python extract_lora_weights.py outputs/tiny_demo/checkpoints/step_000090 -o demo_lora.safetensors
    python extract_lora_weights.py outputs/tiny_demo/checkpoints/step_000090 -o demo_fp16.safetensors \\
        --format diffusers --dtype fp16
    python extract_lora_weights.py demo_lora.safetensors -o demo_diffusers.safetensors --format diffusers
    python extract_lora_weights.py demo_diffusers.safetensors --info
    python extract_lora_weights.py old_lora.pt -o old_lora.safetensors       # a .pt LoRA of the original scripts

CHECKPOINT is a `checkpoints/step_XXXXXX` folder (its LoRA weights; `--ema` for its EMA weights, which is
what lora_final.safetensors and `load_lora(folder)` use when the run kept them) or a LoRA file in any
format lora/reading.py reads (kohya with the vendor's or diffusers-style names, diffusers/peft), or a `.pt` LoRA
of the original scripts (a dict of tensors, read with torch.load(weights_only=True) only: lora/pt.py). Formats:
`kohya` (ComfyUI, A1111/Forge, kohya, diffusers) and `diffusers` (peft names, alpha / rank folded into
lora_B). The UNet a file belongs to (SDXL base or the tiny model) is found from its keys and shapes;
`--base` names it (e.g. a diffusers folder of another SDXL-shaped model). Built on the meta device: an
SDXL LoRA converts in the memory of the LoRA alone. The output is written to a temporary file and
renamed into place; an existing file is kept unless `--overwrite`.

Exit status: 0 done; 2 bad input (one line `error: ...` on stderr).
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

from common.cli import Parser, add_verbose, run_script
from common.console import quiet_libraries


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="extract_lora_weights.py", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoints/step_XXXXXX folder, a .safetensors "
                   "LoRA file (kohya or diffusers format) or a .pt LoRA of the original scripts (a dict of tensors)")
    p.add_argument("-o", "--output", metavar="OUT.safetensors", help="the LoRA file to write (not needed "
                   "with --info)")
    p.add_argument("--format", choices=["kohya", "diffusers"], default="kohya", help="kohya: lora_unet_* keys "
                   "with SGM names (ComfyUI, A1111/Forge, kohya, diffusers); diffusers: peft unet.*.lora_A/B keys "
                   "(diffusers' load_lora_weights) (default: kohya)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="tensor type of the output; "
                   "fp32 keeps the trained weights exactly, fp16/bf16 halve the file (default: fp32)")
    p.add_argument("--ema", action="store_true", help="from a checkpoint folder: its EMA weights instead of the "
                   "trained LoRA weights (an error if the run had no --use_ema)")
    p.add_argument("--base", metavar="NAME|PATH", help="the model the LoRA is for: sdxl (SDXL base), tiny, another "
                   "family's base name, or a diffusers model folder (default: a checkpoint's pretrained_model; for a "
                   "file, found from its names and shapes)")
    p.add_argument("--alpha", type=float, metavar="A", help="for a .pt file: the alpha of its layers that store "
                   "none (default: their rank, i.e. the update up @ down at scale 1)")
    p.add_argument("--info", action="store_true", help="print rank, alpha, targets, module count, base and "
                   "metadata of CHECKPOINT (and write -o only if given)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (default: refuse)")
    add_verbose(p)
    return p


def kind(weights) -> str:
    """LoRA on Linear layers, LoCon on convs, DoRA magnitudes: which of them a LoRA holds."""
    convs = sum(down.ndim == 4 for down, _, _ in weights.modules.values())
    parts = ["LoRA"] + ([f"LoCon ({convs} convs)"] if convs else []) + (["DoRA"] if weights.magnitudes else [])
    return " + ".join(parts)


def summary(weights, max_value: int = 100) -> str:
    """What --info prints: rank, alpha, targets, module count, base, dtype, metadata."""
    def counted(c: Counter) -> str:
        return ", ".join(f"{v:g}" + (f" ({n} layers)" if len(c) > 1 else "") for v, n in sorted(c.items()))

    alpha = counted(weights.alphas)
    trained = weights.metadata.get("sdxl_lora.alpha")
    if weights.source == "diffusers file" and trained and {float(trained)} != set(weights.alphas):
        alpha += f" (alpha / rank folded into lora_B; trained with alpha {float(trained):g})"
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for d, u, _ in weights.modules.values() for t in (d, u)})
    rows = [
        ("weights", weights.source),
        ("base", weights.base),
        ("rank", counted(weights.ranks)),
        ("alpha", alpha),
        ("targets", weights.target_mode),
        ("kind", kind(weights)),
        ("modules", str(len(weights.modules))),
        ("dtype", ", ".join(dtypes)),
        ("metadata", f"{len(weights.metadata)} keys"),
    ]
    lines = [f"{label:<10}{value}" for label, value in rows]
    for key in sorted(weights.metadata):
        value = weights.metadata[key]
        if len(value) > max_value or "\n" in value:
            first = value.splitlines()[0] if value.strip() else ""
            value = f"{first[:max_value]}... ({len(value)} characters, {len(value.splitlines())} lines)"
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    source = Path(args.checkpoint)
    out = Path(args.output) if args.output else None
    if out is None and not args.info:
        parser.error("give -o OUT.safetensors (or --info to only describe CHECKPOINT)")
    if out is not None and out.suffix != ".safetensors":
        parser.error(f"-o {out}: the output must be a .safetensors file")
    if args.alpha is not None and source.suffix not in (".pt", ".pth"):
        parser.error(f"--alpha is for .pt files; {source} is not one (other formats store their alpha)")
    if out is not None and out.exists() and (out.is_dir() or not args.overwrite):
        what = "is a folder" if out.is_dir() else "already exists; add --overwrite to replace it"
        print(f"error: -o {out} {what}", file=sys.stderr)
        return 2

    quiet_libraries(args.verbose)
    # imported here, so that --help and argument errors answer at once (torch takes seconds to import)
    import families
    from common.errors import CheckpointError
    from common.runtime import DTYPES
    from lora.files import write_lora
    from lora.pt import PT_SUFFIXES, read_pt_lora
    from lora.reading import read_lora
    from training.run.checkpoints import checkpoint_lora, complete_checkpoints, load_checkpoint

    try:
        if not source.exists():
            raise FileNotFoundError(f"{source} does not exist; give a checkpoints/step_XXXXXX folder or a "
                                    ".safetensors LoRA file")
        checkpoint = None
        candidates = families.lora_names(args.base) if args.base or not source.is_dir() else None
        if source.is_dir():
            if (source / "checkpoints").is_dir():
                latest = complete_checkpoints(source)
                hint = f", e.g. {latest[-1]} (the latest)" if latest else ""
                raise CheckpointError(f"{source} is a training output folder, not a checkpoint: give one of its "
                                      f"checkpoints/step_XXXXXX folders{hint}")
            checkpoint = load_checkpoint(source)
            weights = checkpoint_lora(checkpoint, ema=args.ema, base=args.base)
        else:
            if args.ema:
                raise ValueError(f"--ema is for checkpoint folders; {source} is a LoRA file")
            if source.suffix in PT_SUFFIXES:
                weights = read_pt_lora(source, candidates, alpha=args.alpha)
            else:
                weights = read_lora(source, candidates)
        if args.info:
            print(f"{source}\n{summary(weights)}")
        if out is not None:
            try:
                write_lora(weights, out, format=args.format, dtype=DTYPES[args.dtype])
            except OSError as e:
                raise ValueError(f"cannot write {out}: {e.strerror or e}; check the folder's permissions and free "
                                 "disk space") from e
            print(f"wrote {out} ({args.format} format, {args.dtype}, {len(weights.modules)} LoRA layers, "
                  f"{weights.source} of {source})")
        if checkpoint is not None and checkpoint.ema is not None and not args.ema:
            print("note: this checkpoint also holds EMA weights (what lora_final.safetensors and load_lora(folder) "
                  "use); add --ema for those")
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_script(main)
