"""Train a FLUX.1 LoRA (dev or schnell) from a folder of captioned images (or WebDataset shards).

    python train_flux.py --config configs/flux_dev_lora_1024_24gb.yaml --data_dir ./my_images
    python train_flux.py --pretrained_model ./weights/flux1-dev --data_dir ./my_images --output_dir outputs/my_lora \\
        --image_size 1024 --lora_rank 16 --max_train_steps 2000 --gradient_checkpointing --cache_latents disk \\
        --cache_text_embeddings
    python train_flux.py --pretrained_model tiny-flux --data_dir data/demo/train --output_dir /tmp/tiny_flux \\
        --image_size 64 --max_train_steps 4 --device cpu                        # the tiny model, CPU, seconds

Writes output_dir/config.yaml, metrics.jsonl, samples/, checkpoints/step_XXXXXX/ and lora_final.safetensors
(kohya format with Black Forest Labs' names: loads in ComfyUI, Forge, kohya and diffusers' FluxPipeline).

SIGTERM / Ctrl-C save a checkpoint and exit 143 / 130; continue exactly with
    python train_flux.py --config outputs/my_lora/config.yaml --resume_from latest
"""

from common.cli import run_script


def main(argv=None) -> int:
    from training.cli import main as train_main  # here, so that a Ctrl-C while torch imports is one line

    return train_main(argv, "flux")


if __name__ == "__main__":
    run_script(main)
