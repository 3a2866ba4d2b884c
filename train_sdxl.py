"""Train an SDXL LoRA from a folder of captioned images (or WebDataset shards).

    python train_sdxl.py --config configs/tiny_demo.yaml                        # tiny model, CPU, ~1 min
    python train_sdxl.py --pretrained_model ./weights/sdxl-base-1.0 --data_dir ./my_images \\
        --output_dir outputs/my_lora --image_size 1024 --lora_rank 16 --max_train_steps 2000 \\
        --gradient_checkpointing --cache_latents disk --cache_text_embeddings
    torchrun --nproc_per_node 4 train_sdxl.py --config my_run.yaml              # 4 GPUs (batch_size per GPU)

Writes output_dir/config.yaml, metrics.jsonl, samples/, checkpoints/step_XXXXXX/ and
lora_final.safetensors (kohya format, loads in ComfyUI, A1111/Forge and diffusers).

SIGTERM / Ctrl-C / SIGHUP save a checkpoint and exit 143 / 130 / 129; continue exactly with
    python train_sdxl.py --config outputs/my_lora/config.yaml --resume_from latest
"""

from common.cli import run_script


def main(argv=None) -> int:
    from training.cli import main as train_main  # here, so that a Ctrl-C while torch imports is one line

    return train_main(argv, "sdxl")


if __name__ == "__main__":
    run_script(main)
