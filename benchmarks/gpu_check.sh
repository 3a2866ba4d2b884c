#!/usr/bin/env bash
# One GPU check: on one CUDA GPU, within BUDGET_S (default 540 s, under the device's 600 s per call), the GPU tests
# (pytest -m gpu) and LoRA training steps of the three families at full size (random weights, 1024 px, bf16), each
# against diffusers' model + peft in the same process (bench_train.py --full --family ...), then SDXL's sampling,
# the SDXL presets' peak memory, the compiled benches and the data path as the budget allows. Appends one markdown
# table (device, date, commit, this command; each step's command, result and seconds) to benchmarks/RESULTS.md row
# by row as the steps finish, then every step's full output under it.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine, from the repository root
#   CPU_SMOKE=1 bash benchmarks/gpu_check.sh      # here: the same steps on the tiny models, CPU, ~20 s each
#   PARTS="sd3 flux" bash benchmarks/gpu_check.sh # only those parts (the others get a "not in PARTS" row)
#
# The steps, in order (part; expected seconds on one H100: estimates, no GPU has run these yet; [limit]):
#   tests    GPU tests                                                        ~45   [150]
#   sdxl     SDXL base LoRA step, batch 4, checkpointing off                  ~35   [90]
#   sd3      SD 3.5 Medium LoRA step, batch 1, checkpointing off              ~30   [90]
#   flux     FLUX.1-dev LoRA step, batch 1, checkpointing on, bf16 base and   ~100  [200]
#            ours over the fp8-stored base (--base_fp8)
#   sd3      SD 3.5 Medium LoRA step, batch 4, checkpointing on               ~40   [90]
#   sdxl     SDXL sampling, batch 1, 30 steps                                 ~60   [90]
#   sdxl     SDXL LoRA step, batch 4 and batch 1, checkpointing on            ~70   [90 + 60]
#            (sum so far ~410 s; what follows runs as far as the budget goes, each step skipped and marked so
#            when less than its minimum is left)
#   presets  a random full-size SDXL folder, then each configs/sdxl_*.yaml   ~30 + 4 x ~40  [90 each]
#   compiled SDXL LoRA step and sampling, --compile                          ~150 + ~150  [240, 200]
#   data     the data path on this machine's CPUs                             ~40   [60]
#   sdxl     SDXL LoRA step, batch 1, checkpointing off                       ~30   [60]
#   compiled SDXL UNet forward and fwd+bwd, batch 4, eager and compiled       ~150  [200]
# Device time: one `run` with timeout_s 600 holds a machine for its start (1-2 min), the wheels' install and these
# 540 s: about 11-12 of a session's 15 minutes. The new families (sd3, flux) run within the first ~4 minutes; for a
# second, shorter call, PARTS selects parts and BUDGET_S lowers the budget. FLUX.1-dev needs 23.8 GB of bf16
# weights plus activations: an 80 GB card (H100, H200).
#
# A fresh clone needs only torch, transformers, safetensors and peft (plus pillow, numpy, pyyaml, tqdm,
# pytest): the other pure-Python dependencies travel as wheels. Once, on a machine with internet, in the
# repository root:
#   pip download --no-deps diffusers importlib_metadata webdataset braceexpand -d wheels/
# and this script, when wheels/*.whl exist, installs them with
#   pip install --no-index --no-deps --target WORK/site wheels/*.whl
# into its own temporary folder, put first on PYTHONPATH, so the machine's own packages are left alone.
# wheels/ is git-ignored: copy it next to the clone's files by hand (on the device tool: name it in `carry`).
#
# Each step has its own time limit, and the whole run a budget (BUDGET_S): a step that would start with less than
# its minimum left is skipped and marked so; the most informative steps run first.
# Environment: CPU_SMOKE=1; BUDGET_S; PARTS (default: tests sdxl sd3 flux presets compiled data); COMMIT (when the
# copy has no .git); RESULTS (default benchmarks/RESULTS.md, with CPU_SMOKE=1 LOG_DIR/RESULTS.md); LOG_DIR (default
# $OUT/gpu_check when $OUT is set, else $TMPDIR/gpu_check: the log and a copy of the appended section); WHEELS
# (default wheels); PYTHON.
set -u -o pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TMP=${TMPDIR:-/tmp}
SMOKE=${CPU_SMOKE:-0}
BUDGET_S=${BUDGET_S:-540}
PARTS=" ${PARTS:-tests sdxl sd3 flux presets compiled data} "
LOG_DIR=${LOG_DIR:-${OUT:+$OUT/gpu_check}}
LOG_DIR=${LOG_DIR:-$TMP/gpu_check}
if ((SMOKE)); then RESULTS=${RESULTS:-$LOG_DIR/RESULTS.md}; else RESULTS=${RESULTS:-benchmarks/RESULTS.md}; fi
WHEELS=${WHEELS:-wheels}
WORK=$(mktemp -d "$TMP/gpu_check.XXXXXX")  # data, the random model (~7 GB), wheels' install: removed at exit
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"        # every step's output, in order
SECTION="$LOG_DIR/results_section.md"  # what this run appends to RESULTS.md (a copy that survives the machine)
: >"$LOG"
: >"$SECTION"
START=$(date +%s)
export PYTHONUNBUFFERED=1

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

emit() {  # a line into RESULTS.md and the section copy
    printf '%s\n' "$*" | tee -a "$SECTION" >>"$RESULTS"
}

wants() {  # wants PART: is PART among $PARTS?
    [[ $PARTS == *" $1 "* ]]
}

# step PART NAME MIN_S LIMIT_S COMMAND...: run COMMAND with a limit of LIMIT_S (less if the budget has less left), or
# skip it when its PART is not in $PARTS or fewer than MIN_S seconds of the budget are left; one table row each way.
step() {
    local part=$1 name=$2 min_s=$3 limit_s=$4
    shift 4
    local left=$((BUDGET_S - ($(date +%s) - START)))
    local cmd="$*"
    if ! wants "$part"; then
        emit "| $name | \`$cmd\` | skipped: part $part not in PARTS | 0 |"
        return
    fi
    if ((left < min_s)); then
        emit "| $name | \`$cmd\` | skipped: ${left} s of the budget left, needs ${min_s} s | 0 |"
        return
    fi
    ((limit_s > left)) && limit_s=$left
    local out="$WORK/step.out" t0=$(date +%s) rc
    echo "### $name: $cmd" >>"$LOG"
    timeout -k 10 "$limit_s" "$@" >"$out" 2>&1
    rc=$?
    cat "$out" >>"$LOG"
    local result
    result=$($PY benchmarks/gpu_summary.py "$out" "$rc" "$limit_s")
    emit "| $name | \`$cmd\` | $result | $(($(date +%s) - t0)) |"
}

# --- the machine ---------------------------------------------------------------------------------------------
read -r DEVICE_NAME TORCH_INFO < <($PY - <<'EOF'
import torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device (CPU smoke run)"
print(name.replace(" ", "_"), f"torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
)
VERSIONS=$($PY -c "import diffusers, peft, transformers; print(f'diffusers {diffusers.__version__}, \
peft {peft.__version__}, transformers {transformers.__version__}')" 2>&1 | tail -1)
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (set COMMIT)")}
{
    echo
    echo "## GPU check: ${DEVICE_NAME//_/ }, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Machine: ${DEVICE_NAME//_/ }, $(getconf _NPROCESSORS_ONLN) CPUs; $TORCH_INFO; $VERSIONS; commit $COMMIT."
    echo "Command: \`$( ((SMOKE)) && echo "CPU_SMOKE=1 ")bash benchmarks/gpu_check.sh\` (budget ${BUDGET_S} s, parts${PARTS% })."
    echo "Ratios are ours / the peer (diffusers, or diffusers+peft for training) measured in the same process on"
    echo "the same weights and inputs; ms and MiB below 1 = ours faster / smaller, images/s above 1 = ours faster."
    echo
    echo "| step | command | result | s |"
    echo "|---|---|---|---|"
} | tee -a "$SECTION" >>"$RESULTS"

# --- settings: full size on the GPU, or the tiny model on the CPU -------------------------------------------
DATA="$WORK/jpegs"
if ((SMOKE)); then
    DEV=(--device cpu)
    FULL_UNET=(--smoke)
    FULL_TRAIN=(--smoke)
    SHORT=()  # the smoke settings already take one step
    FULL_SAMPLE=(--smoke)
    COMPILE=()  # compiling on a CPU takes minutes: the smoke run checks the script, not torch.compile
    DATA_BENCH=(--smoke --data_dir "$DATA-bench")
    MODEL="$WORK/tiny-random"
    MAKE_MODEL=($PY -m sdxl.tiny "$MODEL" --random)
    PRESET=(--image_size 64 --device cpu --precision fp32 --num_workers 0 --max_train_steps 1)
    IMAGE_SIDE=64
else
    DEV=(--device cuda)
    FULL_UNET=(--config full --dtype bf16 --resolution 1024 --warmup 2 --rounds 3 --iters 3)
    FULL_TRAIN=(--full --precision bf16 --resolution 1024 --warmup 2 --rounds 3 --steps 3)
    SHORT=(--warmup 1 --rounds 2 --steps 2)  # SD 3.5 and FLUX.1: 1 + 1 (memory) + 4 steps a side
    FULL_SAMPLE=(--full --resolution 1024 --steps 30 --warmup 1 --iters 3)
    COMPILE=(--compile)
    DATA_BENCH=(--num_images 32 --workers 0 4 8 --threads 1 --data_dir "$DATA-bench")
    MODEL="$WORK/sdxl-random"
    MAKE_MODEL=($PY benchmarks/random_sdxl.py "$MODEL" --device cuda)
    PRESET=(--device cuda --max_train_steps 2 --num_workers 2)
    IMAGE_SIDE=1024
fi

# --- the steps, most informative first (eager before compiled: a slow compile cannot cost the eager numbers) ---
TRAIN=($PY benchmarks/bench_train.py "${FULL_TRAIN[@]}" "${DEV[@]}")
SD3=("${TRAIN[@]}" --family sd3 "${SHORT[@]}")
FLUX=("${TRAIN[@]}" --family flux "${SHORT[@]}" --batch_size 1 --gradient_checkpointing)
SAMPLE=($PY benchmarks/bench_sample.py "${FULL_SAMPLE[@]}" "${DEV[@]}" --batch-size 1)
step tests "GPU tests" 30 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests
step sdxl "SDXL train b4, ckpt off" 40 90 "${TRAIN[@]}" --batch_size 4
step sd3 "SD 3.5 Medium train b1, ckpt off" 40 90 "${SD3[@]}" --batch_size 1
step flux "FLUX.1-dev train b1, ckpt on, bf16 and fp8 base" 60 200 "${FLUX[@]}" --base_fp8
step sd3 "SD 3.5 Medium train b4, ckpt on" 40 90 "${SD3[@]}" --batch_size 4 --gradient_checkpointing
step sdxl "SDXL sample b1" 40 90 "${SAMPLE[@]}"
step sdxl "SDXL train b4, ckpt on" 40 90 "${TRAIN[@]}" --batch_size 4 --gradient_checkpointing
step sdxl "SDXL train b1, ckpt on" 30 60 "${TRAIN[@]}" --batch_size 1 --gradient_checkpointing
# peak memory of the SDXL presets: a few optimizer steps of train_sdxl.py each (data: 8 square JPEGs)
if wants presets; then
    $PY -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; from bench_data import make_jpegs; \
make_jpegs(Path('$DATA'), 8, $IMAGE_SIDE, $IMAGE_SIDE)"
fi
step presets "random SDXL for the presets" 30 90 "${MAKE_MODEL[@]}"
for preset in configs/sdxl_*.yaml; do
    name=$(basename "$preset" .yaml)
    if [[ -d $MODEL ]] || ! wants presets; then
        step presets "preset $name" 40 90 $PY benchmarks/preset_memory.py "$WORK/$name" $PY train_sdxl.py \
            --config "$preset" --pretrained_model "$MODEL" --data_dir "$DATA" --output_dir "$WORK/$name" \
            --validation_interval 0 --save_interval 0 "${PRESET[@]}"
    else
        emit "| preset $name | | skipped: no model folder (see the step above) | 0 |"
    fi
done
step compiled "SDXL train b4, ckpt off, compiled" 90 240 "${TRAIN[@]}" --batch_size 4 "${COMPILE[@]}"
step compiled "SDXL sample b1, compiled" 90 200 "${SAMPLE[@]}" "${COMPILE[@]}"
step data "data path" 20 60 $PY benchmarks/bench_data.py "${DATA_BENCH[@]}"
step sdxl "SDXL train b1, ckpt off" 30 60 "${TRAIN[@]}" --batch_size 1
step compiled "SDXL UNet b4" 60 200 $PY benchmarks/bench_unet.py "${FULL_UNET[@]}" "${DEV[@]}" --batch-size 4 "${COMPILE[@]}"

# --- every step's output, under the table ---------------------------------------------------------------------
{
    echo
    echo "<details><summary>Full output of each step</summary>"
    echo
    echo '```'
    cat "$LOG"
    echo '```'
    echo "</details>"
} | tee -a "$SECTION" >>"$RESULTS"
echo "gpu_check: $(($(date +%s) - START)) s; appended to $RESULTS (copy: $SECTION; log: $LOG)"
