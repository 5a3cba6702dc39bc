"""Compile every kernel for a Hopper GPU (sm_90) without one: Triton -> PTX -> cubin with triton's bundled ptxas.

    python kernels/tests/compile_sm90.py [--all-configs]

Run by test_kernel_compile.py in a subprocess: under TRITON_INTERPRET=1 (the CPU test session) triton's own
library functions are interpreted too and cannot be compiled in that process. Prints one line per kernel variant
and exits 1 if any failed to compile or needs more shared memory than an H100 has (227 KiB per block).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--all-configs", action="store_true", help="every autotune config, not just the one the tests use")
ARGS = ap.parse_args()
os.environ.pop("TRITON_INTERPRET", None)
if not ARGS.all_configs:  # the kernels' one quick-compile config: what the GPU test run compiles
    os.environ["OTTERFAST_KERNELS_QUICK_COMPILE"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from otterfast_kernels import gated_residual as gr  # noqa: E402
from otterfast_kernels import media_attention as ma  # noqa: E402

TENSORS = {"_fwd_kernel": {"Q", "K", "V", "O"}, "_bwd_kernel": {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"},
           "_mm_kernel": {"A", "B", "X", "C", "W"}}
SMEM_LIMIT = 227 * 1024


def jit_fn(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def signature(fn, dtype, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "TT":
            sig[name] = "*i64"
        elif name in ("LSE", "TG", "GP"):
            sig[name] = "*fp32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        elif name in TENSORS[fn.__name__]:
            sig[name] = f"*{dtype}"
        else:
            sig[name] = "i32"
    return sig


def variants():
    for dtype, prec in (("bf16", "tf32"), ("fp32", "ieee")):
        for kernel in (ma._fwd_kernel, ma._bwd_kernel):
            for cfg in kernel.configs:
                yield kernel, dtype, dict(cfg.kwargs, BLOCK_L=64, BLOCK_D=64, PREC=prec, UPCAST=False), cfg
        for cfg in gr._mm_kernel.configs:
            for epi in (0, 1, 2):
                yield gr._mm_kernel, dtype, dict(cfg.kwargs, EPI=epi, PREC=prec, UPCAST=False), cfg


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for kernel, dtype, constexprs, cfg in variants():
        fn = jit_fn(kernel)
        t0 = time.perf_counter()
        try:
            c = triton.compile(ASTSource(fn, signature(fn, dtype, constexprs), constexprs), target=target,
                               options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            smem = c.metadata.shared
            ok = smem <= SMEM_LIMIT
            failed += not ok
            print(f"{'ok  ' if ok else 'SMEM'} {fn.__name__} {dtype} {constexprs} warps={cfg.num_warps} "
                  f"stages={cfg.num_stages}: shared {smem} B, {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure, then fail
            failed += 1
            print(f"FAIL {fn.__name__} {dtype} {constexprs}: {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
