#!/usr/bin/env bash
# The kernels' GPU check, in one go (< 8 minutes on an H100):
#   1. the kernel tests on the GPU: fp32 (IEEE, against the eager reference), fp16 and bf16, compiled Triton,
#      and the model's block test (fused == eager)
#   2. benches/xattn.py: Otter-MPT7B shapes and a sweep over T and M (bf16), fused vs eager vs SDPA vs flex
#   3. benches/train_gpu.py: a short training run at a ~1B-parameter OtterHD shape, tokens/s and MFU (< 150 s)
# Needs only python with torch, triton and pytest (no otterfast build, no .venv): kernels/ goes on PYTHONPATH.
#
#   benches/gpu_check.sh OUTDIR      writes OUTDIR/{env.txt, pytest*.log, junit-*.xml, xattn.*, train_gpu.*}
set -uo pipefail
OUT="${1:?usage: benches/gpu_check.sh OUTDIR}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
T0=$(date +%s)

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible; nothing to check" | tee -a "$OUT/env.txt"
    exit 2
fi

# 1. tests, in two processes at once (compiling is single-threaded per process, and the box has cores to spare).
#    Quick compile: one config per kernel and no argument specialisation, so the odd test shapes share binaries.
echo "== kernel tests (fp32, fp16, bf16 on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
export OTTERFAST_KERNELS_QUICK_COMPILE=1
timeout 240 "$PY" -m pytest kernels/tests/test_kernel_media_attention.py -q -rs -p no:cacheprovider \
    --junitxml="$OUT/junit-attention.xml" > "$OUT/pytest-attention.log" 2>&1 &
P1=$!
timeout 240 "$PY" -m pytest kernels/tests -q -rs -p no:cacheprovider \
    --ignore kernels/tests/test_kernel_media_attention.py --junitxml="$OUT/junit-rest.xml" > "$OUT/pytest-rest.log" 2>&1 &
P2=$!
wait $P1; RC1=$?
wait $P2; RC2=$?
unset OTTERFAST_KERNELS_QUICK_COMPILE
cat "$OUT/pytest-attention.log" "$OUT/pytest-rest.log" > "$OUT/pytest.log"
cat "$OUT/pytest.log"
TEST_RC=$(( RC1 != 0 || RC2 != 0 ))
echo "pytest exit codes: attention $RC1, rest $RC2 (after $(( $(date +%s) - T0 )) s)" | tee -a "$OUT/pytest.log"

# 2. benchmark. It writes its CSV/markdown after every shape, so a timeout still leaves the finished ones.
echo "== benchmark"
LEFT=$(( 330 - ($(date +%s) - T0) ))
BUDGET=$(( LEFT > 120 ? LEFT - 90 : 30 ))
timeout "$LEFT" "$PY" benches/xattn.py --out "$OUT" --budget-s "$BUDGET" 2>&1 | tee "$OUT/xattn.log"
BENCH_RC=${PIPESTATUS[0]}
echo "benchmark exit code: $BENCH_RC; total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/xattn.log"

# 3. training throughput and MFU (needs transformers; DeepSpeed when installed, else plain torch)
echo "== training benchmark"
timeout 150 "$PY" benches/train_gpu.py --json "$OUT/train_gpu.json" 2>&1 | tee "$OUT/train_gpu.log"
TRAIN_RC=${PIPESTATUS[0]}
echo "training benchmark exit code: $TRAIN_RC; total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/train_gpu.log"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ] && [ "$TRAIN_RC" = 0 ]
