"""The flags of the trainers (`train_sdxl.py`, `train_sd3.py`, `train_flux.py`): one table, by section.

Each field below is one flag: its type (the annotation), default, help, and the rule its value must meet, whether it
must equal a checkpoint's value on resume (`must_match`), and the default it had when it was added (`since`: a
checkpoint written before the flag existed ran with that value). Adding a flag is adding a field. Every flag has an
underscore and a dash spelling (`--image_size`, `--image-size`) and can be a key of a YAML file given with `--config`;
training/config.py builds the parser from this table, reads the YAML, resolves derived values and checks them, and
`Settings.of` turns the result into the typed sections every other module takes (training/loop/ takes `Settings`,
the rest one section each).
"""

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import NamedTuple

from common.cli import Parser, add_flag


class Rule(NamedTuple):
    accepts: typing.Callable
    what: str  # what the value must be, for the error message


AT_LEAST_1 = Rule(lambda v: v >= 1, ">= 1")
NOT_NEGATIVE = Rule(lambda v: v >= 0, ">= 0")
POSITIVE = Rule(lambda v: v > 0, "> 0")
UNIT = Rule(lambda v: 0 <= v < 1, "in [0, 1)")
FRACTION = Rule(lambda v: 0 <= v <= 1, "in [0, 1], e.g. 0.05")
DISCOUNT = Rule(lambda v: 0 < v <= 1, "in (0, 1], e.g. 0.3")
DECAY = Rule(lambda v: 0 < v < 1, "in (0, 1), e.g. 0.999")
TIMESTEP = Rule(lambda v: 0 <= v <= 999, "in [0, 999]")
SEED = Rule(lambda v: 0 <= v < 2**32, "in [0, 2^32)")
OPTIONAL_AT_LEAST_1 = Rule(lambda v: v is None or v >= 1, ">= 1")
OPTIONAL_POSITIVE = Rule(lambda v: v is None or v > 0, "> 0")
STEPS = Rule(lambda v: v is None or v >= 1, ">= 1, or left out to train --num_epochs epochs")
SCHEDULE_STEPS = Rule(lambda v: v is None or v >= 1, ">= 1, or left out to decay over the run's length")
SIZE_MULTIPLE = 32  # every family's latents are 1/8 of the image, and its model halves them (or packs 2x2) twice more
IMAGE_SIZE = Rule(lambda v: v >= 2 * SIZE_MULTIPLE and v % SIZE_MULTIPLE == 0,
                  f"a multiple of {SIZE_MULTIPLE}, at least {2 * SIZE_MULTIPLE}, e.g. 512 or 1024")
NOT_GIVEN = object()


def flag(default, help: str, *, metavar: str | None = None, choices: tuple | None = None, rule: Rule | None = None,
         must_match: bool = False, since=NOT_GIVEN, path: bool = False, aliases: tuple[str, ...] = (),
         required: bool = False, action: str | None = None, families: tuple[str, ...] | None = None):
    """A field of a settings section that is also a command-line flag (see the module docstring). `families`: the
    model families it applies to (default: all); a value other than the default elsewhere is an error."""
    meta = dict(help=help, metavar=metavar, choices=choices, rule=rule, must_match=must_match, since=since, path=path,
                aliases=aliases, required=required, action=action, families=families)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataSettings:
    """Where the images and captions come from and how they become batches (training/data/)."""

    data_dir: str | None = flag(None, 'training images: a folder of images with same-named .txt captions, a .tar '
        'shard, or a pattern shards/{000000..000099}.tar (required, here or in --config, unless --dataset_config)',
        metavar='DIR', must_match=True, path=True)
    dataset_config: str | None = flag(None, 'YAML listing several image folders (`subsets:`), each with its '
        'num_repeats and caption settings, instead of --data_dir; see training/data/dataset_config.py (default: none)',
        metavar='FILE.yaml', must_match=True, since=None, path=True)
    caption_extension: str = flag('.txt', 'caption files beside the images: IMAGE_STEM + this, e.g. .caption; in '
        'shards the member of that name (default: .txt)', metavar='EXT', must_match=True, since='.txt')
    caption_prefix: str = flag('', "put before every caption with a space, e.g. a trigger word 'sks,' (default: none)",
        metavar='TEXT', must_match=True, since='')
    caption_suffix: str = flag('', 'put after every caption with a space (default: none)',
        metavar='TEXT', must_match=True, since='')
    keep_tokens_separator: str = flag('', 'tags before this separator (e.g. |||) stay in place with --shuffle_tags; a '
        'second one fixes the tags after it; removed from the caption (default: none)',
        metavar='SEP', must_match=True, since='')
    val_data_dir: str | None = flag(None, 'held-out images for a validation loss, as --data_dir (default: none)',
        metavar='DIR', path=True)
    image_size: int = flag(1024, 'training size in pixels, a multiple of 32; buckets hold about image_size^2 pixels; '
        '--resolution is the same flag (default: 1024)',
        metavar='PX', rule=IMAGE_SIZE, must_match=True, aliases=('resolution',))
    bucketing: bool = flag(True, 'aspect-ratio buckets instead of square crops (default: on)',
        must_match=True)
    center_crop: bool = flag(False, 'center crops instead of random crops; always on with --cache_latents (default: '
        'off)', must_match=True)
    random_flip: bool = flag(False, 'horizontal flips; with cached latents both flips are cached (default: off)',
        must_match=True)
    caption_dropout: float = flag(0.0, 'chance of an empty caption (CFG) (default: 0.0)',
        metavar='P', rule=UNIT, must_match=True)
    shuffle_tags: bool = flag(False, 'shuffle the comma-separated tags of a caption each time it is used; not with '
        '--cache_text_embeddings (default: off)', must_match=True)
    keep_tokens: int = flag(0, '--shuffle_tags keeps the first N tags (default: 0)',
        metavar='N', rule=NOT_NEGATIVE, must_match=True)
    masked_loss: bool = flag(False, 'weight the loss by a mask per image: IMAGE_STEM_mask.png beside it, --mask_dir, '
        'or --alpha_mask; white = learn, black = ignore; images without one learn everywhere (default: off)',
        must_match=True, since=False)
    mask_dir: str | None = flag(None, '--masked_loss: the masks are MASK_DIR/IMAGE_STEM.png (default: beside the '
        'images)', metavar='DIR', must_match=True, since=None, path=True)
    alpha_mask: bool = flag(False, "--masked_loss: the mask is each image's alpha channel (default: off)",
        must_match=True, since=False)
    max_bad_fraction: float = flag(0.05, 'unreadable images are skipped; stop when more than this fraction are bad '
        '(default: 0.05)', metavar='F', rule=FRACTION)
    num_workers: int = flag(2, 'data loader processes; 0 = the main process (default: 2)',
        metavar='N', rule=NOT_NEGATIVE)


@dataclass(frozen=True)
class ModelSettings:
    """The base model and its VAE (a family's loaders: families.py)."""

    pretrained_model: str | None = flag(None, "the base model of this trainer's family: a diffusers folder, the "
        "vendor's single .safetensors file, or its tiny CPU test model (tiny, tiny-sd3, tiny-flux) (required, here or "
        "in --config)", metavar='PATH', must_match=True, path=True, required=True)
    vae_model: str | None = flag(None, "diffusers VAE folder to use, e.g. sdxl-vae-fp16-fix (default: the model's)",
        metavar='DIR', must_match=True, path=True)
    t5: bool = flag(True, "SD 3.5: encode prompts with T5-XXL too; --no-t5 leaves it out (zeros, as SAI allows): "
        "~9 GB less memory (default: on)", must_match=True, since=True, families=("sd3",))
    max_sequence_length: int | None = flag(None, "SD 3.5 and FLUX.1: T5 tokens per prompt (default: the model's: "
        "SD 3.5 256, FLUX.1-dev 512, FLUX.1-schnell 256)", metavar='N', rule=OPTIONAL_AT_LEAST_1, must_match=True,
        since=None, families=("sd3", "flux"))


@dataclass(frozen=True)
class LoRASettings:
    """What is trained: the LoRA on the denoiser (LoCon, DoRA) and, optionally, on the text encoders (lora/)."""

    lora_rank: int = flag(16, 'rank of each LoRA (default: 16)', metavar='R', rule=AT_LEAST_1, must_match=True)
    lora_alpha: float | None = flag(None, 'updates are scaled by alpha/rank (default: --lora_rank)',
        metavar='A', rule=POSITIVE, must_match=True)
    lora_dropout: float = flag(0.0, 'dropout on the LoRA input (default: 0.0)', metavar='P', rule=UNIT, must_match=True)
    lora_target_mode: str | None = flag(None, "which layers get a LoRA: SDXL attention = to_q/k/v, attention_out = + "
        "to_out.0, all = every Linear of the transformer blocks, as kohya; SD 3.5 and FLUX.1: see docs/families.md "
        "(default: the model's: SDXL attention_out, SD 3.5 and FLUX.1 attention)", metavar='MODE', must_match=True,
        since='attention_out')
    conv_rank: int = flag(0, "SDXL LoCon: also put a LoRA of this rank on the UNet's 3x3 convs (ResNets, "
        "down/upsamplers), as kohya's conv_dim; 0 = none (default: 0)", metavar='R', rule=NOT_NEGATIVE,
        must_match=True, since=0, families=("sdxl",))
    conv_alpha: float | None = flag(None, 'LoCon updates are scaled by conv_alpha/conv_rank (default: --conv_rank)',
        metavar='A', rule=NOT_NEGATIVE, must_match=True, since=0.0)
    train_text_encoder: bool = flag(False, 'also train a LoRA (--lora_rank/--lora_alpha/--lora_dropout, plain LoRA) '
        'on both CLIP text encoders, saved as lora_te1_/lora_te2_ (kohya) and text_encoder./text_encoder_2. '
        '(diffusers); not with --cache_text_embeddings (default: off)', must_match=True, since=False)
    text_encoder_target_mode: str = flag('attention', '--train_text_encoder: attention = self-attention '
        "q/k/v/out_proj, all = those and the MLP's fc1/fc2 (default: attention)",
        choices=('attention', 'all'), must_match=True, since='attention')
    text_encoder_lr: float | None = flag(None, "--train_text_encoder: the text encoders' peak learning rate (default: "
        '--learning_rate)', metavar='LR', must_match=True, since=None)
    use_dora: bool = flag(False, 'DoRA (arXiv:2402.09353): also train a magnitude per output channel of every adapted '
        'layer (default: off)', must_match=True, since=False)


@dataclass(frozen=True)
class OptimizerSettings:
    """Batches, steps, the optimizer, its learning-rate schedule and the EMA (training/loop/optim.py)."""

    batch_size: int = flag(1, 'images per micro-batch and process; an optimizer step trains batch_size x '
        'gradient_accumulation_steps x processes images (the effective batch, which a resumed run keeps; how it is '
        'split may change) (default: 1)', metavar='N', rule=AT_LEAST_1)
    gradient_accumulation_steps: int = flag(1, 'micro-batches per optimizer step (default: 1)',
        metavar='N', rule=AT_LEAST_1)
    num_epochs: int = flag(1, 'passes over the data (default: 1)', metavar='N', rule=AT_LEAST_1)
    max_train_steps: int | None = flag(None, 'optimizer steps; overrides --num_epochs (default: none)',
        metavar='N', rule=STEPS)
    learning_rate: float | None = flag(None, 'peak learning rate (default: 1.0 with prodigy, which finds its own step '
        'size; else 1e-4)', metavar='LR', rule=POSITIVE, must_match=True)
    optimizer: str = flag('adamw', 'adamw = torch.optim.AdamW; adamw8bit = bitsandbytes AdamW8bit, less memory '
        '(CUDA); prodigy = Prodigy, learning-rate free (prodigyopt); adamw_schedulefree = schedule-free AdamW, no LR '
        "schedule, its eval-mode weights are validated and saved (schedulefree); adafactor = transformers' Adafactor "
        'at a fixed --learning_rate (prodigy and schedule-free: `pip install -e .[recipes]`) (default: adamw)',
        choices=('adamw', 'adamw8bit', 'prodigy', 'adamw_schedulefree', 'adafactor'), must_match=True)
    prodigy_d_coef: float = flag(1.0, 'Prodigy: scales its estimated step size d (default: 1.0)',
        metavar='C', rule=POSITIVE, must_match=True, since=1.0)
    prodigy_use_bias_correction: bool = flag(False, "Prodigy: Adam's bias correction, as kohya users usually set "
        '(default: off)', must_match=True, since=False)
    prodigy_safeguard_warmup: bool = flag(False, 'Prodigy: keep d from growing too fast during --warmup_steps '
        '(default: off)', must_match=True, since=False)
    weight_decay: float = flag(0.01, 'AdamW weight decay (default: 1e-2)',
        metavar='WD', rule=NOT_NEGATIVE, must_match=True)
    adam_beta1: float = flag(0.9, 'Adam beta1 (default: 0.9)', metavar='B', rule=UNIT, must_match=True)
    adam_beta2: float = flag(0.999, 'Adam beta2 (default: 0.999)', metavar='B', rule=UNIT, must_match=True)
    adam_epsilon: float = flag(1e-08, 'Adam epsilon (default: 1e-8)', metavar='EPS', rule=POSITIVE, must_match=True)
    lr_scheduler: str = flag('constant', 'learning-rate schedule after the warmup (default: constant)',
        choices=('constant', 'linear', 'cosine'), must_match=True)
    lr_schedule_total: int | None = flag(None, 'steps the LR schedule decays over; give the longest run you may '
        "extend to, so that a later, larger --max_train_steps continues the same curve (default: the run's length)",
        metavar='N', rule=SCHEDULE_STEPS)
    warmup_steps: int = flag(0, 'optimizer steps of linear warmup (default: 0)',
        metavar='N', rule=NOT_NEGATIVE, must_match=True)
    max_grad_norm: float = flag(1.0, 'clip the gradient norm; 0 = off (default: 1.0)',
        metavar='N', rule=NOT_NEGATIVE, must_match=True)
    max_nonfinite_steps: int = flag(5, 'steps with a NaN/inf loss are skipped; stop after this many in a row '
        '(default: 5)', metavar='N', rule=NOT_NEGATIVE)
    use_ema: bool = flag(False, 'keep and save an EMA of the LoRA weights (default: off)', must_match=True)
    ema_decay: float = flag(0.999, 'EMA decay per optimizer step (default: 0.999)',
        metavar='D', rule=DECAY, must_match=True)


@dataclass(frozen=True)
class NoiseSettings:
    """What a training step draws besides its data: timesteps, noise, the target and the loss weights (the
    family's objective, training/loop/noise.py)."""

    min_timestep: int = flag(0, 'lowest timestep trained, 0..999 (default: 0)',
        metavar='T', rule=TIMESTEP, must_match=True)
    max_timestep: int = flag(999, 'highest timestep trained, 0..999 (default: 999)',
        metavar='T', rule=TIMESTEP, must_match=True)
    prediction_type: str | None = flag(None, "what the denoiser predicts: SDXL epsilon (base) or v_prediction "
        "(v-models); SD 3.5 and FLUX.1 flow (the velocity) (default: the model's)",
        choices=('epsilon', 'v_prediction', 'flow'), must_match=True, since='epsilon')
    min_snr_gamma: float = flag(0.0, 'gamma of --loss_weighting min_snr (Hang et al. 2023), 5 is typical; a value > 0 '
        'alone turns min_snr on (default: 0; 5 with --loss_weighting min_snr)',
        metavar='G', rule=NOT_NEGATIVE, must_match=True)
    noise_offset: float = flag(0.0, 'offset noise strength, e.g. 0.0357 (default: 0.0)',
        metavar='X', rule=NOT_NEGATIVE, must_match=True)
    timestep_sampling: str | None = flag(None, "density of the trained timesteps: uniform; logit_normal (SD3) favours "
        "the middle; mode (SD3) by --mode_scale; sigmoid (FLUX trainers' name: logit_normal at --sigmoid_scale); "
        "flux_shift (FLUX.1) sigmoid, shifted for the image's size as FLUX.1's sampler (default: the model's: SDXL "
        "uniform, SD 3.5 logit_normal, FLUX.1 flux_shift)",
        choices=('uniform', 'logit_normal', 'mode', 'sigmoid', 'flux_shift'), must_match=True, since='uniform')
    logit_mean: float = flag(0.0, 'logit_normal: mean of the normal before the sigmoid (default: 0.0)',
        metavar='M', must_match=True, since=0.0)
    logit_std: float = flag(1.0, 'logit_normal: std of the normal before the sigmoid (default: 1.0)',
        metavar='S', rule=POSITIVE, must_match=True, since=1.0)
    mode_scale: float = flag(1.29, 'mode: > 0 favours the middle timesteps, < 0 the ends (default: 1.29)',
        metavar='S', must_match=True, since=1.29)
    sigmoid_scale: float = flag(1.0, "sigmoid, flux_shift: the normal's scale before the sigmoid (default: 1.0)",
        metavar='S', rule=POSITIVE, must_match=True, since=1.0, families=("sd3", "flux"))
    flow_shift: float | None = flag(None, "SD 3.5 and FLUX.1: shift the trained noise levels towards noise, s' = "
        "shift s / (1 + (shift - 1) s); not with flux_shift (default: the model's scheduler shift: SD 3.5 3.0, "
        "FLUX.1 1.0)", metavar='S', rule=OPTIONAL_POSITIVE, must_match=True, since=None, families=("sd3", "flux"))
    loss_weighting: str = flag('none', 'per-sample loss weights: none; min_snr = Min-SNR-gamma (Hang et al. 2023); '
        'debiased = 1/sqrt(SNR) (Yu et al. 2024); SD 3.5 and FLUX.1 sigma_sqrt, cosmap (Esser et al. 2024); the '
        'validation loss is never weighted (default: none)',
        choices=('none', 'min_snr', 'debiased', 'sigma_sqrt', 'cosmap'), must_match=True,
        since=lambda old: 'min_snr' if old.get('min_snr_gamma') else 'none')
    precondition_outputs: bool = flag(False, "SD 3.5: regress x0 = x_t - s v instead of the velocity, as diffusers' "
        "SD3 LoRA example's --precondition_outputs (default: off)", must_match=True, since=False, families=("sd3",))
    guidance_scale: float = flag(1.0, "FLUX.1-dev: the guidance its guidance embedding is given while training "
        "(default: 1.0)", metavar='G', rule=NOT_NEGATIVE, must_match=True, since=1.0, families=("flux",))
    multires_noise_iterations: int = flag(0, 'multi-resolution (pyramid) noise levels, 6-10 is typical; 0 = off '
        '(default: 0)', metavar='N', rule=NOT_NEGATIVE, must_match=True, since=0)
    multires_noise_discount: float = flag(0.3, 'weight ratio of each coarser noise level, 0.1-0.3 (default: 0.3)',
        metavar='D', rule=DISCOUNT, must_match=True, since=0.3)
    input_perturbation: float = flag(0.0, "extra noise on the UNet's input only (Ning et al. 2023), 0.1 is typical; 0 "
        '= off (default: 0.0)', metavar='G', rule=NOT_NEGATIVE, must_match=True, since=0.0)


@dataclass(frozen=True)
class RuntimeSettings:
    """How the run executes: seed, device, precision, memory savers, caches."""

    seed: int = flag(0, 'seed of data order, noise, timesteps and LoRA init (default: 0)', rule=SEED, must_match=True)
    precision: str = flag('auto', 'UNet autocast dtype; LoRA weights and the VAE stay fp32; fp16 needs a GPU. auto = '
        'bf16 on a GPU (fp16 where bf16 is unsupported), fp32 on a CPU, where bf16 is emulated and many times slower '
        '(default: auto)', choices=('auto', 'bf16', 'fp16', 'fp32'), must_match=True)
    base_dtype: str = flag('auto', "how the frozen denoiser's block Linear layers are stored (they compute in "
        '--precision): fp8 = float8_e4m3fn with a power-of-two scale per row, half the bytes of bf16, cast up per '
        'layer at use (FLUX.1-dev: 11 GB instead of 23); bf16/fp16 under --precision fp32 likewise; auto = the '
        "--precision's dtype (default: auto)", choices=('auto', 'fp32', 'bf16', 'fp16', 'fp8'), must_match=True,
        since=lambda old: old.get('precision', 'fp32'))
    shard_base: bool = flag(False, 'under torchrun, shard the frozen denoiser across the processes with FSDP2 '
        '(fully_shard per block, then the root), so each GPU holds 1/N of it; the LoRA stays whole on every process '
        'and its gradients are averaged; checkpoints hold the whole LoRA, so a sharded run resumes unsharded and back '
        '(default: off)', since=False)
    compile: bool = flag(False, 'torch.compile each ResNet and transformer block (regional: the repeated blocks '
        'compile once; start-up ~1 min on a GPU, then faster steps) (default: off)')
    gradient_checkpointing: bool = flag(False, 'recompute activations in backward: far less memory, ~30% slower '
        '(default: off)')
    device: str = flag('auto', 'cpu, cuda or cuda:N; auto = cuda if available, else cpu (default: auto)')
    cache_latents: str = flag('none', 'VAE-encode each image once, kept in memory or on disk (default: none)',
        choices=('none', 'memory', 'disk'))
    cache_text_embeddings: bool = flag(False, 'encode each caption once, then free the text encoders (default: off)')
    cache_dir: str | None = flag(None, 'folder of the disk caches (default: OUTPUT_DIR/cache)',
        metavar='DIR', path=True)


@dataclass(frozen=True)
class CheckpointSettings:
    """The output folder, checkpoints and resuming (training/run/)."""

    output_dir: str | None = flag(None, 'LoRA, checkpoints/, config.yaml, logs (required, here or in --config)',
        metavar='DIR', path=True, required=True)
    save_interval: int = flag(500, 'resumable checkpoint every N optimizer steps; 0 = only the final LoRA (default: '
        '500)', metavar='N', rule=NOT_NEGATIVE)
    save_every_n_epochs: int = flag(0, 'also a checkpoint after every N epochs; 0 = off (default: 0)',
        metavar='N', rule=NOT_NEGATIVE)
    keep_last: int = flag(0, 'keep only the newest N checkpoints; 0 = keep all (default: 0)',
        metavar='N', rule=NOT_NEGATIVE)
    resume_from: str | None = flag(None, "continue a run exactly from a checkpoints/step_XXXXXX folder, or 'latest' "
        '(the newest complete one in OUTPUT_DIR; starts fresh if there is none) (default: none)', metavar='PATH|latest')
    overwrite_output_dir: bool = flag(False, 'start afresh in an OUTPUT_DIR that holds a previous run, deleting its '
        'checkpoints, samples, metrics and LoRA (default: off: such a folder is an error)')
    save_format: str = flag('kohya', 'kohya keys (ComfyUI, A1111, kohya, diffusers) or diffusers/peft keys (default: '
        'kohya)', choices=('kohya', 'diffusers'))


@dataclass(frozen=True)
class EvaluationSettings:
    """Validation loss, sample grids, scores during training, the best checkpoint, logging."""

    validation_prompts: list[str] = flag([], 'prompts to sample, or one .txt file with a prompt per line (default: '
        'none)', metavar='PROMPT')
    validation_interval: int = flag(100, 'sample them every N optimizer steps; 0 = only at the end (default: 100)',
        metavar='N', rule=NOT_NEGATIVE)
    num_validation_images: int = flag(4, 'images per validation prompt (default: 4)', metavar='N', rule=AT_LEAST_1)
    eval_interval: int = flag(0, 'score the LoRA every N optimizer steps (and at the first and last): KID, and the '
        'CLIP score with --clip_model, of --eval_num_images images generated for the validation prompts against '
        '--eval_real_dir; needs the eval extra and --inception_weights; 0 = off (default: 0)',
        metavar='N', rule=NOT_NEGATIVE)
    eval_num_images: int = flag(32, 'images generated per evaluation, the validation prompts in turn, image i seeded '
        'i (default: 32)', metavar='N', rule=AT_LEAST_1)
    eval_real_dir: str | None = flag(None, 'the real images KID compares with (default: --data_dir)',
        metavar='DIR', path=True)
    inception_weights: str | None = flag(None, 'the TorchScript Inception-v3 of clean-fid/StyleGAN for KID (default: '
        "~/.cache/sdxl-lora/inception-2015-12-05.pt; README, 'Evaluating')", metavar='FILE', path=True)
    clip_model: str | None = flag(None, 'a local transformers CLIP folder: adds the CLIP score to --eval_interval '
        '(default: none)', metavar='DIR', path=True)
    keep_best: str = flag('none', 'keep checkpoints/best/ (and lora_best.safetensors at the end) for the lowest KID '
        'or validation loss; none = off (default: none)', choices=('none', 'kid', 'val_loss'))
    wandb_project: str | None = flag(None, 'log to this Weights & Biases project; needs wandb (default: off)',
        metavar='NAME')
    wandb_run_name: str | None = flag(None, 'W&B run name (default: chosen by wandb)', metavar='NAME')
    log_interval: int = flag(1, 'log every N optimizer steps (default: 1)', metavar='N', rule=AT_LEAST_1)
    verbose: bool = flag(False, "also show transformers' and diffusers' progress bars and info/warning messages "
        '(default: off, only ours)')



SECTIONS = {  # the argparse group of each section, in --help order
    "data": DataSettings, "model": ModelSettings, "LoRA": LoRASettings, "optimization": OptimizerSettings,
    "timesteps, noise & loss weighting": NoiseSettings, "runtime: seed, precision, memory & caches": RuntimeSettings,
    "output & checkpoints": CheckpointSettings, "validation, evaluation & logging": EvaluationSettings,
}


@dataclass(frozen=True)
class Settings:
    """A run's resolved flags, one typed section each."""

    data: DataSettings
    model: ModelSettings
    lora: LoRASettings
    optimizer: OptimizerSettings
    noise: NoiseSettings
    runtime: RuntimeSettings
    checkpoints: CheckpointSettings
    evaluation: EvaluationSettings

    @classmethod
    def of(cls, args: argparse.Namespace) -> "Settings":
        """The sections of a parsed, resolved and validated Namespace (training/config.py)."""
        values = vars(args)
        return cls(*(section(**{f.name: values[f.name] for f in dataclasses.fields(section)})
                     for section in SECTIONS.values()))

    def flat(self) -> dict:
        """flag name -> value, every section (what config.yaml holds)."""
        return {k: v for f in dataclasses.fields(self) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}


def model_options(model: ModelSettings, family: str) -> dict:
    """The model flags of one family only (`families` names it: SD 3.5's t5 and max_sequence_length, ...), as the
    keyword arguments its `load_text_encoder` takes (families.py)."""
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if family in (f.metadata["families"] or ())}


def table() -> dict[str, dataclasses.Field]:
    """flag name -> its field (type, default, metadata), in --help order."""
    return {f.name: f for section in SECTIONS.values() for f in dataclasses.fields(section)}


def value_type(field: dataclasses.Field):
    """The type a flag's value is converted to: int, float, str or bool (`X | None` -> X, `list[str]` -> str)."""
    hint = typing.get_type_hints(next(s for s in SECTIONS.values() if field in dataclasses.fields(s)))[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union or typing.get_origin(hint) is list:
        hint = args[0]
    return hint


def must_match() -> tuple[str, ...]:
    """The flags that change what a resumed run computes: a checkpoint's value must equal the run's."""
    return tuple(name for name, f in table().items() if f.metadata["must_match"])


def later_defaults(old: dict) -> dict:
    """The values that a config written before a flag existed ran with (`since`), for the flags it lacks."""
    values = {}
    for name, f in table().items():
        since = f.metadata["since"]
        if name not in old and since is not NOT_GIVEN:
            values[name] = since(old) if callable(since) else since
    return values


def build_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The flat, grouped parser of a trainer, from the table. Required flags may come from --config instead."""
    p = Parser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, description=description,
               epilog=epilog)
    for title, section in SECTIONS.items():
        group = p.add_argument_group(title)
        for f in dataclasses.fields(section):
            m, kind = f.metadata, value_type(f)
            kwargs = dict(metavar=m["metavar"], choices=list(m["choices"]) if m["choices"] else None,
                          aliases=m["aliases"], required=m["required"])
            if m["action"] == "store_true":
                kwargs |= dict(action="store_true")
            elif kind is bool:
                kwargs |= dict(action=argparse.BooleanOptionalAction, default=f.default)
            else:
                kwargs |= dict(type=kind if kind in (int, float) else None, default=f.default if f.default_factory
                               is dataclasses.MISSING else f.default_factory())
                if typing.get_origin(typing.get_type_hints(section)[f.name]) is list:
                    kwargs["nargs"] = "*"
            help_text = m["help"].replace("%", "%%")  # argparse formats help strings with %
            add_flag(group, f.name, help_text, **{k: v for k, v in kwargs.items() if v is not None and v != ()})
    return p
