"""The `otterfast` command. Thin: parse arguments, call the module that does the work, print.

    otterfast demo                      the main job on its embedded default
    otterfast data demo OUT             build the demo dataset + tokenizer
    otterfast data validate DATA.yaml   run every data check, report
    otterfast data prepare DATA.yaml    validate, render, tokenize, write an index
    otterfast data inspect DIR          one prepared sample as JSON (and its model-ready arrays)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _add_prepare_options(p: argparse.ArgumentParser) -> None:
    from .data import prompts

    p.add_argument("--format", default="simple", choices=list(prompts.FORMATS), help="prompt format (default simple)")
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
    from .data.prepare import PrepareOptions

    return PrepareOptions(format=a.format, max_seq_len=a.max_seq_len, on_error=a.on_error, keep_symbols=a.keep_symbols,
                          populate_rel_ins=a.populate_rel_ins, with_task_description=a.with_task_description,
                          video_frames=a.video_frames, max_image_pixels=a.max_image_pixels)


def cmd_data_demo(a) -> int:
    from .data.demo import build_demo

    t0 = time.perf_counter()
    counts = build_demo(a.out, seed=a.seed, scale=a.scale)
    print(f"demo dataset written to {a.out} in {time.perf_counter() - t0:.1f}s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"  {os.path.join(a.out, 'data.yaml')}\n  {os.path.join(a.out, 'tokenizer')}/")
    return 0


def cmd_data_validate(a) -> int:
    from .data.prepare import validate

    opts = _opts(a)
    v = validate(a.data_yaml, opts)
    rep = v.report.as_dict()
    print(f"{a.data_yaml}: {len(v.specs)} datasets, {v.n_records} records, {len(v.candidates)} valid samples, "
          f"{len([r for r in v.image_rows if 'defect' not in r])} images checked")
    if rep["defects"]:
        print("defects (skipped): " + ", ".join(f"{k} {n}" for k, n in rep["defects"].items()))
        for e in rep["examples"]:
            print(f"  [{e['kind']}] {e['path']}: id {e['id']!r}: {e['message']}")
    else:
        print("no defects")
    return 0


def cmd_data_prepare(a) -> int:
    from .data.prepare import prepare

    meta = prepare(a.data_yaml, a.tokenizer, a.out, _opts(a))
    _print_summary(meta, a.out)
    return 0


def _print_summary(meta: dict, out: str) -> None:
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


def cmd_data_inspect(a) -> int:
    from .data.index import PreparedIndex

    idx = PreparedIndex(a.dir)
    s = idx.sample(a.index)
    from .data.tokenizer import labels_from_spans

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
            from .data.loader import NativeLoader

            batch = NativeLoader(idx, image_transform=a.image_transform, pack=False).collate_rows([[a.index]])
        else:
            from .data.reference import ReferenceLoader

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


def _bench_script(name: str) -> str:
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benches" / name
    if not path.exists():
        raise SystemExit(f"otterfast: {path} not found: benchmarks run from a source checkout (pip install -e .)")
    return str(path)


def cmd_bench_loader(a) -> int:
    import runpy

    mod = runpy.run_path(_bench_script("loader.py"))
    return mod["main"](a.args)


def cmd_demo(a) -> int:
    """Build the demo dataset, prepare it in every format, print a summary and rendered samples, then train a
    tiny Otter and a tiny OtterHD on it (configs/train/demo-*.yaml) and plot their curves."""
    from .data.demo import build_demo
    from .data.index import PreparedIndex
    from .data.prepare import PrepareOptions, prepare
    from .data.reference import ReferenceLoader

    out = a.out
    t0 = time.perf_counter()
    counts = build_demo(os.path.join(out, "data"), seed=a.seed)
    print(f"[demo] dataset: {counts} ({time.perf_counter() - t0:.1f}s) -> {out}/data")
    for fmt in ("simple", "fuyu"):
        idx_dir = os.path.join(out, f"index-{fmt}")
        meta = prepare(os.path.join(out, "data", "data.yaml"), os.path.join(out, "data", "tokenizer"), idx_dir,
                       PrepareOptions(format=fmt, max_seq_len=a.max_seq_len, with_task_description=True,
                                                      video_frames=8))
        print(f"[demo] prepare --format {fmt}:")
        _print_summary(meta, idx_dir)
        idx = PreparedIndex(idx_dir)
        tok = idx.tokenizer()
        shown = set()
        for i in idx.epoch_order(a.seed, 0):
            s = idx.sample(i)
            if s.group in shown:
                continue
            shown.add(s.group)
            print(f"  - {s.group} {s.sample_id}: {s.num_tokens} tokens, media {[len(m) for m in s.media_images]}")
            print("    text:   " + s.text.replace("\n", "\\n"))
            print("    labels: " + " | ".join(tok.decode(s.input_ids[x:y]) for x, y in s.label_spans))
        t1 = time.perf_counter()
        loader = ReferenceLoader(idx, batch_size=8, seed=a.seed, pack=False)
        batch = next(iter(loader))
        shapes = {k: tuple(v.shape) for k, v in batch.items() if hasattr(v, "shape")}
        print(f"  reference loader, first batch ({time.perf_counter() - t1:.2f}s): {shapes}")
        pad = float((batch["attention_mask"] == 0).mean())
        print(f"  padding in that pad-to-longest batch: {pad:.0%}")
        from .data.loader import NativeLoader

        native = NativeLoader(idx, batch_size=1, pack=True, capacity=4096, seed=a.seed)
        t1 = time.perf_counter()
        n_samples = n_tokens = n_slots = n_batches = 0
        for b in native:
            n_batches += 1
            n_samples += len(b["sample_index"])
            n_tokens += int(b["attention_mask"].sum())
            n_slots += b["attention_mask"].size
        dt = time.perf_counter() - t1
        print(f"  native loader, one epoch packed at 4096 tokens: {n_batches} rows, {n_samples} samples in {dt:.2f}s "
              f"({n_samples / dt:.0f} samples/s), padding {1 - n_tokens / n_slots:.1%} (the epoch's last row included)")
    return _demo_train(a, out)


def _demo_train(a, out: str) -> int:
    """`otterfast train` on each demo config, each in its own process (a fresh process group per run)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    models = ["otter", "otterhd"] if a.train == "both" else ([] if a.train == "none" else [a.train])
    fmt = {"otter": "simple", "otterhd": "fuyu"}
    for m in models:
        cfg = root / "configs" / "train" / f"demo-{m}.yaml"
        if not cfg.exists():
            raise SystemExit(f"otterfast demo: {cfg} not found: the demo trains from a source checkout")
        run_dir = os.path.join(out, f"train-{m}")
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (resume: auto would find the last one)
        sets = [f"output_dir={run_dir}", f"data.yaml={os.path.join(out, 'data', 'data.yaml')}",
                f"data.index={os.path.join(out, f'index-{fmt[m]}')}", f"data.prepare.max_seq_len={a.max_seq_len}",
                f"model.config={root / 'configs' / 'models' / f'{m}-tiny.yaml'}", f"seed={a.seed}"]
        print(f"[demo] training a tiny {'Otter' if m == 'otter' else 'OtterHD'} on the CPU: otterfast train {cfg.relative_to(root)} "
              + " ".join(f"--set {x}" for x in sets[:1]), flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "otterfast.cli", "train", str(cfg)] + [y for x in sets for y in ("--set", x)]
        rc = subprocess.run(cmd).returncode
        if rc:
            print(f"[demo] training {m} failed (exit {rc})", file=sys.stderr)
            return rc
        from .train.plot import plot, read_metrics

        rows = read_metrics(run_dir)
        k = max(1, min(5, len(rows) // 4))
        first = sum(r["loss"] for r in rows[:k]) / k
        last = sum(r["loss"] for r in rows[-k:]) / k
        tps = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
        png = plot(run_dir)
        print(f"[demo] {m}: {len(rows)} steps in {time.perf_counter() - t0:.0f}s, loss {first:.2f} -> {last:.2f} "
              f"(mean of the first / last {k} steps), median {tps:.0f} tokens/s; curves {png}; "
              f"model {os.path.join(run_dir, 'export')}", flush=True)
        _demo_ask(os.path.join(run_dir, "export"), os.path.join(out, f"index-{fmt[m]}"))
    return 0


def _demo_ask(model_dir: str, index_dir: str) -> None:
    """Ask the exported model (otterfast generate's Generator) about demo photos it was trained on."""
    import re

    from .data.index import PreparedIndex
    from .data.reference import ReferenceLoader
    from .generate import Generator

    idx = PreparedIndex(index_dir)
    images = ReferenceLoader(idx)
    gen = Generator(model_dir)
    tok = idx.tokenizer()
    asked = 0
    for i in range(len(idx)):
        s = idx.sample(i)
        q = re.search(r"User:(.*?) (?:GPT|Assistant):", s.text)
        if s.group != "IMAGE_TEXT" or len(s.media_images) != 1 or len(s.media_images[0]) != 1 or not q:
            continue
        want = tok.decode(s.input_ids[slice(*s.label_spans[0])], skip_special_tokens=True).strip()
        reply = gen.generate(q.group(1), [images.load_image(s.media_images[0][0])], max_new_tokens=24, num_beams=1)
        print(f"[demo]   {gen.kind} asked {q.group(1)!r} about {s.sample_id}: {reply!r} (trained answer {want!r})")
        asked += 1
        if asked == 2:
            break


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otterfast", description="Fast, correct training for Otter / OtterHD.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job on its embedded default (demo data -> index -> training)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-seq-len", type=int, default=2048)
    d.add_argument("--train", default="both", choices=["both", "otter", "otterhd", "none"],
                   help="which tiny model(s) to train after the data steps (default both: Otter, then OtterHD)")
    d.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="MIMIC-IT data: demo, validate, prepare, inspect")
    dsub = data.add_subparsers(dest="data_command", required=True)

    x = dsub.add_parser("demo", help="build the demo dataset and tokenizer from photos in installed packages")
    x.add_argument("out")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--scale", type=float, default=1.0, help="multiply the number of samples")
    x.set_defaults(func=cmd_data_demo)

    x = dsub.add_parser("validate", help="run every data check on a dataset YAML and report")
    x.add_argument("data_yaml")
    _add_prepare_options(x)
    x.set_defaults(func=cmd_data_validate)

    x = dsub.add_parser("prepare", help="validate, render and tokenize every sample once, write an index")
    x.add_argument("data_yaml")
    x.add_argument("--tokenizer", required=True, help="a local transformers tokenizer folder")
    x.add_argument("--out", required=True, help="index folder to write")
    _add_prepare_options(x)
    x.set_defaults(func=cmd_data_prepare)

    x = dsub.add_parser("inspect", help="print one prepared sample")
    x.add_argument("dir")
    x.add_argument("--index", type=int, default=0)
    x.add_argument("--json", action="store_true", help="print JSON")
    x.add_argument("--save-arrays", metavar="FILE.npz", help="also write its model-ready arrays (reference loader)")
    x.add_argument("--image-transform", default="otter", choices=["otter", "clip"])
    x.add_argument("--backend", default="reference", choices=["reference", "native"],
                   help="which loader makes the --save-arrays arrays (default reference)")
    x.set_defaults(func=cmd_data_inspect)

    b = sub.add_parser("bench", help="benchmarks (from a source checkout: benches/)")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    x = bsub.add_parser("loader", help="Otter-style vs reference vs native loader, side by side; "
                        "all arguments go to benches/loader.py (see its --help)", add_help=False)
    x.add_argument("args", nargs=argparse.REMAINDER)
    x.set_defaults(func=cmd_bench_loader)
    __import__("otterfast.eval.cli", fromlist=["register"]).register(sub)  # `otterfast eval` (docs/eval.md)
    __import__("otterfast.generate.cli", fromlist=["register"]).register(sub)  # `otterfast generate`
    __import__("otterfast.train.cli", fromlist=["register"]).register(sub, bsub)  # train, plot, bench train
    return p


def main(argv: list[str] | None = None) -> int:
    from .data.defects import DataError

    argv = sys.argv[1:] if argv is None else argv
    # The `deepspeed` launcher puts --local_rank=N before the sub-command; the rank also comes as LOCAL_RANK.
    rest = []
    for i, a in enumerate(argv):
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
        elif i > 0 and argv[i - 1] in ("--local_rank", "--local-rank"):
            continue
        else:
            rest.append(a)
    argv = rest
    if argv[:2] == ["bench", "loader"]:  # everything after goes to benches/loader.py, --help included
        return cmd_bench_loader(argparse.Namespace(args=argv[2:]))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataError as e:
        print(f"otterfast: data error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
