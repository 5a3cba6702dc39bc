"""Soak: the native loader over the demo data for many epochs with `on_error: skip` and planted corrupt images.

    .venv/bin/python benches/soak.py                      # 20 epochs, demo scale 0.5, writes results/soak.{json,md}
    .venv/bin/python benches/soak.py --epochs 3 --scale 0.2 --json /tmp/soak.json   # a quick look

What it does: builds the demo dataset (`otterfast data demo`) in a temp folder, rewrites that copy's DEMO_IMG
table with some images spoiled (kinds below), prepares it with `on_error: skip`, and iterates the native loader
`--epochs` times. Per epoch: batches, samples, the loader's skip count against the number of planned samples that
hold a spoiled image (from the plan, before decoding) and how many of those were yielded anyway (decoded without
an error: a damaged image trained on), this process's resident set at the epoch's end (VmRSS)
and its peak so far (VmHWM). One reference-loader epoch gives the skip count the oracle sees.

Spoiled kinds (each on its own images; JPEG and PNG picked by their magic bytes):
    garbage          random bytes: no image header, so prepare finds it (counted there, never reaches the loader)
    truncated_png    a PNG cut at half: header intact, pixel data short (prepare accepts it, decoding fails)
    truncated_jpeg   a JPEG cut at half (idem)
    garbage_tail     a PNG whose second half is random bytes (same length; the compressed pixel data is bad)

"Flat" is judged from epoch 2 on (epoch 1 fills the allocator's pools and the decode buffers), on the RSS at each
epoch's end (the last batch released) and on each epoch's own peak (VmHWM reset at its start): the trend (the last
five epochs' median against epochs 2-6's) and the largest epoch against that early median.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import env_info, hwm_mb, write_report  # noqa: E402



def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Reset this process's VmHWM so that the next reading is the peak of what follows (Linux >= 4.0:
    writing 5 to clear_refs). False where that is not allowed; the peak is then the run's so far."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """glibc's malloc_trim(0): hand free pages of every arena back to the OS (--trim; a hypothesis test)."""
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def flatness(values: list[float]) -> dict:
    """Is a per-epoch series flat? Epoch 1 is left out (it fills the allocator's pools and the decode buffers).
    trend: the median of the last five epochs against that of epochs 2-6; max_rise: the largest epoch against that
    early median (one heavy epoch, e.g. many video frames in flight at its end, shows here and not in the trend)."""
    import statistics
    v = values[1:] or values
    early, late = statistics.median(v[:5]), statistics.median(v[-5:])
    return {"early_median": round(early, 1), "late_median": round(late, 1),
            "trend_pct": round(100 * (late - early) / early, 2), "max": round(max(v), 1),
            "max_rise_pct": round(100 * (max(v) - early) / early, 2)}


def spoil_table(path: str, per_kind: int, seed: int) -> dict[str, list[str]]:
    """Rewrite the demo's DEMO_IMG table (pandas index = id, standard base64) with `per_kind` images of each kind
    spoiled. Returns kind -> image ids."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    df = pd.read_parquet(path)
    blobs = {i: base64.b64decode(v) for i, v in df["base64"].items()}
    png = [i for i, b in blobs.items() if b[:8] == b"\x89PNG\r\n\x1a\n"]
    jpeg = [i for i, b in blobs.items() if b[:3] == b"\xff\xd8\xff"]
    rng.shuffle(png)
    rng.shuffle(jpeg)
    picked = {"truncated_png": png[:per_kind], "garbage_tail": png[per_kind:2 * per_kind],
              "truncated_jpeg": jpeg[:per_kind], "garbage": jpeg[per_kind:2 * per_kind]}
    for kind, ids in picked.items():
        for i in ids:
            b = blobs[i]
            if kind == "garbage":
                b = rng.bytes(len(b))
            elif kind.startswith("truncated"):
                b = b[: len(b) // 2]
            else:
                b = b[: len(b) // 2] + rng.bytes(len(b) - len(b) // 2)
            df.loc[i, "base64"] = base64.b64encode(b).decode()
    df.to_parquet(path)
    return picked


def bad_samples(index, bad_ids: dict[str, list[str]]) -> dict[str, set[int]]:
    """kind -> index sample rows that hold one of that kind's images."""
    image_ids = index.images.column("image_id").to_pylist()
    kind_of = {i: k for k, ids in bad_ids.items() for i in ids}
    row_kind = {r: kind_of[i] for r, i in enumerate(image_ids) if i in kind_of}
    out: dict[str, set[int]] = {k: set() for k in bad_ids}
    media = index.samples.column("media_images").to_pylist()
    for s, m in enumerate(media):
        for frames in m:
            for r in frames:
                if r in row_kind:
                    out[row_kind[r]].add(s)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--scale", type=float, default=0.5, help="demo dataset scale (0.5: ~5 s an epoch on 2 cores)")
    ap.add_argument("--per-kind", type=int, default=3, help="spoiled images of each kind")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--capacity", type=int, default=256, help="tokens per packed row (small: many batches an epoch)")
    ap.add_argument("--threads", type=int, default=0, help="native loader threads (0: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trim", action="store_true", help="call malloc_trim(0) after each epoch (diagnosis)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference loader's epoch")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "soak.json"))
    a = ap.parse_args(argv)

    from otterfast.data.demo import build_demo
    from otterfast.data.index import PreparedIndex
    from otterfast.data.loader import NativeLoader
    from otterfast.data.prepare import PrepareOptions, prepare
    from otterfast.data.reference import ReferenceLoader

    with tempfile.TemporaryDirectory(prefix="otterfast-soak-") as tmp:
        data = os.path.join(tmp, "data")
        t0 = time.perf_counter()
        build_demo(data, seed=a.seed, scale=a.scale)
        spoiled = spoil_table(os.path.join(data, "DEMO_IMG.parquet"), a.per_kind, a.seed)
        idx_dir = os.path.join(tmp, "index")
        meta = prepare(os.path.join(data, "data.yaml"), os.path.join(data, "tokenizer"), idx_dir,
                       PrepareOptions(format="simple", on_error="skip", video_frames=8))
        build_s = time.perf_counter() - t0
        prepare_defects = meta["report"]["defects"]
        index = PreparedIndex(idx_dir)
        bad = bad_samples(index, spoiled)
        all_bad = set().union(*bad.values())
        loader = NativeLoader(index, batch_size=a.batch_size, pack=True, capacity=a.capacity, on_error="skip",
                              num_threads=a.threads, seed=a.seed)
        rows = []
        for epoch in range(a.epochs):
            planned = [s for batch in loader.plan(epoch) for row in batch for s in row]
            expected = {k: sum(s in v for s in planned) for k, v in bad.items()}
            before = loader.skipped
            per_epoch_peak = reset_peak()
            t = time.perf_counter()
            n_batches = n_samples = 0
            yielded = {k: 0 for k in bad}  # spoiled samples the loader did NOT skip (decoded without an error)
            for b in loader:
                n_batches += 1
                n_samples += len(b["sample_index"])
                for s in set(b["sample_index"].tolist()) & all_bad:
                    for k, v in bad.items():
                        yielded[k] += s in v
            b = None  # the last batch is the caller's, not the loader's: RSS is read without it
            if a.trim:
                trim_heap()
            rows.append({"epoch": epoch + 1, "batches": n_batches, "samples": n_samples,
                         "skipped": loader.skipped - before, "expected_by_kind": expected,
                         "spoiled_yielded_by_kind": yielded,
                         "planned": len(planned), "seconds": round(time.perf_counter() - t, 2),
                         "rss_mb": round(rss_mb(), 1), "peak_rss_mb": round(hwm_mb(), 1),
                         "peak_is_per_epoch": per_epoch_peak})
            r = rows[-1]
            print(f"epoch {r['epoch']:2d}: {r['batches']} batches, {r['samples']} samples, skipped {r['skipped']} "
                  f"(planned with a spoiled image: {expected}; yielded anyway: {yielded}), RSS {r['rss_mb']} MiB, peak {r['peak_rss_mb']} MiB, "
                  f"{r['seconds']} s", flush=True)
        reference = None
        if not a.no_reference:
            ref = ReferenceLoader(index, batch_size=a.batch_size, pack=True, capacity=a.capacity, on_error="skip",
                                  seed=a.seed)
            ref_skipped = sum(b["skipped"] for b in ref)
            native_e0 = rows[0]["skipped"]
            reference = {"epoch": 1, "skipped": ref_skipped, "native_skipped": native_e0}
            print(f"reference loader, epoch 1: skipped {ref_skipped} (native {native_e0})", flush=True)

    flat = {key: flatness([r[key] for r in rows]) for key in ("rss_mb", "peak_rss_mb")}
    report = {
        "what": "native loader soak: demo data, on_error skip, planted corrupt images",
        "command": "python benches/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "epochs": a.epochs, "scale": a.scale, "batch_size": a.batch_size, "capacity": a.capacity,
        "threads": a.threads,
        "samples_in_index": len(index), "spoiled_image_ids": spoiled, "prepare_defects": prepare_defects,
        "spoiled_samples_in_index": {k: len(v) for k, v in bad.items()},
        "build_and_prepare_s": round(build_s, 1), "per_epoch": rows, "reference_epoch_1": reference,
        "flatness": flat, "trimmed_each_epoch": a.trim,
        "env": env_info("torch", "numpy", "pyarrow"),
    }
    md = [f"# Native loader soak ({a.epochs} epochs, on_error: skip, planted corrupt images)", "",
          f"Command: `{report['command']}`. Demo data at scale {a.scale}: {len(index)} samples in the index; "
          f"{a.per_kind} images of each kind spoiled in DEMO_IMG. Batch size {a.batch_size}, packed rows of "
          f"{a.capacity} tokens; threads "
          f"{a.threads or os.cpu_count()}. Environment: {report['env']}.", "",
          f"Prepare (on_error skip) counted: {prepare_defects or 'nothing'}. Samples left in the index that hold a "
          f"spoiled image, by kind: {report['spoiled_samples_in_index']}.", "",
          "| epoch | batches | samples | skipped | planned with a spoiled image (by kind) | yielded anyway (decoded "
          "without an error) | RSS MiB | peak RSS MiB | s |",
          "|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        exp = ", ".join(f"{k} {v}" for k, v in r["expected_by_kind"].items() if v)
        got = ", ".join(f"{k} {v}" for k, v in r["spoiled_yielded_by_kind"].items() if v)
        md.append(f"| {r['epoch']} | {r['batches']} | {r['samples']} | {r['skipped']} | {exp or '-'} | {got or '-'} | "
                  f"{r['rss_mb']} | {r['peak_rss_mb']} | {r['seconds']} |")
    md += ["", "| measure | epochs 2-6, median MiB | last 5 epochs, median MiB | trend | largest epoch after 1, MiB | "
               "its rise over the first median |", "|---|---:|---:|---:|---:|---:|"]
    for key, label in (("rss_mb", "RSS at the epoch's end"), ("peak_rss_mb", "peak RSS of the epoch")):
        f = flat[key]
        md.append(f"| {label} | {f['early_median']} | {f['late_median']} | {f['trend_pct']:+.1f} % | {f['max']} | "
                  f"{f['max_rise_pct']:+.1f} % |")
    md.append("")
    md.append("Trend: the last five epochs' median against epochs 2-6's (epoch 1 fills the allocator's pools). "
              + ("Peak RSS is each epoch's own (VmHWM reset at the epoch's start)." if rows[0]["peak_is_per_epoch"]
                 else "Peak RSS is the run's so far (VmHWM could not be reset here)."))
    if a.trim:
        md.append("This run called malloc_trim(0) after each epoch.")
    if reference:
        md.append(f"Reference loader, epoch 1: skipped {reference['skipped']} (native: {reference['native_skipped']}).")
    md.append("")
    path = write_report(a.json, report, "\n".join(md))
    print(f"wrote {a.json} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
