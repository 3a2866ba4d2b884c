"""Generate a COCO-style image dataset (00000.png, 00000.txt, 00000.json, ...) from prompts with SDXL + LoRAs.

    python generate_images.py --pretrained-model ./weights/sdxl-base-1.0 --lora-checkpoint my_lora.safetensors \\
        --prompt-file prompts.txt --num-images 1000 --batch-size 4 --output-dir ./synthetic
    python generate_images.py --pretrained-model tiny --prompt "a red circle" --num-images 4 --image-size 64 \\
        --num-inference-steps 4 --output-dir /tmp/tiny_images                # tiny model, CPU, seconds
    torchrun --nproc_per_node 8 generate_images.py ...                       # shard the images over 8 GPUs

Re-running the same command makes only the images still missing; `--overwrite` remakes them all.
Flags and their checks: `python generate_images.py --help` and sampling/config.py; the run: sampling/generate.py.
"""

import sys

from common.cli import print_error, run_script, signal_name
from common.console import quiet_libraries
from common.errors import WriteError, interrupt_status

KEPT = ("the images in {out} with their .txt are complete and kept; free disk space if needed and re-run the same "
        "command: it makes only the missing ones")


def main(argv=None) -> int:
    from sampling.config import parse_args  # its flags parse before torch imports: --help answers at once

    quiet_libraries()  # before the checks import transformers and diffusers; --verbose turns them back on
    try:
        args = parse_args(argv)
        from training.run.checkpoints import lora_file_of

        lora_files = [(str(lora_file_of(path)), scale) for path, scale in args.loras]  # a checkpoint -> its file
    except (ValueError, FileNotFoundError) as e:  # ConfigError, PromptError, a damaged checkpoint folder
        return print_error(str(e))
    quiet_libraries(args.verbose)
    from common.runtime import close_world, init_world
    from sampling.generate import generate

    try:
        world = init_world(args.device)  # a broken torchrun environment: one line naming the variable
    except ValueError as e:
        return print_error(str(e))
    try:
        return generate(args, world, lora_files)
    except WriteError as e:  # a full disk: the complete image groups stay, a re-run makes the rest
        return print_error(f"{e}; {KEPT.format(out=args.output_dir)}")
    except KeyboardInterrupt as e:  # Ctrl-C; SIGTERM and SIGHUP too (run_script): the writes under way finish first
        print(f"interrupted ({signal_name(e)}); {KEPT.format(out=args.output_dir)}", file=sys.stderr)
        return interrupt_status(e)
    finally:
        close_world(world)


if __name__ == "__main__":
    run_script(main)
