"""Train a Stable Diffusion 3.5 LoRA from a folder of captioned images (or WebDataset shards).

    python train_sd3.py --config configs/sd35_medium_lora_1024_24gb.yaml --data_dir ./my_images
    python train_sd3.py --pretrained_model ./weights/sd3.5-large --data_dir ./my_images --output_dir outputs/my_lora \\
        --image_size 1024 --lora_rank 16 --max_train_steps 2000 --gradient_checkpointing --cache_latents disk \\
        --cache_text_embeddings --no-t5
    python train_sd3.py --pretrained_model tiny-sd3 --data_dir data/demo/train --output_dir /tmp/tiny_sd3 \\
        --image_size 64 --max_train_steps 4 --device cpu --validation_prompts    # tiny model, CPU, seconds
    torchrun --nproc_per_node 4 train_sd3.py --config my_run.yaml              # 4 GPUs (batch_size per GPU)

Writes output_dir/config.yaml, metrics.jsonl, samples/, checkpoints/step_XXXXXX/ and lora_final.safetensors
(kohya format: SAI names, loads in ComfyUI and kohya; --save_format diffusers for diffusers' load_lora_weights).

SIGTERM / Ctrl-C / SIGHUP save a checkpoint and exit 143 / 130 / 129; continue exactly with
    python train_sd3.py --config outputs/my_lora/config.yaml --resume_from latest
"""

from common.cli import run_script


def main(argv=None) -> int:
    from training.cli import main as train_main  # here, so that a Ctrl-C while torch imports is one line

    return train_main(argv, "sd3")


if __name__ == "__main__":
    run_script(main)
