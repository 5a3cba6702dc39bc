#!/usr/bin/env bash
# The kernels' GPU check, in one go (< 8 minutes on an H100):
#   1. the kernel tests on the GPU: fp32 (IEEE, against the eager reference), fp16 and bf16, compiled Triton
#   2. benches/xattn.py: Otter-MPT7B shapes and a sweep over T and M (bf16), fused vs eager vs SDPA vs flex
# Needs only python with torch, triton and pytest (no otterfast build, no .venv): kernels/ goes on PYTHONPATH.
#
#   benches/gpu_check.sh OUTDIR      writes OUTDIR/{env.txt, pytest.log, junit.xml, xattn.log, xattn.csv, xattn.md}
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

# 1. tests. One config per kernel (no autotuning) so each shape class compiles once; -rs lists the skips.
echo "== kernel tests (fp32, fp16, bf16 on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
OTTERFAST_KERNELS_AUTOTUNE=0 timeout 200 "$PY" -m pytest kernels/tests -q -rs -p no:cacheprovider \
    --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.log"
TEST_RC=${PIPESTATUS[0]}
echo "pytest exit code: $TEST_RC (after $(( $(date +%s) - T0 )) s)" | tee -a "$OUT/pytest.log"

# 2. benchmark. It writes its CSV/markdown after every shape, so a timeout still leaves the finished ones.
echo "== benchmark"
LEFT=$(( 450 - ($(date +%s) - T0) ))
BUDGET=$(( LEFT > 120 ? LEFT - 90 : 30 ))
timeout "$LEFT" "$PY" benches/xattn.py --out "$OUT" --budget-s "$BUDGET" 2>&1 | tee "$OUT/xattn.log"
BENCH_RC=${PIPESTATUS[0]}
echo "benchmark exit code: $BENCH_RC; total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/xattn.log"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
