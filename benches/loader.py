"""Loader benchmark: Otter's data path as its trainer runs it vs the native loader, at equal cores, side by side.

    otterfast bench loader --generate 2000 --scales 1,4          # generated real-photo sets, Otter's file layout
    otterfast bench loader --data DATA.yaml                      # an existing dataset
    otterfast bench loader --shards 2000,500                     # generated webdataset shards: pairs, documents

Backends, each in its own process pinned to the same cores (1 core, then all cores):
- otter_style: Otter's path (data/otter_style.py): the image tables read whole into pandas before the fork, a torch
  DataLoader with as many worker processes as cores (Otter's `--workers`), per sample base64 + PIL decode +
  square bicubic resize + normalise, text tokenized again, batches of `--batch-size` padded to the longest.
- native: NativeLoader with as many threads as cores, packed rows of `--capacity` tokens, default options (full
  JPEG decode: draft decoding is opt-in).
Datasets: generated photos written as Otter's tools write them (`--layouts otter`: pandas `to_parquet` defaults, one
row group) and in small row groups (`small`); on Otter's layout the native loader runs on the index as prepared and
after `otterfast data repack` and with `otterfast data cache-pixels` (the pixels of every image decoded once, read by
every later epoch; each one-time cost reported). Measured per backend after the first batch: samples/s,
images/s, decoded source MP/s, non-pad tokens/s, padding; peak RSS (with workers: the main process plus each
worker's peak, fork-shared pages counted in each); construction to first batch. Rounds interleaved (order rotates),
medians reported. The decode floor: the same images decoded on one core, by PIL and by the native decoder.
With `--shards PAIRS,DOCS`: generated webdataset tar shards (LAION-style pairs and MMC4-style documents of the
same photos), each kind its own dataset; backends otter_wds (Otter's webdataset pipeline, data/otter_wds.py: tar
streaming, PIL decode, CLIP processor, Otter's padding, DataLoader workers = cores) and native (the shard index).
Writes OUT.json and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import children_hwm_mb, env_info, hwm_mb, pin_cores, write_report  # noqa: E402


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


def generate_shards(out: str, n_pairs: int, n_docs: int, seed: int = 0, n_shards: int = 4) -> dict[str, str]:
    """Webdataset shards of real-photo crops (long side 256-1600 px, 90% JPEG, 10% PNG): `pairs/` (caption + image,
    one in ten stored as base64 text in a .png member) and `docs/` (MMC4 documents, 2-5 images each, matched_sim in
    [0.3, 0.5] so some fall under 0.32), a tokenizer, and one YAML per kind. Returns {kind: yaml}."""
    from PIL import Image

    from otterfast.data.demo import DemoBuilder, build_demo_tokenizer
    from otterfast.data.shard_writer import mmc4_member, pair_members, write_tar

    b = DemoBuilder(out, seed=seed)
    rng = np.random.default_rng(seed)

    def photo():
        c = b.crop()
        long_side = int(rng.integers(256, 1601))
        w, h = c.image.size
        sc = long_side / max(w, h)
        img = c.image.resize((max(1, int(w * sc)), max(1, int(h * sc))), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(85, 96))) if rng.random() < 0.9 else img.save(buf, "PNG")
        return c, buf.getvalue()

    texts, pairs, docs = [], [[] for _ in range(n_shards)], [[] for _ in range(n_shards)]
    for i in range(n_pairs):
        c, data = photo()
        caption = f"A photo of {c.desc}, the {c.part} part."
        texts.append(caption)
        pairs[i % n_shards] += pair_members(f"p{i:07d}", caption, data, ext="png" if i % 10 == 0 else "jpg",
                                            as_base64=i % 10 == 0)
    for i in range(n_docs):
        sentences, images = [], []
        for _ in range(int(rng.integers(2, 6))):
            c, data = photo()
            images.append((data, len(sentences), float(rng.uniform(0.3, 0.5))))
            sentences += [f"This is part of a photo of {c.desc}.", f"It shows the {c.part} part of it."]
        texts += sentences
        docs[i % n_shards].append(mmc4_member(f"d{i:07d}", sentences, images))
    last = f"{n_shards - 1:05d}"
    out_yaml = {}
    for kind, group, members in (("pairs", "LAION", pairs), ("docs", "MMC4", docs)):
        for k in range(n_shards):
            write_tar(os.path.join(out, kind, f"{k:05d}.tar"), members[k])
        y = os.path.join(out, f"{kind}.yaml")
        with open(y, "w") as f:
            f.write(f'{group}:\n  BENCH_{kind}: {{shards: "{kind}/{{00000..{last}}}.tar"}}\n')
        out_yaml[kind] = y
    build_demo_tokenizer(texts, os.path.join(out, "tokenizer"), vocab_size=1024)
    return out_yaml


# ---- one backend, in its own process ------------------------------------------------------------------

def worker(a) -> dict:
    pin_cores(a.threads)
    import torch

    torch.set_num_threads(1)  # the consumer only counts; every process the same

    from otterfast.data.index import PreparedIndex
    from otterfast.data.loader import NativeLoader

    idx = PreparedIndex(a.index)
    w = idx.images.column("width").to_numpy().astype(np.int64)
    h = idx.images.column("height").to_numpy().astype(np.int64)
    media = idx.samples.column("media_images").to_pylist()
    # per-sample image count and source megapixels, so that accounting costs one numpy gather per batch
    n_img_of = np.array([sum(len(m) for m in ms) for ms in media], dtype=np.int64)
    mp_of = np.array([sum(int(w[i] * h[i]) for m in ms for i in m) for ms in media], dtype=np.float64) / 1e6
    t0 = time.perf_counter()
    if a.worker == "otter_style":
        from otterfast.data.otter_style import otter_dataloader

        loader = otter_dataloader(idx, workers=a.threads, batch_size=a.batch_size, epochs=20)
    elif a.worker == "otter_wds":
        from otterfast.data.otter_wds import otter_wds_dataloader

        files = [f for src in idx.sources for f in src.files]
        files = list(dict.fromkeys(files))  # raw and base64 sources list the same tars
        kind = idx.meta["datasets"][0]["group"]
        loader = otter_wds_dataloader(files, kind, os.path.join(a.index, "tokenizer"), workers=a.threads,
                                      batch_size=a.batch_size)
    else:
        loader = NativeLoader(idx, batch_size=a.rows, pack=True, capacity=a.capacity, num_threads=a.threads)
    samples = images = mp = tokens = slots = 0
    first = t_first = None
    done = False
    while not done:
        for batch in loader:
            rows = np.asarray(batch.get("sample_index", []))
            mask = np.asarray(batch["attention_mask"])
            if first is None:
                t_first = time.perf_counter()
                first = t_first - t0
                continue
            if "n_samples" in batch:  # otter_wds: its own samples (not index rows), counted by the pipeline
                samples += int(batch["n_samples"])
                images += int(batch["n_images"])
                mp += float(batch["mp"])
            else:
                samples += len(rows)
                images += int(n_img_of[rows].sum())
                mp += float(mp_of[rows].sum())
            tokens += int(mask.sum())
            slots += int(mask.size)
            if samples >= a.samples:
                done = True
                break
    dt = time.perf_counter() - t_first
    return {"backend": a.worker, ("workers" if a.worker.startswith("otter") else "threads"): a.threads,
            "cores": a.threads, "samples_per_s": samples / dt, "images_per_s": images / dt, "mp_per_s": mp / dt,
            "tokens_per_s": tokens / dt, "padding_fraction": 1 - tokens / slots if slots else 0.0,
            "peak_rss_mb": hwm_mb() + children_hwm_mb(), "first_batch_s": first, "samples_measured": samples,
            "pixel_cache": int(bool(getattr(loader, "pixel_cache", None)))}


def decode_floor(index: str, n: int = 300) -> dict:
    """MP/s on one core decoding the index's first n images to RGB: PIL (Otter's decoder) and the native decoder
    (what the native loader runs per image before its resize)."""
    before = os.sched_getaffinity(0)
    pin_cores(1)  # this process's affinity is inherited by every backend process started later: restored below
    try:
        return _decode_floor(index, n)
    finally:
        os.sched_setaffinity(0, before)


def _decode_floor(index: str, n: int) -> dict:
    from otterfast import _native
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
    out = {}
    for name, fn in (("pil", lambda b: imgs.decode_rgb(b).size), ("native", lambda b: _native.decode_image(b).shape)):
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            px = 0
            for b in blobs:
                size = fn(b)
                px += size[0] * size[1]
            runs.append(px / 1e6 / (time.perf_counter() - t))
        out[name] = round(statistics.median(runs), 1)
    return out


def run_worker(index: str, backend: str, threads: int, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, "--index", index, "--threads", str(threads),
           "--samples", str(a.samples), "--capacity", str(a.capacity), "--rows", str(a.rows),
           "--batch-size", str(a.batch_size)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{backend} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_once(call: str, index: str, what: str) -> dict:
    """`call` (a Python expression on sys.argv[1]) in its own process: seconds and peak RSS."""
    # VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across execve, so a child would report this
    # process's peak (measured: 4.4 GB after generating the photos, for a repack that peaks at 0.7 GB)
    code = ("import json,sys,time;from report import hwm_mb;" + call.split(";", 1)[0] + ";"
            "t=time.perf_counter();" + call.split(";", 1)[1] + ";"
            "print(json.dumps({'seconds': time.perf_counter()-t, 'peak_rss_mb': hwm_mb()}))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                                        os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code, index], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{what} failed:\n{out.stderr[-3000:]}")
    return {k: round(v, 2) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def run_repack(index: str) -> dict:
    """`otterfast data repack` in its own process: seconds and peak RSS."""
    return _run_once("from otterfast.data.repack import repack;repack(sys.argv[1], log=lambda *_: None)", index,
                     "repack")


def run_cache_pixels(index: str, threads: int) -> dict:
    """`otterfast data cache-pixels` (the native loader's default transform, Otter's 224 square) in its own process
    on `threads` cores: seconds, peak RSS and the cache's size."""
    before = os.sched_getaffinity(0)
    pin_cores(threads)  # inherited by the child; restored below
    try:
        r = _run_once("from otterfast.data.pixel_cache import build;"
                      f"build(sys.argv[1], transform='otter', size=224, threads={threads})", index, "cache-pixels")
    finally:
        os.sched_setaffinity(0, before)
    r["mib"] = round(sum(os.path.getsize(os.path.join(index, "pixels", f)) for f in os.listdir(
        os.path.join(index, "pixels"))) / 2**20, 1)
    r["threads"] = threads
    return r


def bench_cases(cases: list[tuple[str, str, list[tuple[str, int]]]], a) -> list[dict]:
    """cases: (label, index, [(backend, cores)]); every (case, backend) once per round, order rotating."""
    jobs = [(c, b) for c, (_, _, backends) in enumerate(cases) for b in backends]
    runs: dict[tuple, list[dict]] = {j: [] for j in jobs}
    for r in range(a.rounds):
        k = r % len(jobs)
        for c, b in jobs[k:] + jobs[:k]:
            label, index, _ = cases[c]
            res = run_worker(index, b[0], b[1], a)
            runs[(c, b)].append(res)
            print(f"  round {r} [{label}] {b[0]:<11} x{b[1]}: {res['samples_per_s']:8.1f} samples/s, "
                  f"{res['mp_per_s']:6.1f} MP/s, rss {res['peak_rss_mb']:6.0f} MB, first {res['first_batch_s']:.2f}s",
                  flush=True)
    out = []
    for c, (label, index, backends) in enumerate(cases):
        results = []
        for b in backends:
            rs = runs[(c, b)]
            med = {k: statistics.median(x[k] for x in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
            med["backend"] = b[0]
            results.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in med.items()})
        out.append({"label": label, "results": results})
    return out


def markdown(report: dict) -> str:
    e = report["env"]
    lines = [f"# loader benchmark ({e['date']}, {e['cpus']} CPUs: {e['cpu']}; {e['simd']})", "",
             f"native: packed rows of {report['capacity']} tokens, {report['rows']} row(s) per batch, default options "
             f"(full JPEG decode), `threads` = cores. otter_style: Otter's path in a torch DataLoader, `workers` = "
             f"cores, pad-to-longest batches of {report['batch_size']}. Each run in its own process pinned to its "
             f"cores; medians of {report['rounds']} interleaved rounds; throughput after the first batch; first "
             "batch = construction to first batch; peak RSS includes torch's import and, for otter_style, every "
             "worker's peak." + (" otter_wds (shard datasets): Otter's webdataset pipeline (data/otter_wds.py: tar "
                                 "streaming, PIL decode, CLIP processor, LAION padded to the longest of 32 tokens, MMC4 "
                                 "to 256 tokens and 5 images), `workers` = cores, batches of "
                                 f"{report['batch_size']}; native on the prepared shard index."
                                 if any("shards" in d.get("kind", "") for d in report["datasets"]) else ""), ""]
    for d in report["datasets"]:
        lines += [f"## {d['label']}: {d['samples']} samples, {d['images']} images, image table "
                  f"{d['table_mib']} MiB", "",
                  f"Decode floor on one core (same images to RGB): PIL {d['decode_floor']['pil']} MP/s, native "
                  f"{d['decode_floor']['native']} MP/s." + (f" `otterfast data repack`: {d['repack']['seconds']} s once, "
                                                             f"peak RSS {d['repack']['peak_rss_mb']:.0f} MB."
                                                             if d.get("repack") else "")
                  + (f" `otterfast data cache-pixels` on {d['cache_pixels']['threads']} cores: "
                     f"{d['cache_pixels']['seconds']} s once, {d['cache_pixels']['mib']} MiB on disk, peak RSS "
                     f"{d['cache_pixels']['peak_rss_mb']:.0f} MB; the rows with it are every epoch after the one "
                     "that paid for it (bit-identical batches)." if d.get("cache_pixels") else ""), "",
                  "| index | backend | cores | samples/s | vs Otter's path, same cores | MP/s | tokens/s | padding | "
                  "peak RSS MB | first batch s |", "|---|---|---|---|---|---|---|---|---|---|"]
        base = {r["cores"]: r["samples_per_s"] for case in d["cases"] for r in case["results"]
                if r["backend"] in ("otter_style", "otter_wds")}
        for case in d["cases"]:
            for r in case["results"]:
                ratio = f"{r['samples_per_s'] / base[r['cores']]:.2f}x" if r["cores"] in base else "-"
                lines.append(f"| {case['label']} | {r['backend']} | {r['cores']} | {r['samples_per_s']:.1f} | {ratio} | "
                             f"{r['mp_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['padding_fraction']:.1%} | "
                             f"{r['peak_rss_mb']:.0f} | {r['first_batch_s']:.2f} |")
        lines.append("")
        lines += _cache_amortised(d, base)
    return "\n".join(lines)


def _cache_amortised(d: dict, base: dict) -> list[str]:
    """Whole runs of E epochs with the pixel cache, its one-time build included, against Otter's path for E epochs
    (at the cores the cache was built with): E * N / otter against build + E * N / cached."""
    cp = d.get("cache_pixels")
    cached = [r for c in d["cases"] if c["label"] == "with data cache-pixels" for r in c["results"]
              if r["cores"] == cp["threads"]] if cp else []
    if not cached or cp["threads"] not in base:
        return []
    n, otter, fast = d["samples"], base[cp["threads"]], cached[0]["samples_per_s"]
    runs = [f"{e} epoch{'s' if e > 1 else ''} {e * n / otter / (cp['seconds'] + e * n / fast):.1f}x" for e in (1, 3, 10)]
    return [f"Whole runs with the cache built first, its {cp['seconds']} s included, against Otter's path for the same "
            f"epochs at {cp['threads']} cores: " + ", ".join(runs) + ".", ""]


def _table_mib(index: str) -> float:
    from otterfast.data.index import PreparedIndex

    files = {f for s in PreparedIndex(index).sources for f in s.files}
    return round(sum(os.path.getsize(f) for f in files) / 2**20, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="otterfast bench loader", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="a dataset YAML (prepared with --tokenizer, or its folder's tokenizer/)")
    ap.add_argument("--tokenizer", help="tokenizer folder for --data (default: DATA folder/tokenizer)")
    ap.add_argument("--generate", type=int, default=0, help="generate a real-photo dataset of this many images")
    ap.add_argument("--scales", default="1", help="with --generate: comma-separated multiples of Otter's layout, e.g. 1,4 "
                    "(scales above 1 run all cores only: they are there for memory)")
    ap.add_argument("--layouts", default="otter,small", help="with --generate: otter (pandas defaults), small")
    ap.add_argument("--shards", help="PAIRS,DOCS: generate webdataset shards of that many LAION-style pairs and "
                    "MMC4-style documents and compare with Otter's webdataset pipeline")
    ap.add_argument("--cores", default=None, help="comma-separated core counts (default: 1 and all)")
    ap.add_argument("--json", default="benches/results/loader.json")
    ap.add_argument("--samples", type=int, default=1500, help="samples measured per run (after the first batch; fewer "
                    "weigh the native side's first full window of reads, measured: 3.35x at 1,500 vs 2.44x at 300)")
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
    if not a.data and not a.generate and not a.shards:
        ap.error("give --data DATA.yaml, --generate N or --shards PAIRS,DOCS")
    from otterfast.data.prepare import PrepareOptions, prepare

    all_cores = len(os.sched_getaffinity(0))
    cores = [int(x) for x in a.cores.split(",")] if a.cores else sorted({1, all_cores})
    report = {"capacity": a.capacity, "rows": a.rows, "batch_size": a.batch_size, "rounds": a.rounds,
              "cores": cores, "env": env_info("PIL", "pyarrow", "torch"), "datasets": []}
    opts = PrepareOptions(format="simple", max_seq_len=min(2048, a.capacity), on_error="skip", video_frames=8)
    with tempfile.TemporaryDirectory() as tmp:
        todo = []  # (label, yaml, tokenizer, layout, scale)
        if a.data:
            tok = a.tokenizer or os.path.join(os.path.dirname(os.path.abspath(a.data)), "tokenizer")
            todo.append((os.path.basename(os.path.dirname(os.path.abspath(a.data))) or "data", a.data, tok, "given", 1))
        for layout in a.layouts.split(",") if a.generate else []:
            for s in [int(x) for x in a.scales.split(",")] if layout == "otter" else [1]:  # growth: Otter's layout
                d = os.path.join(tmp, f"gen-{layout}-{s}")
                t = time.perf_counter()
                y = generate(d, a.generate * s, layout=layout)
                print(f"generated {a.generate * s} images ({layout} layout) in {time.perf_counter() - t:.1f}s", flush=True)
                todo.append((f"{layout} layout x{s}", y, os.path.join(d, "tokenizer"), layout, s))
        if a.shards:
            n_pairs, n_docs = (int(x) for x in a.shards.split(","))
            d = os.path.join(tmp, "gen-shards")
            t = time.perf_counter()
            ys = generate_shards(d, n_pairs, n_docs)
            print(f"generated {n_pairs} pairs and {n_docs} documents as shards in {time.perf_counter() - t:.1f}s",
                  flush=True)
            todo += [(f"LAION pairs ({n_pairs})", ys["pairs"], os.path.join(d, "tokenizer"), "shards", 1),
                     (f"MMC4 documents ({n_docs})", ys["docs"], os.path.join(d, "tokenizer"), "shards", 1)]
        for label, y, tok, layout, scale in todo:
            out = os.path.join(tmp, "idx-" + label.replace(" ", "_"))
            prepare(y, tok, out, opts)
            on = cores if scale == 1 else [max(cores)]
            base = "otter_wds" if layout == "shards" else "otter_style"
            cases = [("as prepared", out, [(base, c) for c in on] + [("native", c) for c in on])]
            entry = {"label": label, "kind": layout, "table_mib": _table_mib(out), "decode_floor": decode_floor(out)}
            if layout == "otter":
                rp = out + "-repacked"
                shutil.copytree(out, rp)
                entry["repack"] = run_repack(rp)
                cases.append(("after data repack", rp, [("native", c) for c in on]))
            if layout in ("otter", "shards"):
                pc = out + "-pixel-cache"
                shutil.copytree(out, pc)
                entry["cache_pixels"] = run_cache_pixels(pc, max(cores))
                cases.append(("with data cache-pixels", pc, [("native", c) for c in on]))
            from otterfast.data.index import PreparedIndex

            idx = PreparedIndex(out)
            entry.update(samples=len(idx), images=len(idx.images), cases=bench_cases(cases, a))
            report["datasets"].append(entry)
            shutil.rmtree(os.path.dirname(y), ignore_errors=True) if a.generate and layout != "shards" else None
    md = markdown(report)
    md_path = write_report(a.json, report, md)
    print(md)
    print(f"wrote {a.json} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
