#!/usr/bin/env bash
# The GPU benchmark in one short, time-boxed command, for a lent GPU machine with nothing on it
# but Python, torch and transformers (this workplace's device tool). It installs only what was
# carried, runs the SD 1.5 pieces, then SDXL's if time remains, and leaves JSON in $OUT.
#
# Here, once:   mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#               python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                   --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#                   --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 torchao==0.18.0 bitsandbytes==0.50.2
#               (53 MB in all, of the 64 MiB a call carries: nothing else big may travel beside them. The
#               machine has accelerate, peft and the packages these need; torchao and bitsandbytes are for
#               the flux-quant pieces, bitsandbytes' wheel brings its CUDA 13 library.)
# There:        bash benchmarks/gpu.sh        (the device tool's `run`, carrying .whl; timeout_s 600)
#
# Each piece is a separate benchmark process under `timeout`, skipped when the estimate of its
# length no longer fits T2I_GPU_BUDGET seconds; each writes its JSON after every step, so a
# piece cut off still reports what it measured. Estimates come from raw diffusers on an H200:
# SD 1.5 compiled 52 s to the first image, SDXL full compile 245 s.
#
# T2I_GPU_ONLY=flux runs only the pieces whose name starts with it: FLUX.1 (random weights at full
# size, bf16, about 34 GB resident) against raw diffusers eager and compiled, one variant per
# process (three full-size FLUX.1 copies do not fit one H100), 8 steps at 1024x1024.
# T2I_GPU_ONLY=flux-cache and T2I_GPU_ONLY=flux-quant run the pieces below them (see there).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-benchmarks/results}
BUDGET=${T2I_GPU_BUDGET:-540}
ONLY=${T2I_GPU_ONLY:-}
mkdir -p "$OUT"
LOG="$OUT/gpu-log.txt"
started=$SECONDS

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" | tee -a "$LOG"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site \
    . plugins/sd15 plugins/sdxl plugins/kandinsky22 plugins/flux plugins/quantize \
    || { echo "installing t2i failed" | tee -a "$LOG"; exit 1; }
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9.\n-' '-' | tr -d '\n')
nvidia-smi >>"$LOG" 2>&1
df -h /tmp >>"$LOG" 2>&1
echo "gpu=$GPU budget=${BUDGET}s install took $((SECONDS - started))s" | tee -a "$LOG"

piece() {  # piece NAME ESTIMATED_SECONDS ARGS...: run one benchmark process if it fits the budget
    local name=$1 estimate=$2
    shift 2
    if [[ -n $ONLY && $name != "$ONLY"* ]]; then
        return
    fi
    local left=$((BUDGET - (SECONDS - started)))
    if ((left < estimate)); then
        echo "skipped $name: ${left}s left, it needs about ${estimate}s" | tee -a "$LOG"
        return
    fi
    local limit=$((left < 480 ? left : 480))
    echo "$name: up to ${limit}s" | tee -a "$LOG"
    timeout --signal=TERM --kill-after=10 "$limit" \
        python3 benchmarks/bench_accelerators.py "$@" -o "$OUT/$GPU-$name.json" 2>>"$LOG"
    echo "$name: exit $? after $((SECONDS - started))s in all" | tee -a "$LOG"
}

# SD 1.5: the steady state of every variant, interleaved (four compiles of about a minute each) ...
piece sd15-steady 300 --family sd15 --phase steady --runs 10 --warmup 3 \
    --variants raw-eager,raw-compiled,raw-fast,t2i-auto,t2i-quick,t2i-fast,t2i:fp16+sdpa+graph-step --scheduler euler
# ... then first images in fresh processes: cold, warm cache, mega-cache, and low-memory's peak.
piece sd15-first-image 200 --family sd15 --phase first-image --variants t2i-quick,t2i-fast --child-timeout 150
# SDXL if time remains: its full compile alone is about four minutes.
piece sdxl-steady 420 --family sdxl --phase steady --runs 5 --warmup 2 \
    --variants raw-eager,t2i-auto,t2i-quick,t2i-low-memory,raw-compiled,t2i-fast
piece sdxl-first-image 120 --family sdxl --phase first-image --variants t2i-low-memory,t2i-quick --child-timeout 110
# FLUX.1 if time remains (or alone with T2I_GPU_ONLY=flux): one process per variant, raw eager first.
for variant in raw-eager t2i-auto raw-compiled; do
    piece "flux-$variant" "$([[ $variant == raw-compiled ]] && echo 240 || echo 90)" --family flux --phase steady \
        --runs 3 --warmup 1 --steps 8 --variants "$variant"
done
# FLUX.1 with a step cache or quantized weights, each t2i stack against its raw twin: raw diffusers
# doing the same (the same FirstBlockCacheConfig, the same quantization config at load). One
# process per piece measures its two variants in turn, one resident at a time (--phase sequential),
# so that it reports both images' distance, the speed ratio and each one's peak GPU memory.
# Random weights make the cache's skipped steps unlike a trained model's: read full_denoiser_calls
# with the speed. The quantizers quantize as weights load, so the flux-quant pieces load random
# FLUX.1 weights that the first of them saves once in $CHECKPOINTS (bf16, about 34 GB; about 150 s
# more, reused while the machine stays warm). Most valuable first; the estimates are guesses from
# the pieces above (two variants of about 60 s each, loads from disk about 30 s more) until measured.
CHECKPOINTS=${T2I_GPU_CHECKPOINTS:-/tmp/t2i-bench-checkpoints}
twins() {  # twins NAME ESTIMATED_SECONDS VARIANTS [ARGS...]
    local name=$1 estimate=$2 variants=$3
    shift 3
    piece "$name" "$estimate" --family flux --phase sequential --no-warm --runs 3 --warmup 1 --steps 8 \
        --variants "$variants" "$@"
}
quantized() {  # quantized NAME ESTIMATED_SECONDS QUANTIZER: raw-QUANTIZER against t2i bf16+QUANTIZER
    local estimate=$2
    [[ -f $CHECKPOINTS/flux-bfloat16/t2i-bench-checkpoint.json ]] || estimate=$((estimate + 150))
    twins "$1" "$estimate" "raw-$3,t2i:bf16+$3" --checkpoint "$CHECKPOINTS"
}
twins flux-cache-first-block 120 raw-eager+first-block-cache@0.2,t2i:bf16+first-block-cache@0.2
quantized flux-quant-int8 150 int8
quantized flux-quant-nf4 130 nf4
quantized flux-quant-fp8 150 fp8
# turbo (bf16, sdpa, first-block-cache, compiled VAE) against the same cache without the compiled VAE.
twins flux-cache-turbo 180 raw-eager+first-block-cache@0.2,t2i-turbo
echo "done after $((SECONDS - started))s" | tee -a "$LOG"
