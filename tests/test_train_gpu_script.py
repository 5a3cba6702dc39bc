"""benches/train_gpu.py (the GPU check's training benchmark) runs on the CPU at a tiny shape.

The GPU check runs it on a machine with only torch/triton/transformers; this proves the script and the OtterHD
random-init path it builds stay runnable (on transformers 5.17, the GPU image's version, the patch projection
was once sized by FuyuConfig's own hidden_size instead of text_config's: caught by this script's smoke run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_gpu_cpu_smoke(tmp_path):
    out = tmp_path / "train_gpu.json"
    cmd = [sys.executable, os.path.join(ROOT, "benches", "train_gpu.py"), "--cpu-smoke", "--engine", "torch",
           "--hidden", "48", "--layers", "2", "--heads", "4", "--vocab", "300", "--seq", "192",
           "--sample-len", "96", "--patches", "9", "--steps", "2", "--warmup", "1", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["tokens_per_step"] == 192 and res["tokens_per_s"] > 0 and res["hidden"] == 48
    assert res["flops_per_token"] > 6 * res["params"] * 0.5  # 6N + attention, N without the embedding table
