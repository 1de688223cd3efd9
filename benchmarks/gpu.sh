#!/usr/bin/env bash
# The GPU benchmark in one short, time-boxed command, for a lent GPU machine with nothing on it
# but Python, torch and transformers (this workplace's device tool). It installs only what was
# carried, runs the SD 1.5 pieces, then SDXL's if time remains, and leaves JSON in $OUT.
#
# Here, once:   echo /.whl/ >> .git/info/exclude
#               python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                   --implementation cp --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
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
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
BUDGET=${T2I_GPU_BUDGET:-540}
ONLY=${T2I_GPU_ONLY:-}
mkdir -p "$OUT"
LOG="$OUT/gpu-log.txt"
started=$SECONDS

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" | tee -a "$LOG"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site \
    . plugins/sd15 plugins/sdxl plugins/kandinsky22 plugins/flux \
    || { echo "installing t2i failed" | tee -a "$LOG"; exit 1; }
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9.\n-' '-' | tr -d '\n')
nvidia-smi >>"$LOG" 2>&1
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
    piece "flux-$variant" $([[ $variant == raw-compiled ]] && echo 240 || echo 90) --family flux --phase steady \
        --runs 3 --warmup 1 --steps 8 --variants "$variant"
done
echo "done after $((SECONDS - started))s" | tee -a "$LOG"
