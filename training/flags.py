"""The flags of `train_sdxl.py`, by section, each with a practical help string and its default.

Every flag has an underscore and a dash spelling (`--image_size`, `--image-size`) and can also be a key of a
YAML file given with `--config` (training/config.py reads, resolves and checks them).
"""

import argparse

from common.cli import Parser, add_flag
from training.loop.optim import OPTIMIZERS
from training.loop.timesteps import LOSS_WEIGHTING, TIMESTEP_SAMPLING

DATA_HINT = "give a folder of images with .txt captions, a .tar shard, or a pattern like shards/{000000..000099}.tar"


def build_parser() -> argparse.ArgumentParser:
    """The flat, grouped parser of train_sdxl.py. Required flags may come from --config instead."""
    p = Parser(
        prog="train_sdxl.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an SDXL LoRA from a folder of captioned images (or .tar shards).",
        epilog="examples:\n"
        "  python train_sdxl.py --pretrained_model ./weights/sdxl-base-1.0 --data_dir ./data/dogs \\\n"
        "      --output_dir ./outputs/dogs --lora_rank 16 --cache_latents disk\n"
        "  python train_sdxl.py --config configs/tiny_demo.yaml --device cpu    # tiny CPU run",
    )
    flag, req = argparse.BooleanOptionalAction, "(required, here or in --config)"
    g = p.add_argument_group("data")
    add_flag(g, "data_dir", "training images: a folder of images with same-named .txt captions, a .tar shard, or a "
         "pattern shards/{000000..000099}.tar (required, here or in --config, unless --dataset_config)",
         metavar="DIR")
    add_flag(g, "dataset_config", "YAML listing several image folders (`subsets:`), each with its num_repeats and "
             "caption settings, instead of --data_dir; see training/data/dataset_config.py (default: none)",
             metavar="FILE.yaml")
    add_flag(g, "caption_extension", "caption files beside the images: IMAGE_STEM + this, e.g. .caption; in shards "
             "the member of that name (default: .txt)", default=".txt", metavar="EXT")
    add_flag(g, "caption_prefix", "put before every caption with a space, e.g. a trigger word 'sks,' "
             "(default: none)", default="", metavar="TEXT")
    add_flag(g, "caption_suffix", "put after every caption with a space (default: none)", default="", metavar="TEXT")
    add_flag(g, "keep_tokens_separator", "tags before this separator (e.g. |||) stay in place with --shuffle_tags; a "
             "second one fixes the tags after it; removed from the caption (default: none)", default="",
             metavar="SEP")
    add_flag(g, "val_data_dir", "held-out images for a validation loss, as --data_dir (default: none)", metavar="DIR")
    add_flag(g, "image_size", "training size in pixels, a multiple of 64; buckets hold about image_size^2 pixels; "
         "--resolution is the same flag (default: 1024)", type=int, default=1024, metavar="PX",
             aliases=("resolution",))
    add_flag(g, "bucketing", "aspect-ratio buckets instead of square crops (default: on)", action=flag, default=True)
    add_flag(g, "center_crop", "center crops instead of random crops; always on with --cache_latents (default: off)",
         action=flag, default=False)
    add_flag(g, "random_flip", "horizontal flips; with cached latents both flips are cached (default: off)",
             action=flag,
         default=False)
    add_flag(g, "caption_dropout", "chance of an empty caption (CFG) (default: 0.0)", type=float, default=0.0,
             metavar="P")
    add_flag(g, "shuffle_tags", "shuffle the comma-separated tags of a caption each time it is used; not with "
         "--cache_text_embeddings (default: off)", action=flag, default=False)
    add_flag(g, "keep_tokens", "--shuffle_tags keeps the first N tags (default: 0)", type=int, default=0, metavar="N")
    add_flag(g, "masked_loss", "weight the loss by a mask per image: IMAGE_STEM_mask.png beside it, --mask_dir, or "
             "--alpha_mask; white = learn, black = ignore; images without one learn everywhere (default: off)",
             action=flag, default=False)
    add_flag(g, "mask_dir", "--masked_loss: the masks are MASK_DIR/IMAGE_STEM.png (default: beside the images)",
             metavar="DIR")
    add_flag(g, "alpha_mask", "--masked_loss: the mask is each image's alpha channel (default: off)", action=flag,
             default=False)
    add_flag(g, "max_bad_fraction", "unreadable images are skipped; stop when more than this fraction are bad "
         "(default: 0.05)", type=float, default=0.05, metavar="F")
    add_flag(g, "num_workers", "data loader processes; 0 = the main process (default: 2)", type=int, default=2,
             metavar="N")

    g = p.add_argument_group("model")
    add_flag(g, "pretrained_model", f"SDXL base: a diffusers folder, a single-file .safetensors, or `tiny` (the tiny "
         f"CPU test model) {req}", required=True, metavar="PATH")
    add_flag(g, "vae_model", "diffusers VAE folder to use, e.g. sdxl-vae-fp16-fix (default: the model's)",
             metavar="DIR")

    g = p.add_argument_group("LoRA")
    add_flag(g, "lora_rank", "rank of each LoRA (default: 16)", type=int, default=16, metavar="R")
    add_flag(g, "lora_alpha", "updates are scaled by alpha/rank (default: --lora_rank)", type=float, metavar="A")
    add_flag(g, "use_lora", "accepted so that commands of the original scripts run; does nothing: LoRA is always "
             "on (default: off)", action="store_true")
    add_flag(g, "lora_dropout", "dropout on the LoRA input (default: 0.0)", type=float, default=0.0, metavar="P")
    add_flag(g, "lora_target_mode", "attention = to_q/k/v; attention_out = + to_out.0; all = every Linear of the "
         "transformer blocks, as kohya (default: attention_out)", choices=["attention", "attention_out", "all"],
         default="attention_out")
    add_flag(g, "conv_rank", "LoCon: also put a LoRA of this rank on the UNet's 3x3 convs (ResNets, down/upsamplers), "
         "as kohya's conv_dim; 0 = none (default: 0)", type=int, default=0, metavar="R")
    add_flag(g, "conv_alpha", "LoCon updates are scaled by conv_alpha/conv_rank (default: --conv_rank)", type=float,
             metavar="A")
    add_flag(g, "train_text_encoder", "also train a LoRA (--lora_rank/--lora_alpha/--lora_dropout, plain LoRA) on both "
             "CLIP text encoders, saved as lora_te1_/lora_te2_ (kohya) and text_encoder./text_encoder_2. (diffusers); "
             "not with --cache_text_embeddings (default: off)", action=flag, default=False)
    add_flag(g, "text_encoder_target_mode", "--train_text_encoder: attention = self-attention q/k/v/out_proj, all = "
             "those and the MLP's fc1/fc2 (default: attention)", choices=["attention", "all"], default="attention")
    add_flag(g, "text_encoder_lr", "--train_text_encoder: the text encoders' peak learning rate (default: "
             "--learning_rate)", type=float, metavar="LR")
    add_flag(g, "use_dora", "DoRA (arXiv:2402.09353): also train a magnitude per output channel of every adapted "
         "layer (default: off)", action=flag, default=False)

    g = p.add_argument_group("optimization")
    add_flag(g, "batch_size", "images per step and device (default: 1)", type=int, default=1, metavar="N")
    add_flag(g, "gradient_accumulation_steps", "micro-batches per step (default: 1)", type=int, default=1, metavar="N")
    add_flag(g, "num_epochs", "passes over the data (default: 1)", type=int, default=1, metavar="N")
    add_flag(g, "max_train_steps", "optimizer steps; overrides --num_epochs (default: none)", type=int, metavar="N")
    add_flag(g, "learning_rate", "peak learning rate (default: 1.0 with prodigy, which finds its own step size; "
             "else 1e-4)", type=float, metavar="LR")
    add_flag(g, "optimizer", "adamw = torch.optim.AdamW; adamw8bit = bitsandbytes AdamW8bit, less memory (CUDA); "
             "prodigy = Prodigy, learning-rate free (prodigyopt); adamw_schedulefree = schedule-free AdamW, no LR "
             "schedule, its eval-mode weights are validated and saved (schedulefree); adafactor = transformers' "
             "Adafactor at a fixed --learning_rate (prodigy and schedule-free: `pip install -e .[recipes]`) "
             "(default: adamw)", choices=list(OPTIMIZERS), default="adamw")
    add_flag(g, "prodigy_d_coef", "Prodigy: scales its estimated step size d (default: 1.0)", type=float, default=1.0,
             metavar="C")
    add_flag(g, "prodigy_use_bias_correction", "Prodigy: Adam's bias correction, as kohya users usually set "
             "(default: off)", action=flag, default=False)
    add_flag(g, "prodigy_safeguard_warmup", "Prodigy: keep d from growing too fast during --warmup_steps "
             "(default: off)", action=flag, default=False)
    add_flag(g, "weight_decay", "AdamW weight decay (default: 1e-2)", type=float, default=1e-2, metavar="WD")
    add_flag(g, "adam_beta1", "Adam beta1 (default: 0.9)", type=float, default=0.9, metavar="B")
    add_flag(g, "adam_beta2", "Adam beta2 (default: 0.999)", type=float, default=0.999, metavar="B")
    add_flag(g, "adam_epsilon", "Adam epsilon (default: 1e-8)", type=float, default=1e-8, metavar="EPS")
    add_flag(g, "lr_scheduler", "learning-rate schedule after the warmup (default: constant)",
         choices=["constant", "linear", "cosine"], default="constant")
    add_flag(g, "lr_schedule_total", "steps the LR schedule decays over; give the longest run you may extend to, so "
             "that a later, larger --max_train_steps continues the same curve (default: the run's length)", type=int,
             metavar="N")
    add_flag(g, "warmup_steps", "optimizer steps of linear warmup (default: 0)", type=int, default=0, metavar="N")
    add_flag(g, "max_grad_norm", "clip the gradient norm; 0 = off (default: 1.0)", type=float, default=1.0, metavar="N")
    add_flag(g, "min_timestep", "lowest timestep trained, 0..999 (default: 0)", type=int, default=0, metavar="T")
    add_flag(g, "max_timestep", "highest timestep trained, 0..999 (default: 999)", type=int, default=999, metavar="T")
    add_flag(g, "prediction_type", "epsilon (SDXL base) or v_prediction (v-models) (default: epsilon)",
         choices=["epsilon", "v_prediction"], default="epsilon")
    add_flag(g, "min_snr_gamma", "gamma of --loss_weighting min_snr (Hang et al. 2023), 5 is typical; a value > 0 "
             "alone turns min_snr on (default: 0; 5 with --loss_weighting min_snr)", type=float, default=0.0,
             metavar="G")
    add_flag(g, "noise_offset", "offset noise strength, e.g. 0.0357 (default: 0.0)", type=float, default=0.0,
             metavar="X")
    add_flag(g, "max_nonfinite_steps", "steps with a NaN/inf loss are skipped; stop after this many in a row "
         "(default: 5)", type=int, default=5, metavar="N")
    add_flag(g, "seed", "seed of data order, noise, timesteps and LoRA init (default: 0)", type=int, default=0)
    add_flag(g, "use_ema", "keep and save an EMA of the LoRA weights (default: off)", action=flag, default=False)
    add_flag(g, "ema_decay", "EMA decay per optimizer step (default: 0.999)", type=float, default=0.999, metavar="D")

    g = p.add_argument_group("timesteps, noise & loss weighting (training/loop/timesteps.py)")
    add_flag(g, "timestep_sampling", "density of the trained timesteps: uniform; logit_normal (SD3) favours the "
             "middle; mode (SD3) by --mode_scale (default: uniform)", choices=list(TIMESTEP_SAMPLING),
             default="uniform")
    add_flag(g, "logit_mean", "logit_normal: mean of the normal before the sigmoid (default: 0.0)", type=float,
             default=0.0, metavar="M")
    add_flag(g, "logit_std", "logit_normal: std of the normal before the sigmoid (default: 1.0)", type=float,
             default=1.0, metavar="S")
    add_flag(g, "mode_scale", "mode: > 0 favours the middle timesteps, < 0 the ends (default: 1.29)", type=float,
             default=1.29, metavar="S")
    add_flag(g, "loss_weighting", "per-sample loss weights: none; min_snr = Min-SNR-gamma (Hang et al. 2023); "
             "debiased = 1/sqrt(SNR) (Yu et al. 2024); the validation loss is never weighted (default: none)",
             choices=list(LOSS_WEIGHTING), default="none")
    add_flag(g, "multires_noise_iterations", "multi-resolution (pyramid) noise levels, 6-10 is typical; 0 = off "
             "(default: 0)", type=int, default=0, metavar="N")
    add_flag(g, "multires_noise_discount", "weight ratio of each coarser noise level, 0.1-0.3 (default: 0.3)",
             type=float, default=0.3, metavar="D")
    add_flag(g, "input_perturbation", "extra noise on the UNet's input only (Ning et al. 2023), 0.1 is typical; "
             "0 = off (default: 0.0)", type=float, default=0.0, metavar="G")

    g = p.add_argument_group("precision & memory")
    add_flag(g, "precision", "UNet autocast dtype; LoRA weights and the VAE stay fp32; fp16 needs a GPU. auto = bf16 "
         "on a GPU (fp16 where bf16 is unsupported), fp32 on a CPU, where bf16 is emulated and many times slower "
         "(default: auto)", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    add_flag(g, "compile", "torch.compile each ResNet and transformer block (regional: the repeated blocks compile "
         "once; start-up ~1 min on a GPU, then faster steps) (default: off)", action=flag, default=False)
    add_flag(g, "gradient_checkpointing", "recompute activations in backward: far less memory, ~30%% slower "
         "(default: off)", action=flag, default=False)
    add_flag(g, "device", "cpu, cuda or cuda:N; auto = cuda if available, else cpu (default: auto)", default="auto")

    g = p.add_argument_group("caching")
    add_flag(g, "cache_latents", "VAE-encode each image once, kept in memory or on disk (default: none)",
         choices=["none", "memory", "disk"], default="none")
    add_flag(g, "cache_text_embeddings", "encode each caption once, then free the text encoders (default: off)",
         action=flag, default=False)
    add_flag(g, "cache_dir", "folder of the disk caches (default: OUTPUT_DIR/cache)", metavar="DIR")

    g = p.add_argument_group("output & checkpoints")
    add_flag(g, "output_dir", f"LoRA, checkpoints/, config.yaml, logs {req}", required=True, metavar="DIR")
    add_flag(g, "save_interval", "resumable checkpoint every N optimizer steps; 0 = only the final LoRA (default: 500)",
         type=int, default=500, metavar="N")
    add_flag(g, "save_every_n_epochs", "also a checkpoint after every N epochs; 0 = off (default: 0)", type=int,
         default=0, metavar="N")
    add_flag(g, "keep_last", "keep only the newest N checkpoints; 0 = keep all (default: 0)", type=int, default=0,
         metavar="N")
    add_flag(g, "resume_from", "continue a run exactly from a checkpoints/step_XXXXXX folder, or 'latest' (the newest "
         "complete one in OUTPUT_DIR; starts fresh if there is none) (default: none)", metavar="PATH|latest")
    add_flag(g, "overwrite_output_dir", "start afresh in an OUTPUT_DIR that holds a previous run, deleting its "
         "checkpoints, samples, metrics and LoRA (default: off: such a folder is an error)", action=flag,
         default=False)
    add_flag(g, "save_format", "kohya keys (ComfyUI, A1111, kohya, diffusers) or diffusers/peft keys (default: kohya)",
         choices=["kohya", "diffusers"], default="kohya")
    add_flag(g, "config", "YAML of flag: value defaults; flags given here win (default: none)", metavar="FILE.yaml")

    g = p.add_argument_group("validation & logging")
    add_flag(g, "validation_prompts", "prompts to sample, or one .txt file with a prompt per line (default: none)",
         nargs="*", default=[], metavar="PROMPT")
    add_flag(g, "validation_interval", "sample them every N optimizer steps; 0 = only at the end (default: 100)",
         type=int, default=100, metavar="N")
    add_flag(g, "num_validation_images", "images per validation prompt (default: 4)", type=int, default=4, metavar="N")
    add_flag(g, "eval_interval", "score the LoRA every N optimizer steps (and at the first and last): KID, and the "
             "CLIP score with --clip_model, of --eval_num_images images generated for the validation prompts "
             "against --eval_real_dir; needs the eval extra and --inception_weights; 0 = off (default: 0)",
             type=int, default=0, metavar="N")
    add_flag(g, "eval_num_images", "images generated per evaluation, the validation prompts in turn, image i "
             "seeded i (default: 32)", type=int, default=32, metavar="N")
    add_flag(g, "eval_real_dir", "the real images KID compares with (default: --data_dir)", metavar="DIR")
    add_flag(g, "inception_weights", "the TorchScript Inception-v3 of clean-fid/StyleGAN for KID (default: "
             "~/.cache/sdxl-lora/inception-2015-12-05.pt; README, 'Evaluating')", metavar="FILE")
    add_flag(g, "clip_model", "a local transformers CLIP folder: adds the CLIP score to --eval_interval "
             "(default: none)", metavar="DIR")
    add_flag(g, "keep_best", "keep checkpoints/best/ (and lora_best.safetensors at the end) for the lowest KID or "
             "validation loss; none = off (default: none)", choices=["none", "kid", "val_loss"], default="none")
    add_flag(g, "wandb_project", "log to this Weights & Biases project; needs wandb (default: off)", metavar="NAME")
    add_flag(g, "wandb_run_name", "W&B run name (default: chosen by wandb)", metavar="NAME")
    add_flag(g, "log_interval", "log every N optimizer steps (default: 1)", type=int, default=1, metavar="N")
    return p
