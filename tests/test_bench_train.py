"""`otterfast bench train` end to end at a tiny size: every result entry carries what the issue asks for."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_bench_train_json_entries(demo_dir, tmp_path):
    out = tmp_path / "train.json"
    cmd = [sys.executable, "-m", "otterfast.cli", "bench", "train", "--data", os.path.join(demo_dir, "data.yaml"),
           "--samples", "12", "--rounds", "1", "--capacities", "256,512", "--cores", "1", "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert {x["backend"] for x in r["results"]} == {"native", "otter_style"}
    for x in r["results"]:
        assert x["model"] == "otter" and ("threads" in x or "workers" in x)
        assert x["tokens_per_s"] > 0 and x["peak_rss_mb"] > 0
        assert "capacity" in x and (x["capacity"] in (256, 512) if x["backend"] == "native" else x["capacity"] is None)
    assert next(x for x in r["results"] if x["backend"] == "otter_style")["workers"] == 1
    assert set(r["ratios"]) == {"256", "512"} and r["env"]["cpus"]
    assert (tmp_path / "train.md").exists()
