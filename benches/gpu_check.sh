#!/usr/bin/env bash
# The GPU check, in one go (< 8 minutes on an H100 / H200: timeouts end by 245 + 110 + 40 + 75 = 470 s):
#   1. the kernel tests on the GPU: fp32 (IEEE, against the eager reference), fp16 and bf16, compiled Triton,
#      and the model's block test (fused == eager)
#   2. benches/xattn.py: Otter-MPT7B shapes and a sweep over T and M (bf16), fused vs eager vs SDPA vs flex
#   3. benches/train_gpu.py: a short training run at a ~1B-parameter OtterHD shape, tokens/s and MFU (< 110 s)
#   4. benches/packed_attention.py: self-attention on packed rows of 2k, 8k and 32k tokens, forward + backward,
#      bf16: flash-attn varlen (when installed) and grouped SDPA against the dense block-diagonal mask (< 40 s)
#   5. benches/activation_checkpointing.py: one OtterHD step (d 1024 x 8 layers, a 16k-token row) with
#      activation checkpointing none / decoder / all: peak allocated memory and step time (< 75 s)
# Needs only python with torch, triton, transformers, pyyaml and pytest (no otterfast build, no .venv): kernels/
# and python/ go on PYTHONPATH (the models are pure Python; the native loader is not used here).
#
#   benches/gpu_check.sh OUTDIR
#
# OUTDIR gets at most 8 files (the device tool returns 8): summary.md (environment, test counts, the targets,
# MFU, the packed-attention and checkpointing tables; also printed last), pytest.log, xattn.{csv,md,log},
# train_gpu.{json,log}, and extra.tgz (junit XML, per-process logs, the packed-attention and checkpointing
# JSON). With the device tool, in one call:  benches/gpu_check.sh $OUT
#
#   GPU_CHECK_CPU_SMOKE=1 benches/gpu_check.sh OUTDIR
#
# runs the same script without a GPU (kernel tests in Triton's interpreter, xattn.py --smoke, train_gpu.py
# --cpu-smoke at a tiny shape): a check of the script itself, e.g. in an environment with only the GPU image's
# packages (torch, triton, transformers, pytest), before spending GPU time on it.
set -uo pipefail
OUT="${1:?usage: benches/gpu_check.sh OUTDIR}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RAW="$OUT/raw"  # junit XML, per-process logs, env: bundled into extra.tgz at the end
mkdir -p "$RAW"
export PYTHONPATH="$PWD/kernels:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
# The GPU image's interpreter is `python3` (a plain `python` may not exist there); $PYTHON overrides.
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif command -v python3 >/dev/null 2>&1; then PY=python3
else PY=python; fi
T0=$(date +%s)

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE')"
} > "$RAW/env.txt" 2>&1
cat "$RAW/env.txt"
SMOKE="${GPU_CHECK_CPU_SMOKE:-0}"
BENCH_ARGS=(); TRAIN_ARGS=()
PACKED_ARGS=(--lengths 2048,8192,32768 --dense-max 32768 --reps 3)
CKPT_ARGS=(--tokens 16384 --width 1024 --layers 8 --steps 2)
if [ "$SMOKE" = 1 ]; then
    echo "gpu_check: CPU smoke run (checks this script, measures nothing)" | tee -a "$RAW/env.txt"
    BENCH_ARGS=(--smoke)
    TRAIN_ARGS=(--cpu-smoke --hidden 64 --layers 2 --heads 4 --vocab 512 --seq 256 --sample-len 128 --patches 16
                --steps 2 --warmup 1)
    PACKED_ARGS=(--lengths 512,1024 --reps 1 --heads 2 --head-dim 16)
    CKPT_ARGS=(--tokens 512 --width 128 --layers 2 --steps 1)
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible; nothing to check" | tee -a "$RAW/env.txt"
    exit 2
fi

# 1. tests, in two processes at once (compiling is single-threaded per process, and the box has cores to spare).
#    Quick compile: one config per kernel and no argument specialisation, so the odd test shapes share binaries.
echo "== kernel tests (fp32, fp16, bf16 on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
export OTTERFAST_KERNELS_QUICK_COMPILE=1
timeout 240 "$PY" -m pytest kernels/tests/test_kernel_media_attention.py -q -rs -p no:cacheprovider \
    --junitxml="$RAW/junit-attention.xml" > "$RAW/pytest-attention.log" 2>&1 &
P1=$!
timeout 240 "$PY" -m pytest kernels/tests -q -rs -p no:cacheprovider \
    --ignore kernels/tests/test_kernel_media_attention.py --junitxml="$RAW/junit-rest.xml" > "$RAW/pytest-rest.log" 2>&1 &
P2=$!
wait $P1; RC1=$?
wait $P2; RC2=$?
unset OTTERFAST_KERNELS_QUICK_COMPILE
cat "$RAW/pytest-attention.log" "$RAW/pytest-rest.log" > "$OUT/pytest.log"
cat "$OUT/pytest.log"
TEST_RC=$(( RC1 != 0 || RC2 != 0 ))
echo "pytest exit codes: attention $RC1, rest $RC2 (after $(( $(date +%s) - T0 )) s)" | tee -a "$OUT/pytest.log"

# 2. benchmark. It writes its CSV/markdown after every shape, so a timeout still leaves the finished ones.
echo "== benchmark"
LEFT=$(( 245 - ($(date +%s) - T0) ))
BUDGET=$(( LEFT > 120 ? LEFT - 90 : 30 ))
timeout "$LEFT" "$PY" benches/xattn.py --out "$OUT" --budget-s "$BUDGET" "${BENCH_ARGS[@]}" 2>&1 | tee "$OUT/xattn.log"
BENCH_RC=${PIPESTATUS[0]}
echo "benchmark exit code: $BENCH_RC; total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/xattn.log"

# 3. training throughput and MFU (needs transformers; DeepSpeed when installed, else plain torch)
echo "== training benchmark"
timeout 110 "$PY" benches/train_gpu.py --json "$OUT/train_gpu.json" "${TRAIN_ARGS[@]}" 2>&1 | tee "$OUT/train_gpu.log"
TRAIN_RC=${PIPESTATUS[0]}
echo "training benchmark exit code: $TRAIN_RC; total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/train_gpu.log"

# 4-5. one bench each, its output kept in extra.tgz: NAME TIMEOUT ARGS...
run_bench() {
    local name="$1" limit="$2"; shift 2
    echo "== $name"
    timeout "$limit" "$PY" "benches/$name.py" --json "$RAW/$name.json" "$@" > "$RAW/$name.log" 2>&1
    local rc=$?
    tail -20 "$RAW/$name.log"
    echo "$name exit code: $rc; total $(( $(date +%s) - T0 )) s"
    return $rc
}
run_bench packed_attention 40 "${PACKED_ARGS[@]}"; PACKED_RC=$?  # varlen / grouped SDPA against the dense mask
run_bench activation_checkpointing 75 "${CKPT_ARGS[@]}"; CKPT_RC=$?  # peak memory and step time per mode

# 6. one summary (the device tool returns the end of the output and at most 8 files)
{
    echo "# gpu_check summary ($(date -u '+%Y-%m-%d %H:%M UTC'), $(( $(date +%s) - T0 )) s)"
    echo; echo '```'; cat "$RAW/env.txt"; echo '```'
    echo; echo "## kernel tests (exit codes: attention $RC1, rest $RC2)"; echo; echo '```'
    grep -E "passed|failed|error|SKIPPED|FAILED" "$OUT/pytest.log" | tail -40; echo '```'
    echo; echo "## xattn targets (exit code $BENCH_RC)"; echo; echo '```'
    sed -n '/^targets at the main shape/,$p' "$OUT/xattn.log" | head -40; echo '```'
    echo; echo "## training (exit code $TRAIN_RC)"; echo; echo '```'
    grep -E "^train_gpu" "$OUT/train_gpu.log" | tail -5; echo '```'
    echo; echo "## packed attention (exit code $PACKED_RC)"; echo
    cat "$RAW/packed_attention.md" 2>/dev/null || tail -5 "$RAW/packed_attention.log"
    echo; echo "## activation checkpointing (exit code $CKPT_RC)"; echo
    cat "$RAW/activation_checkpointing.md" 2>/dev/null || tail -5 "$RAW/activation_checkpointing.log"
} > "$OUT/summary.md"
tar -C "$RAW" -czf "$OUT/extra.tgz" . && rm -rf "$RAW"
cat "$OUT/summary.md"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ] && [ "$TRAIN_RC" = 0 ] && [ "$PACKED_RC" = 0 ] && [ "$CKPT_RC" = 0 ]
