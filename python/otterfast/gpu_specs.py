"""GPU data-sheet figures, the one table: dense bf16 peak (no sparsity) and HBM bandwidth, by device name.

Used by train/metrics.py (MFU) and benches/xattn.py (% of HBM bandwidth). Imports nothing (benches load it from a
source checkout without the package's dependencies).
"""

from __future__ import annotations

# (substring of torch.cuda.get_device_name, dense bf16 TFLOP/s, HBM bytes/s or None), vendors' data sheets.
# The first matching row wins: more specific names first (GH200 before H200, A100 variants before A100, ...).
GPU_SPECS = [
    ("GH200", 989.0, 4.0e12),
    ("H200", 989.0, 4.8e12),
    ("H100 SXM", 989.0, 3.35e12),
    ("H100 NVL", 835.0, 3.9e12),
    ("H100 PCIe", 756.0, 2.0e12),
    ("H100", 989.0, 3.35e12),  # SXM (HBM3)
    ("B200", 2250.0, None),
    ("A100-SXM4-80GB", 312.0, 2.039e12),
    ("A100 80GB PCIe", 312.0, 1.935e12),
    ("A100", 312.0, 1.555e12),
    ("A800", 312.0, None),
    ("L40S", 362.0, 0.864e12),
    ("L40", 181.0, None),
    ("A10G", 70.0, 0.6e12),
    ("A10", 125.0, None),
    ("RTX 4090", 165.0, None),
    ("RTX 3090", 71.0, None),
    ("V100", 125.0, None),
]


def gpu_spec(name: str) -> tuple[float, float | None] | None:
    """(dense bf16 TFLOP/s, HBM bytes/s or None) of the first row whose key is in `name`, else None."""
    for key, tflops, hbm in GPU_SPECS:
        if key in name:
            return tflops, hbm
    return None
