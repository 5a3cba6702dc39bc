"""`otterfast bench loader` end to end at a tiny size: equal cores on both sides, each entry says its workers or
threads, Otter's layout gets the repacked and
the pixel-cache variants."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_loader_generated_otter_layout(tmp_path):
    out = tmp_path / "loader.json"
    cmd = [sys.executable, "-m", "otterfast.cli", "bench", "loader", "--generate", "24", "--layouts", "otter",
           "--samples", "8", "--rounds", "1", "--cores", "1", "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    (d,) = r["datasets"]
    assert d["repack"]["seconds"] > 0 and d["decode_floor"]["pil"] > 0 and d["decode_floor"]["native"] > 0
    labels = {c["label"]: c["results"] for c in d["cases"]}
    assert set(labels) == {"as prepared", "after data repack", "with data cache-pixels"}
    assert d["cache_pixels"]["seconds"] > 0 and d["cache_pixels"]["mib"] > 0
    used = {c: [x["pixel_cache"] for x in rs if x["backend"] == "native"] for c, rs in labels.items()}
    assert used == {"as prepared": [0], "after data repack": [0], "with data cache-pixels": [1]}
    prepared = {x["backend"]: x for x in labels["as prepared"]}
    assert prepared["otter_style"]["workers"] == 1 and prepared["native"]["threads"] == 1
    for x in [x for rs in labels.values() for x in rs]:
        assert x["cores"] == 1 and x["samples_per_s"] > 0 and x["peak_rss_mb"] > 0 and x["first_batch_s"] > 0
    assert "vs Otter's path, same cores" in (tmp_path / "loader.md").read_text()
