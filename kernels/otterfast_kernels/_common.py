"""What the kernels share: whether Triton can run here, and how it should be configured."""

from __future__ import annotations

import inspect
import os

import torch

try:  # triton is optional: without it only the references are usable
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False


# Triton decides between compiling and interpreting when a kernel is defined (at import), so the answer is the
# environment at import time: setting TRITON_INTERPRET later would not change the kernels already defined.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when our kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when this package was imported)."""
    return _INTERPRET


def quick_compile() -> bool:
    """OTTERFAST_KERNELS_QUICK_COMPILE=1 (the GPU test run): one config per kernel instead of autotuning, and no
    value specialisation of integer and pointer arguments, so that the many odd test shapes share one binary
    per dtype and block shape instead of compiling dozens of variants. Results are the same; speed is not."""
    return os.environ.get("OTTERFAST_KERNELS_QUICK_COMPILE", "0") == "1"


def autotune_enabled() -> bool:
    """Autotune on the GPU over a small config list; never in the interpreter (it cannot, and would be slow)."""
    return not _INTERPRET and not quick_compile()


def kernel_jit(fn):
    """triton.jit, without argument specialisation under quick_compile()."""
    if quick_compile() and not _INTERPRET:
        runtime = [name for name, p in inspect.signature(fn).parameters.items() if p.annotation is inspect.Parameter.empty]
        return triton.jit(do_not_specialize=runtime, do_not_specialize_on_alignment=runtime)(fn)
    return triton.jit(fn)


def fused_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton path can run for tensors on `device`.

    True for a CUDA device when CUDA and triton are present, and for the CPU under TRITON_INTERPRET=1 (tests).
    Callers (the Otter model) fall back to `otterfast_kernels.reference` when this is False.
    """
    if not HAS_TRITON:
        return False
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type == "cuda":
        return torch.cuda.is_available()
    return dev.type == "cpu" and interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied as torch multiplies fp32 matrices: IEEE fp32 at torch's default precision
    ("highest": fp32 is the accuracy path, tests, debugging, ~1e-5 from the reference), TF32 tensor cores when
    the user allowed them (`torch.set_float32_matmul_precision("high")` / `"medium"`), as eager matmuls would.
    IEEE fp32 dots run on the FMA units: measured with compile_sm90.py --resources, ptxas gives the attention
    kernels 32 registers and 20-90 KB of stack per thread there (benches/results/kernels_sm90_resources.md).
    bf16/fp16 use the tensor cores' native precision."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def next_pow2_at_least_16(n: int) -> int:
    """Block sizes for tl.dot: a power of two, and >= 16 (the smallest tensor-core tile)."""
    p = 16
    while p < n:
        p *= 2
    return p


def size_bucket(n: int) -> int:
    """The autotuning key for a size that varies from call to call (sequence length, rows): the next power of two.

    Keyed on the exact size, the autotuner would re-benchmark every config for each new length (evaluation and
    generation see hundreds; each costs the configs' timing runs, ~0.1 s apiece with do_bench's defaults); one
    tuning per power of two is what the configs' relative speed depends on."""
    p = 1
    while p < n:
        p *= 2
    return p


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
