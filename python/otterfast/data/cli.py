"""`otterfast data demo|validate|prepare|inspect`. Registered from otterfast.cli; imports nothing heavy until a
command runs."""

from __future__ import annotations

import argparse
import json
import os
import time


def _add_prepare_options(p: argparse.ArgumentParser) -> None:
    from .prompts import FORMATS

    p.add_argument("--format", default="simple", choices=list(FORMATS), help="prompt format (default simple)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="tokens per sample, all included (default 2048)")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                   help="raise: list every defect and stop (default); skip: leave defective samples out, counted")
    p.add_argument("--no-keep-symbols", dest="keep_symbols", action="store_false",
                   help="Otter's default cleaning: delete symbols such as : - / %% and collapse whitespace")
    p.add_argument("--populate-rel-ins", action="store_true",
                   help="without a train config, use each record's rel_ins_ids as its context (Otter's flag)")
    p.add_argument("--with-task-description", action="store_true", help="prepend a dataset's task_description")
    p.add_argument("--video-frames", type=int, default=32, help="frames per VIDEO_TEXT sample (default 32)")
    p.add_argument("--max-image-pixels", type=int, default=89_478_485,
                   help="refuse images whose header declares more pixels (PIL's guard; default 89478485)")


def _opts(a: argparse.Namespace):
    from .prepare import PrepareOptions

    return PrepareOptions(format=a.format, max_seq_len=a.max_seq_len, on_error=a.on_error, keep_symbols=a.keep_symbols,
                          populate_rel_ins=a.populate_rel_ins, with_task_description=a.with_task_description,
                          video_frames=a.video_frames, max_image_pixels=a.max_image_pixels)


def cmd_demo(a) -> int:
    from .demo import build_demo

    t0 = time.perf_counter()
    counts = build_demo(a.out, seed=a.seed, scale=a.scale)
    print(f"demo dataset written to {a.out} in {time.perf_counter() - t0:.1f}s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"  {os.path.join(a.out, 'data.yaml')}\n  {os.path.join(a.out, 'tokenizer')}/")
    return 0


def cmd_validate(a) -> int:
    from .prepare import validate

    opts = _opts(a)
    v = validate(a.data_yaml, opts)
    rep = v.report.as_dict()
    if v.specs or not v.shard_specs:
        print(f"{a.data_yaml}: {len(v.specs)} datasets, {v.n_records - v.shard_scan.documents} records, "
              f"{len(v.candidates)} valid samples, {len([r for r in v.image_rows if 'defect' not in r])} images checked")
    if v.shard_specs:
        sc = v.shard_scan
        print(f"{a.data_yaml}: shards: {len(v.shard_specs)} datasets, {sum(len(s.files) for s in v.shard_specs)} tar files, "
              f"{sc.documents} samples read, {sc.valid} pass the checks and image filters (token filters run at "
              f"prepare)" + ("; filtered: " + ", ".join(f"{k} {n}" for k, n in sorted(sc.filtered.items()))
                             if sc.filtered else ""))
    if rep["defects"]:
        print("defects (skipped): " + ", ".join(f"{k} {n}" for k, n in rep["defects"].items()))
        for e in rep["examples"]:
            print(f"  [{e['kind']}] {e['path']}: id {e['id']!r}: {e['message']}")
    else:
        print("no defects")
    return 0


def cmd_prepare(a) -> int:
    from .prepare import prepare

    meta = prepare(a.data_yaml, a.tokenizer, a.out, _opts(a))
    print_summary(meta, a.out)
    return 0


def cmd_repack(a) -> int:
    from .repack import repack

    s = repack(a.dir, row_group_rows=a.row_group_rows)
    if s["sources"]:
        print(f"{a.dir}: {s['images']} images repacked in {s['seconds']}s")
    return 0


def cmd_cache_pixels(a) -> int:
    from .pixel_cache import build

    s = build(a.dir, transform=a.image_transform, size=a.image_size, jpeg_draft=a.jpeg_draft, threads=a.threads)
    print(f"{a.dir}: {s['cached']} of {s['images']} images cached ({a.image_transform} {a.image_size} px, "
          f"{s['bytes'] / 2**20:.1f} MiB) in {s['seconds']}s")
    if s["failed"]:
        kinds = ", ".join(f"{k} {n}" for k, n in s["failed_by_kind"].items())
        print(f"  not cached (decoded as before by the loader, raised or skipped there): {kinds}")
        for m in s["failed_examples"]:
            print(f"  {m}")
    return 0


def print_summary(meta: dict, out: str) -> None:
    """What `prepare` wrote: counts, per dataset, defects skipped and truncations."""
    c = meta["counts"]
    print(f"index written to {out} in {meta['seconds']}s: {c['samples']} samples, {c['images']} images, "
          f"{c['tokens']} tokens ({c['label_tokens']} labelled) from {c['records']} records")
    for d in meta["datasets"]:
        print(f"  {d['group']:<22} {d['name']:<14} {d['prepared_samples']:>6} samples  num_samples={d['num_samples']}")
    rep = meta["report"]
    if rep["defects"]:
        print("  defects skipped: " + ", ".join(f"{k} {n}" for k, n in rep["defects"].items()))
    if rep["truncation"]:
        print("  max_seq_len: " + ", ".join(f"{k} {n}" for k, n in rep["truncation"].items()))
    if rep.get("filtered"):
        print("  shard filters (Otter's rules): " + ", ".join(f"{k} {n}" for k, n in rep["filtered"].items()))


def cmd_inspect(a) -> int:
    from .index import PreparedIndex
    from .tokenizer import labels_from_spans

    try:
        idx = PreparedIndex(a.dir)
    except KeyError as e:  # a meta.json of something else
        raise ValueError(f"{a.dir}: not a prepared index (meta.json has no {e})") from e
    if not 0 <= a.index < len(idx):
        raise ValueError(f"--index {a.index} is out of range: {a.dir} holds {len(idx)} samples"
                         + (f" (0..{len(idx) - 1})" if len(idx) else ""))
    s = idx.sample(a.index)
    rec = {
        "sample_id": s.sample_id, "dataset": s.dataset, "group": s.group, "source_ids": s.source_ids,
        "text": s.text, "input_ids": s.input_ids, "labels": labels_from_spans(s.input_ids, s.label_spans),
        "label_spans": s.label_spans, "media_pos": s.media_pos,
        "image_ids": [[idx.image(r)["image_id"] for r in m] for m in s.media_images],
        "image_sizes": [[[idx.image(r)["width"], idx.image(r)["height"]] for r in m] for m in s.media_images],
        "num_tokens": s.num_tokens, "context_dropped": s.context_dropped,
    }
    if a.save_arrays:
        import numpy as np

        if a.backend == "native":
            from .loader import NativeLoader

            batch = NativeLoader(idx, image_transform=a.image_transform, pack=False).collate_rows([[a.index]])
        else:
            from .reference import ReferenceLoader

            batch = ReferenceLoader(idx, image_transform=a.image_transform, pack=False).collate_rows([[a.index]])
        np.savez(a.save_arrays, **{k: v for k, v in batch.items() if isinstance(v, np.ndarray)})
        rec["arrays"] = {k: list(v.shape) for k, v in batch.items() if isinstance(v, np.ndarray)}
    if a.json:
        print(json.dumps(rec, ensure_ascii=False))
    else:
        tok = idx.tokenizer()
        print(f"sample {a.index}: {s.sample_id} ({s.group}/{s.dataset}), {s.num_tokens} tokens")
        print(f"  images: {rec['image_ids']}")
        print("  text:   " + s.text.replace("\n", "\\n"))
        print("  labels: " + " | ".join(tok.decode(s.input_ids[x:y]) for x, y in s.label_spans))
        if a.save_arrays:
            print(f"  arrays -> {a.save_arrays}: {rec['arrays']}")
    return 0


def register(sub) -> None:
    """Add `data` and its sub-commands to the top-level sub-commands."""
    data = sub.add_parser("data", help="MIMIC-IT data: demo, validate, prepare, repack, cache-pixels, inspect")
    dsub = data.add_subparsers(dest="data_command", required=True)

    x = dsub.add_parser("demo", help="build the demo dataset and tokenizer from photos in installed packages")
    x.add_argument("out")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--scale", type=float, default=1.0, help="multiply the number of samples")
    x.set_defaults(func=cmd_demo)

    x = dsub.add_parser("validate", help="run every data check on a dataset YAML and report")
    x.add_argument("data_yaml")
    _add_prepare_options(x)
    x.set_defaults(func=cmd_validate)

    x = dsub.add_parser("prepare", help="validate, render and tokenize every sample once, write an index")
    x.add_argument("data_yaml")
    x.add_argument("--tokenizer", required=True, help="a local transformers tokenizer folder")
    x.add_argument("--out", required=True, help="index folder to write")
    _add_prepare_options(x)
    x.set_defaults(func=cmd_prepare)

    x = dsub.add_parser("repack", help="rewrite a prepared index's parquet image tables for fast random access "
                        "(small row groups, raw bytes; once, after prepare)")
    x.add_argument("dir", help="a prepared index folder")
    x.add_argument("--row-group-rows", type=int, default=64, help="images per row group (default 64)")
    x.set_defaults(func=cmd_repack)

    x = dsub.add_parser("cache-pixels", help="decode every image of a prepared index once into Otter / CLIP pixels "
                        "that the native loader reads in later epochs (bit-identical batches)")
    x.add_argument("dir", help="a prepared index folder")
    x.add_argument("--image-transform", default="otter", choices=["otter", "clip"],
                   help="the transform training uses (data.loader.image_transform; default otter, as there)")
    x.add_argument("--image-size", type=int, default=224, help="data.loader.image_size (default 224)")
    x.add_argument("--jpeg-draft", action="store_true", help="for runs with data.loader.jpeg_draft on")
    x.add_argument("--threads", type=int, default=0, help="decoding threads (default: all cores)")
    x.set_defaults(func=cmd_cache_pixels)

    x = dsub.add_parser("inspect", help="print one prepared sample")
    x.add_argument("dir")
    x.add_argument("--index", type=int, default=0)
    x.add_argument("--json", action="store_true", help="print JSON")
    x.add_argument("--save-arrays", metavar="FILE.npz", help="also write its model-ready arrays (reference loader)")
    x.add_argument("--image-transform", default="otter", choices=["otter", "clip"])
    x.add_argument("--backend", default="reference", choices=["reference", "native"],
                   help="which loader makes the --save-arrays arrays (default reference)")
    x.set_defaults(func=cmd_inspect)
