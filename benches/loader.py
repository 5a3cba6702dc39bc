"""Loader benchmark: Otter-style baseline vs reference vs native (1 thread, all cores), side by side.

    otterfast bench loader --data DATA.yaml --json OUT.json          # an existing dataset
    otterfast bench loader --generate 1000 --scales 1,4 --json OUT.json  # a generated real-photo set, 1x and 4x

Every backend runs in its own process (so its peak RSS is its own: VmHWM; the native loader's threads are
inside it), rounds interleaved (backend order rotates) and the median per backend is reported. Measured per
backend: samples/s, images/s, decoded source megapixels/s, non-pad tokens/s (all after the first batch),
padding fraction, peak RSS and construction-to-first-batch time. The decode floor is PIL's
`Image.open(...).convert("RGB")` of the same images on one core (MP/s).

Writes OUT.json ({"results": [...], "decode_floor_mp_per_s_per_core", "env", ...}) and a markdown table
beside it (same name, .md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import env_info, hwm_mb, write_report  # noqa: E402


# ---- generated data --------------------------------------------------------------------------------

def generate(out: str, n: int, seed: int = 0, layout: str = "otter") -> str:
    """n real-photo crops (long side 256-1600 px; 90% JPEG q85-95, 10% PNG) in Otter's table layout
    (pandas index + `base64` column), IMAGE_TEXT, one question per image.

    layout "otter": written as Otter's tools write it, pandas `to_parquet` defaults (one row group; pyarrow
    checks the page size every 1,024 rows, so a page holds ~1,000 images). layout "small": row groups of 64
    rows with small pages and no dictionary, so that a reader can fetch some rows without decompressing the
    whole table (see prepare_memory.md)."""
    import base64

    import pandas as pd
    from PIL import Image

    from otterfast.data.demo import DemoBuilder, build_demo_tokenizer

    os.makedirs(out, exist_ok=True)
    b = DemoBuilder(out, seed=seed)
    rng = np.random.default_rng(seed)
    ids, blobs, data, texts = [], [], {}, []
    for i in range(n):
        c = b.crop()
        long_side = int(rng.integers(256, 1601))
        w, h = c.image.size
        s = long_side / max(w, h)
        img = c.image.resize((max(1, int(w * s)), max(1, int(h * s))), Image.BICUBIC)
        buf = io.BytesIO()
        if rng.random() < 0.9:
            img.save(buf, "JPEG", quality=int(rng.integers(85, 96)))
        else:
            img.save(buf, "PNG")
        ids.append(f"BENCH_IMG_{i:06d}")
        blobs.append(base64.b64encode(buf.getvalue()).decode())
        q, a = b.qa(c)[int(rng.integers(4))]
        data[f"BENCH_INS_{i:06d}"] = {"instruction": q, "answer": a, "image_ids": [ids[-1]], "rel_ins_ids": []}
        texts += [q, a]
    df = pd.DataFrame({"base64": blobs}, index=pd.Index(ids))
    if layout == "otter":
        df.to_parquet(os.path.join(out, "BENCH.parquet"))
    elif layout == "small":
        df.to_parquet(os.path.join(out, "BENCH.parquet"), row_group_size=64, use_dictionary=False,
                      write_batch_size=4, data_page_size=1 << 20)
    else:
        raise ValueError(f"unknown layout {layout!r} (otter, small)")
    with open(os.path.join(out, "BENCH_instructions.json"), "w") as f:
        json.dump({"meta": {}, "data": data}, f)
    with open(os.path.join(out, "data.yaml"), "w") as f:
        f.write("IMAGE_TEXT:\n  BENCH:\n    mimicit_path: BENCH_instructions.json\n    images_path: BENCH.parquet\n")
    build_demo_tokenizer(texts, os.path.join(out, "tokenizer"), vocab_size=1024)
    return os.path.join(out, "data.yaml")


# ---- one backend, in its own process ------------------------------------------------------------------

def worker(a) -> dict:
    import torch  # noqa: F401  every training process has torch: the same floor for every backend

    from otterfast.data.index import PreparedIndex
    from otterfast.data.loader import NativeLoader
    from otterfast.data.otter_style import OtterStyleLoader
    from otterfast.data.reference import ReferenceLoader

    idx = PreparedIndex(a.index)
    w = idx.images.column("width").to_numpy().astype(np.int64)
    h = idx.images.column("height").to_numpy().astype(np.int64)
    media = idx.samples.column("media_images").to_pylist()
    # per-sample image count and source megapixels, so that accounting costs one numpy gather per batch
    n_img_of = np.array([sum(len(m) for m in ms) for ms in media], dtype=np.int64)
    mp_of = np.array([sum(int(w[i] * h[i]) for m in ms for i in m) for ms in media], dtype=np.float64) / 1e6
    t0 = time.perf_counter()
    if a.worker == "otter_style":
        loader = OtterStyleLoader(idx, batch_size=a.batch_size)
    elif a.worker == "reference":
        loader = ReferenceLoader(idx, batch_size=a.rows, pack=True, capacity=a.capacity)
    else:
        loader = NativeLoader(idx, batch_size=a.rows, pack=True, capacity=a.capacity, num_threads=a.threads)
    samples = images = mp = tokens = slots = 0
    first = None
    t_first = None
    for batch in loader:
        rows = batch["sample_index"]
        n_img = int(n_img_of[rows].sum())
        px = float(mp_of[rows].sum())
        if first is None:
            t_first = time.perf_counter()
            first = time.perf_counter() - t0
        else:
            samples += len(rows)
            images += n_img
            mp += px
            tokens += int(batch["attention_mask"].sum())
            slots += int(batch["attention_mask"].size)
        if samples >= a.samples:
            break
    dt = time.perf_counter() - t_first
    return {"backend": a.worker, "threads": a.threads if a.worker == "native" else 1,
            "samples_per_s": samples / dt, "images_per_s": images / dt, "mp_per_s": mp / dt,
            "tokens_per_s": tokens / dt, "padding_fraction": 1 - tokens / slots if slots else 0.0,
            "peak_rss_mb": hwm_mb(), "first_batch_s": first, "samples_measured": samples}


def decode_floor(index: str, n: int = 300) -> float:
    """PIL decode (+ convert RGB) MP/s on one core over the index's first n images."""
    from otterfast.data import images as imgs
    from otterfast.data.index import PreparedIndex
    from otterfast.data.sources import BlobReader

    idx = PreparedIndex(index)
    reader = BlobReader(idx.sources)
    blobs = []
    for r in range(min(n, len(idx.images))):
        src, ref = idx.image_ref(r)
        b = reader.read(src, ref)
        blobs.append(imgs.b64decode(b) if idx.sources[src].encoding == "base64" else b)
    t = time.perf_counter()
    px = 0
    for b in blobs:
        im = imgs.decode_rgb(b)
        px += im.size[0] * im.size[1]
    return px / 1e6 / (time.perf_counter() - t)


def run_worker(index: str, backend: str, threads: int, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, "--index", index, "--threads", str(threads),
           "--samples", str(a.samples), "--capacity", str(a.capacity), "--rows", str(a.rows),
           "--batch-size", str(a.batch_size)]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the Python backends are single-threaded, as Otter's 0 workers
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{backend} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_index(index: str, a, label: str) -> dict:
    cores = os.cpu_count() or 1
    backends = [("otter_style", 1), ("reference", 1), ("native", 1), ("native", cores)]
    runs: dict[tuple, list[dict]] = {b: [] for b in backends}
    for r in range(a.rounds):
        for b in backends[r % len(backends):] + backends[: r % len(backends)]:
            res = run_worker(index, b[0], b[1], a)
            runs[b].append(res)
            print(f"  [{label}] round {r}: {b[0]:<12} x{b[1]}: {res['samples_per_s']:8.1f} samples/s, "
                  f"{res['mp_per_s']:6.1f} MP/s, rss {res['peak_rss_mb']:6.0f} MB, first {res['first_batch_s']:.2f}s",
                  flush=True)
    results = []
    for b, rs in runs.items():
        med = {k: statistics.median(x[k] for x in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        med.update(backend=b[0], threads=b[1])
        results.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in med.items()})
    floor = statistics.median(decode_floor(index) for _ in range(3))
    from otterfast.data.index import PreparedIndex

    idx = PreparedIndex(index)
    return {"label": label, "samples": len(idx), "images": len(idx.images), "results": results,
            "decode_floor_mp_per_s_per_core": round(floor, 2)}


def markdown(report: dict) -> str:
    e = report["env"]
    lines = [f"# loader benchmark ({e['date']}, {e['cpus']} CPUs: {e['cpu']}; {e['simd']})", "",
             f"Packed rows of {report['capacity']} tokens, {report['rows']} row(s) per batch (reference, native; "
             f"defaults otherwise: JPEG draft decoding on); Otter-style: pad-to-longest batches of "
             f"{report['batch_size']}, 0 workers. Medians of {report['rounds']} interleaved rounds, each backend in "
             "its own process with torch imported (peak RSS includes that floor); throughput counts the batches "
             "after the first; first batch = construction to first batch.", ""]
    for part in report["datasets"]:
        lines += [f"## {part['label']}: {part['samples']} samples, {part['images']} images; PIL decode floor "
                  f"{part['decode_floor_mp_per_s_per_core']} MP/s per core", "",
                  "| backend | threads | samples/s | images/s | MP/s | tokens/s | padding | peak RSS MB | first batch s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        base = next(r for r in part["results"] if r["backend"] == "otter_style")["samples_per_s"]
        for r in part["results"]:
            lines.append(f"| {r['backend']} | {r['threads']} | {r['samples_per_s']:.1f} ({r['samples_per_s'] / base:.1f}x) | "
                         f"{r['images_per_s']:.1f} | {r['mp_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                         f"{r['padding_fraction']:.1%} | {r['peak_rss_mb']:.0f} | {r['first_batch_s']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="otterfast bench loader", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="a dataset YAML (prepared with --tokenizer, or its folder's tokenizer/)")
    ap.add_argument("--tokenizer", help="tokenizer folder for --data (default: DATA folder/tokenizer)")
    ap.add_argument("--generate", type=int, default=0, help="generate a real-photo dataset of this many images")
    ap.add_argument("--scales", default="1", help="with --generate: comma-separated multiples, e.g. 1,4")
    ap.add_argument("--json", default="benches/results/loader.json")
    ap.add_argument("--samples", type=int, default=400, help="samples measured per run (after the first batch)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--capacity", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=1, help="packed rows per batch")
    ap.add_argument("--batch-size", type=int, default=8, help="Otter-style batch size")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--index", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    if not a.data and not a.generate:
        ap.error("give --data DATA.yaml or --generate N")
    from otterfast.data.prepare import PrepareOptions, prepare

    report = {"capacity": a.capacity, "rows": a.rows, "batch_size": a.batch_size, "rounds": a.rounds,
              "env": env_info("PIL", "pyarrow"), "datasets": []}
    with tempfile.TemporaryDirectory() as tmp:
        todo = []
        if a.data:
            tok = a.tokenizer or os.path.join(os.path.dirname(os.path.abspath(a.data)), "tokenizer")
            todo.append((os.path.basename(os.path.dirname(os.path.abspath(a.data))) or "data", a.data, tok))
        for s in [int(x) for x in a.scales.split(",")] if a.generate else []:
            d = os.path.join(tmp, f"gen{s}")
            t = time.perf_counter()
            y = generate(d, a.generate * s)
            print(f"generated {a.generate * s} images in {time.perf_counter() - t:.1f}s", flush=True)
            todo.append((f"generated x{s}", y, os.path.join(d, "tokenizer")))
        for label, y, tok in todo:
            out = os.path.join(tmp, "idx-" + label.replace(" ", "_"))
            prepare(y, tok, out, PrepareOptions(format="simple", max_seq_len=min(2048, a.capacity), on_error="skip",
                                                video_frames=8))
            report["datasets"].append(bench_index(out, a, label))
    first = report["datasets"][0]
    report["results"] = first["results"]
    report["decode_floor_mp_per_s_per_core"] = first["decode_floor_mp_per_s_per_core"]
    md = markdown(report)
    md_path = write_report(a.json, report, md)
    print(md)
    print(f"wrote {a.json} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
