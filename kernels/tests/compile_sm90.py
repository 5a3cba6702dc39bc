"""Compile every kernel for a Hopper GPU (sm_90) without one: Triton -> PTX -> cubin with triton's bundled ptxas.

    python kernels/tests/compile_sm90.py [--all-configs] [--resources] [--blocks 64x64,256x256]

Run by test_kernel_compile.py in a subprocess: under TRITON_INTERPRET=1 (the CPU test session) triton's own
library functions are interpreted too and cannot be compiled in that process. Prints one line per kernel variant
and exits 1 if any failed to compile or needs more shared memory than an H100 has (227 KiB per block).
--resources also runs ptxas -v on each PTX and prints registers per thread and spill bytes (a spill is slow, not
wrong); --blocks lists the attention kernels' (BLOCK_L x BLOCK_D) shapes to compile (default 64x64, Otter's).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ap = argparse.ArgumentParser()
ap.add_argument("--all-configs", action="store_true", help="every autotune config, not just the one the tests use")
ap.add_argument("--resources", action="store_true", help="registers and spills per variant (ptxas -v)")
ap.add_argument("--dtypes", default="bf16,fp32", help="which of bf16 (tensor cores) and fp32 (IEEE) to compile")
ap.add_argument("--blocks", default="64x64", help="attention (BLOCK_L x BLOCK_D) shapes, comma-separated")
ap.add_argument("--specialize", action="store_true",
                help="compile as an autotuned run on contiguous tensors sees the kernels: unit inner strides are "
                     "constants (triton specializes integers equal to 1); the default is the tests' quick compile")
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


# Inner (last-dim) strides that are 1 for the contiguous tensors the model passes (text_time's too; the
# projection's operands: a (rows, K), W^T as W's transpose, x, y, W).
UNIT_STRIDES = {"_fwd_kernel": ("sq_d", "sk_d", "sv_d", "stt_t", "so_d"),
                "_bwd_kernel": ("sq_d", "sk_d", "sv_d", "stt_t", "so_d", "sdo_d", "sdq_d", "sdk_d", "sdv_d"),
                "_mm_kernel": ("sa_k", "sb_k", "sx_n", "sc_n", "sw_n")}


def variants():
    blocks = [tuple(int(x) for x in b.split("x")) for b in ARGS.blocks.split(",")]
    for dtype, prec in (("bf16", "tf32"), ("fp32", "ieee")):
        if dtype not in ARGS.dtypes.split(","):
            continue
        for kernel in (ma._fwd_kernel, ma._bwd_kernel):
            for bl, bd in blocks:
                # the autotuner's own pruning (big blocks keep only short query blocks)
                kept = ma._prune(kernel.configs, {"BLOCK_L": bl, "BLOCK_D": bd})
                for cfg in kept:
                    yield kernel, dtype, unit(kernel, dict(cfg.kwargs, BLOCK_L=bl, BLOCK_D=bd, PREC=prec,
                                                           UPCAST=False)), cfg
        for cfg in gr._mm_kernel.configs:
            for epi in (0, 1, 2):
                yield gr._mm_kernel, dtype, unit(gr._mm_kernel, dict(cfg.kwargs, EPI=epi, PREC=prec, UPCAST=False)), cfg


# With --specialize: what triton also marks at Otter-MPT7B shapes: every pointer 16-byte aligned and every other
# integer a multiple of 16 ("tt.divisibility"), which is what lets it vectorise the loads; H = 8 and M = 5 are not.
NOT_MULTIPLE_OF_16 = {"H", "M", "SPLIT"}


def attrs(fn, constexprs):
    if not ARGS.specialize:
        return None
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if name not in constexprs and name not in NOT_MULTIPLE_OF_16 and name not in ("qk_scale", "sm_scale")}


def unit(kernel, constexprs):
    if ARGS.specialize:
        constexprs.update({name: 1 for name in UNIT_STRIDES[jit_fn(kernel).__name__]})
    return constexprs


def ptxas_resources(ptx: str) -> str:
    """'N regs, S B spilled' from triton's bundled ptxas on this PTX (sm_90a, as triton compiles for Hopper)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, f"-arch={arch}", "-v", "-o", os.path.join(d, "k.o"), src],
                           capture_output=True, text=True)
    info = r.stderr + r.stdout
    regs = re.search(r"Used (\d+) registers", info)
    spill = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info)]
    return f"{regs.group(1) if regs else '?'} regs, {max(spill) if spill else '?'} B spilled"


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    failed = 0
    for kernel, dtype, constexprs, cfg in variants():
        fn = jit_fn(kernel)
        t0 = time.perf_counter()
        try:
            c = triton.compile(ASTSource(fn, signature(fn, dtype, constexprs), constexprs, attrs(fn, constexprs)),
                               target=target,
                               options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            smem = c.metadata.shared
            ok = smem <= SMEM_LIMIT
            failed += not ok
            res = f", {ptxas_resources(c.asm['ptx'])}" if ARGS.resources else ""
            print(f"{'ok  ' if ok else 'SMEM'} {fn.__name__} {dtype} {constexprs} warps={cfg.num_warps} "
                  f"stages={cfg.num_stages}: shared {smem} B{res}, {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure, then fail
            failed += 1
            print(f"FAIL {fn.__name__} {dtype} {constexprs}: {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
