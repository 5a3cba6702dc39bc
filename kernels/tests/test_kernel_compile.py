"""The kernels compile for a Hopper GPU (sm_90: Triton -> PTX -> cubin with the bundled ptxas) on any machine.

The interpreter runs the kernels' Python, not Triton's compiler: without this, a change that only breaks GPU
compilation (a dot under 16, a loop-carried type change, too much shared memory) would pass CPU CI.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_sm90.py")


def test_kernels_compile_for_sm90():
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count("ok  ") == 10, r.stdout
