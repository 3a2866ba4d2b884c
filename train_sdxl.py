"""Train an SDXL LoRA from a folder of captioned images (or WebDataset shards).

    python train_sdxl.py --config configs/tiny_demo.yaml                        # tiny model, CPU, ~1 min
    python train_sdxl.py --pretrained_model ./weights/sdxl-base-1.0 --data_dir ./my_images \\
        --output_dir outputs/my_lora --image_size 1024 --lora_rank 16 --max_train_steps 2000 \\
        --gradient_checkpointing --cache_latents disk --cache_text_embeddings
    torchrun --nproc_per_node 4 train_sdxl.py --config my_run.yaml              # 4 GPUs (batch_size per GPU)

Writes output_dir/config.yaml, metrics.jsonl, samples/, checkpoints/step_XXXXXX/ and
lora_final.safetensors (kohya format, loads in ComfyUI, A1111/Forge and diffusers).

SIGTERM / Ctrl-C save a checkpoint and exit 143 / 130; continue exactly with
    python train_sdxl.py --config outputs/my_lora/config.yaml --resume_from latest
"""

import os
import sys

from common.cli import print_error, run_script


def main(argv=None) -> int:
    from training.config import parse_or_exit  # here, so that a Ctrl-C while torch imports is one line (run_script)

    args = parse_or_exit(argv)
    from common.errors import AlreadyFinished, DataError, Stopped, TrainingError, WriteError
    from training.loop.train import train
    from training.run.checkpoints import what_is_intact

    try:
        summary = train(args)
    except WriteError as e:  # a full disk, no permission: what failed, what is intact
        return print_error(f"{e}; {what_is_intact(args.output_dir)}")
    except KeyboardInterrupt:  # before the loop (which saves a checkpoint first) or in a second stop
        print(f"interrupted; {what_is_intact(args.output_dir).split(';')[0]}", file=sys.stderr)
        return 130
    except AlreadyFinished as e:
        if os.environ.get("RANK", "0") == "0":
            print(e)
        return 0
    except Stopped as e:
        print(f"{e}\ncontinue with: python train_sdxl.py --config {args.output_dir}/config.yaml --resume_from latest",
              file=sys.stderr)
        return e.exit_code
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports
        print("done: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    run_script(main)
