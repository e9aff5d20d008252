#!/usr/bin/env bash
# The GPU benchmark in one call: benchmarks/perf.py at the mPLUG-Owl3-7B-241101 shape (random weights) in
# bfloat16 on the GPU, for the README's GPU table: vision crops/s, first token for 8 / 32 / 128 frames
# (next to the visual tokens placed in the context), decoding tokens/s, 1 / 4 / 16 concurrent requests.
#
#   bash benchmarks/gpu.sh        # on the GPU machine, from the repository root; about 3-4 minutes
#
# It installs nothing: the machine it was written for has no network, and its image has python3 with
# torch (CUDA), numpy, pillow, safetensors, tokenizers, huggingface_hub and tqdm, all owlvid needs here
# (PyAV is absent: the sections run use frame lists). Each step is a separate perf.py process under its
# own time limit and inside an overall budget, so a crash, a hang or an out-of-memory error loses one step
# only; perf.py writes its JSON after every section. Results go to $OUT (default benchmarks/results/gpu):
# gpu.log (everything printed), env.txt, one JSON per step and summary.md (the README table, also printed).
# Every setting below can be overridden from the environment, e.g. a CPU smoke run of the script itself:
#   DEVICE=cpu DTYPE=float32 MODEL=1b LAYERS=2 VISION_CROPS=1 TTFT_FRAMES=0,1 CONCAT_FRAMES=1 \
#   PREFILL_FRAMES=1 LONG_FRAMES=2 LONG_CROPS=1 DECODE_FRAMES=0,1 DECODE_TOKENS=4 BATCH_SIZES=1,2 \
#   BATCH_TOKENS=4 BUDGET=1200 CAP_SCALE=4 bash benchmarks/gpu.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda} MODEL=${MODEL:-7b} DTYPE=${DTYPE:-bfloat16} LAYERS=${LAYERS:-}
BUDGET=${BUDGET:-420}  # seconds for all the steps together
CAP_SCALE=${CAP_SCALE:-1}  # multiplies each step's own limit (slow machines, smoke runs)
VISION_CROPS=${VISION_CROPS:-256}
TTFT_FRAMES=${TTFT_FRAMES:-0,1,8,32} CONCAT_FRAMES=${CONCAT_FRAMES:-8,32} PREFILL_FRAMES=${PREFILL_FRAMES:-32,128}
LONG_FRAMES=${LONG_FRAMES:-128} LONG_CROPS=${LONG_CROPS:-64}
DECODE_FRAMES=${DECODE_FRAMES:-0,8,32,128} DECODE_TOKENS=${DECODE_TOKENS:-64}
BATCH_SIZES=${BATCH_SIZES:-1,4,16} BATCH_TOKENS=${BATCH_TOKENS:-32}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG=$OUT/gpu.log
: >"$LOG"
START=$SECONDS

# step NAME CAP perf.py-arguments...: perf.py for at most CAP seconds (less if the budget is nearly spent).
step() {
    local name=$1 cap=$(($2 * CAP_SCALE))
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 30)); then
        echo "== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
        return
    fi
    echo "== $name (at most ${limit}s): perf.py $*" | tee -a "$LOG"
    timeout -k 10 "$limit" "$PY" benchmarks/perf.py --device "$DEVICE" --models "$MODEL" --dtypes "$DTYPE" \
        ${LAYERS:+--layers "$LAYERS"} --json "$OUT/$name.json" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit code $rc$( ((rc == 124 || rc == 137)) && echo ' (time limit)'), $((SECONDS - START))s so far" \
        | tee -a "$LOG"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    timeout 60 "$PY" -c "import sys, torch, owlvid; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'owlvid', owlvid.__version__)" 2>&1
} | tee "$OUT/env.txt"

# The first token: vision throughput (its per-crop time also gives the in-context baseline's vision time),
# 0/1 frames (warm-up and text-only), 8/32 frames with the in-context baseline, the LLM prefill alone.
step ttft 150 --sections vision,ttft,prefill --vision-crops "$VISION_CROPS" --ttft-frames "$TTFT_FRAMES" \
    --concat-frames "$CONCAT_FRAMES" --prefill-frames "$PREFILL_FRAMES"
step decode 90 --sections decode --decode-frames "$DECODE_FRAMES" --decode-tokens "$DECODE_TOKENS"
step batch 120 --sections batch --batch-sizes "$BATCH_SIZES" --batch-tokens "$BATCH_TOKENS"
# 128 frames last and alone: its in-context baseline prefills 93k tokens (the most memory and time); one
# frame first warms the GPU up (kernel loading) for it.
step long 150 --sections vision,ttft --vision-crops "$LONG_CROPS" --ttft-frames "1,$LONG_FRAMES" \
    --concat-frames "$LONG_FRAMES"

echo "== summary ($((SECONDS - START))s)" | tee -a "$LOG"
"$PY" benchmarks/gpu_table.py "$OUT/ttft.json" "$OUT/decode.json" "$OUT/batch.json" "$OUT/long.json" 2>&1 \
    | tee "$OUT/summary.md"
