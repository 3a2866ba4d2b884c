"""Generate a COCO-style image dataset (00000.png, 00000.txt, 00000.json, ...) from prompts with SDXL + LoRAs.

    python generate_images.py --pretrained-model ./weights/sdxl-base-1.0 --lora-checkpoint my_lora.safetensors \\
        --prompt-file prompts.txt --num-images 1000 --batch-size 4 --output-dir ./synthetic
    python generate_images.py --pretrained-model tiny --prompt "a red circle" --num-images 4 --image-size 64 \\
        --num-inference-steps 4 --output-dir /tmp/tiny_images                # tiny model, CPU, seconds
    torchrun --nproc_per_node 8 generate_images.py ...                       # shard the images over 8 GPUs

Re-running the same command makes only the images still missing; `--overwrite` remakes them all.
Flags, file formats and the checks: `python generate_images.py --help` and sampling/cli.py.
"""

import sys

from sampling.cli import main

if __name__ == "__main__":
    sys.exit(main())
