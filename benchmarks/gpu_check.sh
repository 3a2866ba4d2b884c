#!/usr/bin/env bash
# One GPU check: on a CUDA machine, in under 8 minutes, the GPU tests (pytest -m gpu), bench_train.py,
# bench_sample.py and bench_unet.py at full SDXL size (random weights, 1024 px, bf16; batch 1 and 4;
# checkpointing on and off; eager and --compile, each against diffusers(+peft) in the same process), the
# data path on this machine's CPUs, and the peak GPU memory of the SDXL presets in configs/ (a few steps
# of train_sdxl.py on a random full-size SDXL). Appends one markdown table (device, date, commit, each
# step's command, result and seconds) to benchmarks/RESULTS.md row by row as the steps finish, then every
# step's full output under it.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine, from the repository root
#   CPU_SMOKE=1 bash benchmarks/gpu_check.sh      # here: the same steps on the tiny model, CPU, a few seconds each
#
# A fresh clone needs only torch, transformers, safetensors and peft (plus pillow, numpy, pyyaml, tqdm,
# pytest): the other pure-Python dependencies travel as wheels. Once, on a machine with internet, in the
# repository root:
#   pip download --no-deps diffusers importlib_metadata webdataset braceexpand -d wheels/
# and this script, when wheels/*.whl exist, installs them with
#   pip install --no-index --no-deps --target WORK/site wheels/*.whl
# into its own temporary folder, put first on PYTHONPATH, so the machine's own packages are left alone.
# wheels/ is git-ignored: copy it next to the clone's files by hand.
#
# Each step has its own time limit, and the whole run a budget (BUDGET_S, default 450 s): a step that would
# start with less than its minimum left is skipped and marked so; the most informative steps run first.
# Environment: CPU_SMOKE=1; BUDGET_S; COMMIT (when the copy has no .git); RESULTS (default
# benchmarks/RESULTS.md, with CPU_SMOKE=1 LOG_DIR/RESULTS.md); LOG_DIR (default $OUT/gpu_check when $OUT is
# set, else $TMPDIR/gpu_check: the log and a copy of the appended section); WHEELS (default wheels); PYTHON.
set -u -o pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TMP=${TMPDIR:-/tmp}
SMOKE=${CPU_SMOKE:-0}
BUDGET_S=${BUDGET_S:-450}
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

# step NAME MIN_S LIMIT_S COMMAND...: run COMMAND with a limit of LIMIT_S (less if the budget has less left), or
# skip it when fewer than MIN_S seconds of the budget are left; one table row either way.
step() {
    local name=$1 min_s=$2 limit_s=$3
    shift 3
    local left=$((BUDGET_S - ($(date +%s) - START)))
    local cmd="$*"
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
    echo "Command: \`$( ((SMOKE)) && echo "CPU_SMOKE=1 ")bash benchmarks/gpu_check.sh\` (budget ${BUDGET_S} s)."
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
    FULL_SAMPLE=(--smoke)
    COMPILE=()  # compiling on a CPU takes minutes: the smoke run checks the script, not torch.compile
    DATA_BENCH=(--smoke --data_dir "$DATA-bench")
    MODEL="$WORK/tiny-random"
    MAKE_MODEL=($PY -m sdxl.tiny "$MODEL" --random)
    PRESET=(--image_size 64 --device cpu --precision fp32 --num_workers 0 --max_train_steps 1)
    IMAGE_SIDE=64
else
    DEV=(--device cuda)
    FULL_UNET=(--config sdxl --dtype bf16 --resolution 1024 --warmup 2 --rounds 3 --iters 3)
    FULL_TRAIN=(--full --precision bf16 --resolution 1024 --warmup 2 --rounds 3 --steps 3)
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
SAMPLE=($PY benchmarks/bench_sample.py "${FULL_SAMPLE[@]}" "${DEV[@]}" --batch-size 1)
step "GPU tests" 30 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests
step "train b4, ckpt off" 40 90 "${TRAIN[@]}" --batch_size 4
step "sample b1" 40 90 "${SAMPLE[@]}"
step "train b4, ckpt on" 40 90 "${TRAIN[@]}" --batch_size 4 --gradient_checkpointing
step "train b1, ckpt on" 30 60 "${TRAIN[@]}" --batch_size 1 --gradient_checkpointing
# peak memory of the SDXL presets: a few optimizer steps of train_sdxl.py each (data: 8 square JPEGs)
$PY -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; from bench_data import make_jpegs; \
make_jpegs(Path('$DATA'), 8, $IMAGE_SIDE, $IMAGE_SIDE)"
step "random SDXL for presets" 30 90 "${MAKE_MODEL[@]}"
for preset in configs/sdxl_*.yaml; do
    name=$(basename "$preset" .yaml)
    if [[ -d $MODEL ]]; then
        step "preset $name" 40 90 $PY benchmarks/preset_memory.py "$WORK/$name" $PY train_sdxl.py \
            --config "$preset" --pretrained_model "$MODEL" --data_dir "$DATA" --output_dir "$WORK/$name" \
            --validation_interval 0 --save_interval 0 "${PRESET[@]}"
    else
        emit "| preset $name | | skipped: no model folder (see the step above) | 0 |"
    fi
done
step "train b4, ckpt off, compiled" 90 240 "${TRAIN[@]}" --batch_size 4 "${COMPILE[@]}"
step "sample b1, compiled" 90 200 "${SAMPLE[@]}" "${COMPILE[@]}"
step "data path" 20 60 $PY benchmarks/bench_data.py "${DATA_BENCH[@]}"
step "train b1, ckpt off" 30 60 "${TRAIN[@]}" --batch_size 1
step "UNet b4" 60 200 $PY benchmarks/bench_unet.py "${FULL_UNET[@]}" "${DEV[@]}" --batch-size 4 "${COMPILE[@]}"

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
