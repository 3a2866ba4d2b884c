#!/usr/bin/env bash
# Fetch SDXL base 1.0 in the diffusers folder layout, safetensors only, for --pretrained_model.
#
#   ./download_weights.sh                      # fp16 weights (~7 GB) into ./weights/sdxl-base-1.0
#   ./download_weights.sh --vae-fp16-fix       # + madebyollin/sdxl-vae-fp16-fix (for --vae_model)
#   ./download_weights.sh --full-precision --dir /data/sdxl --dry-run
#
# Uses the huggingface_hub command-line tool: `hf` (new) or `huggingface-cli` (old). Files are
# passed as positional names because both tools, in every version, treat several names as
# allow-patterns, while `--include` changed syntax between versions (nargs vs. repeated flag).
# Only bash builtins are used besides the download tool.
set -euo pipefail

BASE_REPO=stabilityai/stable-diffusion-xl-base-1.0
VAE_REPO=madebyollin/sdxl-vae-fp16-fix

USAGE="usage: ./download_weights.sh [--dir DIR] [--full-precision] [--vae-fp16-fix] [--vae-dir DIR] [--dry-run]

Fetch $BASE_REPO (diffusers layout, safetensors only).

  --dir DIR          where the SDXL folder goes (default: ./weights/sdxl-base-1.0)
  --full-precision   fetch the fp32 weights (~14 GB) instead of the fp16 variant (~7 GB);
                     training casts to bf16 either way, so fp16 is enough for LoRA training
  --vae-fp16-fix     also fetch $VAE_REPO, a VAE that does not overflow in fp16
  --vae-dir DIR      where that VAE goes (default: ./weights/sdxl-vae-fp16-fix)
  --dry-run          print the commands that would run and fetch nothing
  -h, --help         show this help

Needs: pip install -U huggingface_hub (provides 'hf'). Set HF_TOKEN or run 'hf auth login'
if the Hub asks for a login."

die() { # exit code, message
    printf 'download_weights.sh: error: %s\n' "$2" >&2
    exit "$1"
}

dir=./weights/sdxl-base-1.0
vae_dir=./weights/sdxl-vae-fp16-fix
full_precision=0
vae_fix=0
dry_run=0
while (($#)); do
    case $1 in
        -h | --help) printf '%s\n' "$USAGE"; exit 0 ;;
        --full-precision) full_precision=1 ;;
        --vae-fp16-fix) vae_fix=1 ;;
        --dry-run) dry_run=1 ;;
        --dir | --vae-dir)
            [[ $# -ge 2 && -n $2 && $2 != -* ]] || die 2 "$1 needs a folder (see --help)"
            if [[ $1 == --dir ]]; then dir=$2; else vae_dir=$2; fi
            shift ;;
        --dir=*) dir=${1#--dir=} ;;
        --vae-dir=*) vae_dir=${1#--vae-dir=} ;;
        *) die 2 "unknown option '$1' (see ./download_weights.sh --help)" ;;
    esac
    shift
done

# The exact files of the diffusers layout (checked after the download).
if ((full_precision)); then
    precision="fp32"
    weights=(unet/diffusion_pytorch_model.safetensors vae/diffusion_pytorch_model.safetensors
        text_encoder/model.safetensors text_encoder_2/model.safetensors)
else
    precision="fp16"
    weights=(unet/diffusion_pytorch_model.fp16.safetensors vae/diffusion_pytorch_model.fp16.safetensors
        text_encoder/model.fp16.safetensors text_encoder_2/model.fp16.safetensors)
fi
tokenizer_files=(merges.txt special_tokens_map.json tokenizer_config.json vocab.json)
base_files=(model_index.json scheduler/scheduler_config.json
    unet/config.json vae/config.json text_encoder/config.json text_encoder_2/config.json
    "${tokenizer_files[@]/#/tokenizer/}" "${tokenizer_files[@]/#/tokenizer_2/}" "${weights[@]}")
vae_files=(config.json diffusion_pytorch_model.safetensors)

if command -v hf >/dev/null 2>&1; then
    tool=(hf download) login="hf auth login"
elif command -v huggingface-cli >/dev/null 2>&1; then
    tool=(huggingface-cli download) login="huggingface-cli login"
elif ((dry_run)); then
    tool=(hf download) login="hf auth login"
    printf '# note: neither hf nor huggingface-cli is installed: pip install -U huggingface_hub\n'
else
    die 2 "the Hugging Face download tool ('hf' or 'huggingface-cli') is not on PATH: pip install -U huggingface_hub"
fi

fetch() { # repo, destination folder, files...
    local repo=$1 dest=$2
    shift 2
    local cmd=("${tool[@]}" "$repo" "$@" --local-dir "$dest") f shown missing=()
    if ((dry_run)); then
        printf -v shown '%q ' "${cmd[@]}" # shell-quoted, so it can be pasted as is
        printf '%s\n' "${shown% }"
        return
    fi
    printf 'fetching %s into %s\n' "$repo" "$dest"
    if ! "${cmd[@]}"; then
        die 1 "downloading $repo failed (message above); nothing usable is in $dest yet. Check the network;
if the Hub says the repo is gated or needs a login, run '$login' (or set HF_TOKEN) and run this again."
    fi
    for f in "$@"; do [[ -f $dest/$f ]] || missing+=("$f"); done
    ((${#missing[@]} == 0)) || die 1 "the download of $repo finished but $dest lacks: ${missing[*]}"
}

fetch "$BASE_REPO" "$dir" "${base_files[@]}"
if ((vae_fix)); then
    fetch "$VAE_REPO" "$vae_dir" "${vae_files[@]}"
fi

if ((dry_run)); then
    printf '# dry run: nothing was fetched\n'
    exit 0
fi
printf '\nSDXL base 1.0 (%s safetensors) is in %s\n' "$precision" "$dir"
printf 'Use it with: --pretrained_model %s\n' "$dir"
if ((vae_fix)); then
    printf 'fp16-fix VAE is in %s; use it with: --vae_model %s\n' "$vae_dir" "$vae_dir"
fi
