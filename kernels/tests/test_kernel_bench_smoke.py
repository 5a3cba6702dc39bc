"""benches/xattn.py runs end to end (tiny shapes, Triton's CPU interpreter) and writes its CSV and markdown."""

from __future__ import annotations

import csv
import importlib.util
import os

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "benches", "xattn.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is the CPU interpreter's; on a GPU "
                                                      "benches/gpu_check.sh runs the real benchmark")
@pytest.mark.skipif(not os.path.exists(BENCH), reason="benches/ not in this checkout")
def test_bench_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("xattn_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--no-sweep", "--no-flex", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "xattn.csv") as f:
        rows = list(csv.DictReader(f))
    got = {(r["op"], r["method"], r["phase"]) for r in rows}
    for op, methods in (("core", ("fused", "eager", "sdpa")), ("gate", ("fused", "eager")),
                        ("layer", ("fused", "eager", "sdpa"))):
        for m in methods:
            for phase in ("fwd", "bwd", "step"):
                assert (op, m, phase) in got
    # every method computes the same thing as the fused kernels
    assert all(float(r["max_abs_diff_vs_fused"]) < 1e-4 for r in rows)
    md = (tmp_path / "xattn.md").read_text()
    assert "Targets" in md
    # the accuracy check (the autotuned configs on a GPU) ran for every output and gradient of both ops
    for name in ("core out", "core dq", "core dk", "core dv", "gate y", "gate dx", "gate da", "gate dW", "gate dgate"):
        assert f"- {name}:" in md and "TOO LARGE" not in md
