"""Does `data prepare` stay bounded by the index, not the images? Peak RSS vs image-table size.

Writes an Otter-layout table (pandas index, base64 column, ONE row group, as `DataFrame.to_parquet` gives for
a few thousand rows) of N noisy JPEGs, then runs `otterfast data prepare` on it in a child process and
reads the child's peak RSS. Also times the same prepare with the table read the way Otter's loader does
(`iter_batches(1000)` -> pandas -> concat) for the side-by-side memory ratio.

    .venv/bin/python benches/prepare_memory.py [--images 400] [--side 800]
Writes benches/results/prepare_memory.json and .md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_dataset(root: str, n: int, side: int, layout: str = "dictionary") -> str:
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    ids, b64 = [], []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (side * 3 // 4, side, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        ids.append(f"B_IMG_{i:06d}")
        b64.append(base64.b64encode(buf.getvalue()).decode())
    df = pd.DataFrame({"base64": b64}, index=pd.Index(ids))
    if layout == "dictionary":  # pandas' default: the whole column lands in ONE dictionary page (unique strings)
        df.to_parquet(os.path.join(root, "B.parquet"))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # "plain": no dictionary, but the writer checks page size every 1024 rows, so still one page;
        # "paged": page size checked every 8 rows, so ~1 MiB pages.
        pq.write_table(pa.Table.from_pandas(df), os.path.join(root, "B.parquet"), use_dictionary=False,
                       write_batch_size=1024 if layout == "plain" else 8)
    data = {f"B_INS_{i:06d}": {"instruction": "What is this?", "answer": "Noise.", "image_ids": [ids[i]],
                               "rel_ins_ids": []} for i in range(n)}
    with open(os.path.join(root, "B_instructions.json"), "w") as f:
        json.dump({"meta": {}, "data": data}, f)
    with open(os.path.join(root, "data.yaml"), "w") as f:
        f.write("IMAGE_TEXT:\n  B:\n    mimicit_path: B_instructions.json\n    images_path: B.parquet\n")
    return os.path.join(root, "data.yaml")


# VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child would report its parent's peak.
HWM = """
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""

CHILD_OTTERFAST = HWM + """
import resource, sys, time
from otterfast.data.prepare import PrepareOptions, prepare
t = time.perf_counter()
prepare(sys.argv[1], sys.argv[2], sys.argv[3], PrepareOptions())
print(time.perf_counter() - t, hwm())
"""

CHILD_OTTER_STYLE = HWM + """
import resource, sys, time
import pandas as pd, pyarrow.parquet as pq
t = time.perf_counter()
pf = pq.ParquetFile(sys.argv[1])
df = pd.concat([b.to_pandas() for b in pf.iter_batches(batch_size=1000)])  # Otter's MimicitDataset.__init__
print(time.perf_counter() - t, hwm())
"""

CHILD_BASELINE = HWM + """
import resource, sys, time
t = time.perf_counter()
from otterfast.data.prepare import PrepareOptions, prepare  # imports + tokenizer: the floor of the process
from otterfast.data.tokenizer import load_tokenizer
load_tokenizer(sys.argv[1], "simple")
print(time.perf_counter() - t, hwm())
"""


LAYOUTS = {
    "dictionary": "pandas default: one dictionary page",
    "plain": "use_dictionary=False: one data page",
    "paged": "use_dictionary=False, write_batch_size=8: 1 MiB pages",
}


def run(code: str, *args: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    secs, kib = out.split()
    return float(secs), int(kib) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--side", type=int, default=800)
    a = ap.parse_args()
    from otterfast.data.demo import build_demo_tokenizer

    layouts = {}
    for layout in ("dictionary", "plain", "paged"):
        with tempfile.TemporaryDirectory() as root:
            y = make_dataset(root, a.images, a.side, layout)
            tok = os.path.join(root, "tok")
            build_demo_tokenizer(["What is this? Noise."] * 10, tok, vocab_size=300)
            table_mb = os.path.getsize(os.path.join(root, "B.parquet")) / 2**20
            base = run(CHILD_BASELINE, tok)
            ours = run(CHILD_OTTERFAST, y, tok, os.path.join(root, "idx"))
            otter = run(CHILD_OTTER_STYLE, os.path.join(root, "B.parquet"))
        layouts[LAYOUTS[layout]] = (table_mb, ours, otter)
    res = {
        "images": a.images, "image_size": f"{a.side}x{a.side * 3 // 4} JPEG q90 (noise)",
        "process_floor_peak_rss_mib": round(base[1], 1),
        "layouts": {
            name: {"table_mib": round(t, 1),
                   "otterfast_prepare": {"seconds": round(o[0], 2), "peak_rss_mib": round(o[1], 1),
                                         "images_per_s": round(a.images / o[0], 1)},
                   "otter_style_read": {"seconds": round(r[0], 2), "peak_rss_mib": round(r[1], 1)}}
            for name, (t, o, r) in layouts.items()},
        "env": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d"),
    }
    os.makedirs("benches/results", exist_ok=True)
    with open("benches/results/prepare_memory.json", "w") as f:
        json.dump(res, f, indent=1)
    md = (f"# prepare memory ({res['date']}, {res['env']['cpus']} CPUs, Python {res['env']['python']})\n\n"
          f"Image table: {a.images} images, {res['image_size']}, one row group, written three ways.\n"
          f"Floor of the process (imports incl. torch via transformers, tokenizer loaded): {base[1]:.0f} MiB peak RSS.\n"
          "Peak memory of prepare above that floor is about 2x the largest page of the image column (compressed +\n"
          "decompressed): for tables written with pandas/dask defaults the whole row group's column is one page.\n\n"
          "| table layout | table MiB | run | seconds | peak RSS MiB |\n|---|---|---|---|---|\n")
    for name, (t, o, r) in layouts.items():
        md += f"| {name} | {t:.0f} | otterfast data prepare (index + headers) | {o[0]:.2f} | {o[1]:.0f} |\n"
        md += f"| {name} | {t:.0f} | Otter's read (iter_batches -> pandas -> concat, no decode) | {r[0]:.2f} | {r[1]:.0f} |\n"
    with open("benches/results/prepare_memory.md", "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
