"""`otterfast demo`: the main job on its embedded default, end to end (not to be confused with data/demo.py, which
builds the demo dataset this runs on).

Build the demo dataset, prepare it in the `simple` and `fuyu` formats, print a summary, one rendered sample per
group and a first batch of each loader, then train a tiny Otter and a tiny OtterHD on it
(configs/train/demo-*.yaml, each `otterfast train` in its own process), plot their curves and ask each exported
model about two demo photos. Last, a short pretraining run: webdataset shards in Otter's MMC4 and LAION layouts
written from the demo photos, and `otterfast train configs/train/demo-pretrain.yaml` on them with a validation
curve.
"""

from __future__ import annotations

import os
import sys
import time


def register(sub) -> None:
    """Add `demo` to the top-level sub-commands."""
    d = sub.add_parser("demo", help="the main job on its embedded default (demo data -> index -> training)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-seq-len", type=int, default=2048)
    d.add_argument("--train", default="all", choices=["all", "both", "otter", "otterhd", "pretrain", "none"],
                   help="what to train after the data steps (default all: Otter, OtterHD, then the short Otter "
                        "pretraining on shards; both: Otter and OtterHD)")
    d.set_defaults(func=run)


def run(a) -> int:
    """The data steps (dataset, both indexes, samples, loaders), then the training runs."""
    from .data.demo import build_demo

    out = a.out
    t0 = time.perf_counter()
    counts = build_demo(os.path.join(out, "data"), seed=a.seed)
    print(f"[demo] dataset: {counts} ({time.perf_counter() - t0:.1f}s) -> {out}/data")
    for fmt in ("simple", "fuyu"):
        _prepare_and_load(a, out, fmt)
    rc = _train(a, out)
    if rc == 0 and a.train in ("all", "pretrain"):
        rc = _pretrain(a, out)
    return rc


def _prepare_and_load(a, out: str, fmt: str) -> None:
    """Prepare the demo dataset in one format; print one sample per group, a reference batch, a native epoch."""
    from .data.cli import print_summary
    from .data.index import PreparedIndex
    from .data.loader import NativeLoader
    from .data.prepare import PrepareOptions, prepare
    from .data.reference import ReferenceLoader

    idx_dir = os.path.join(out, f"index-{fmt}")
    meta = prepare(os.path.join(out, "data", "data.yaml"), os.path.join(out, "data", "tokenizer"), idx_dir,
                   PrepareOptions(format=fmt, max_seq_len=a.max_seq_len, with_task_description=True, video_frames=8))
    print(f"[demo] prepare --format {fmt}:")
    print_summary(meta, idx_dir)
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


def _train(a, out: str) -> int:
    """`otterfast train` on each demo config, each in its own process (a fresh process group per run)."""
    import shutil
    import subprocess

    from .source_tree import ROOT
    from .train.plot import plot, read_metrics

    models = ["otter", "otterhd"] if a.train in ("both", "all") else ([] if a.train in ("none", "pretrain")
                                                                      else [a.train])
    fmt = {"otter": "simple", "otterhd": "fuyu"}
    for m in models:
        cfg = ROOT / "configs" / "train" / f"demo-{m}.yaml"
        if not cfg.exists():
            raise SystemExit(f"otterfast demo: {cfg} not found: the demo trains from a source checkout")
        run_dir = os.path.join(out, f"train-{m}")
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (resume: auto would find the last one)
        sets = [f"output_dir={run_dir}", f"data.yaml={os.path.join(out, 'data', 'data.yaml')}",
                f"data.index={os.path.join(out, f'index-{fmt[m]}')}", f"data.prepare.max_seq_len={a.max_seq_len}",
                f"model.config={ROOT / 'configs' / 'models' / f'{m}-tiny.yaml'}", f"seed={a.seed}"]
        print(f"[demo] training a tiny {'Otter' if m == 'otter' else 'OtterHD'} on the CPU: "
              f"otterfast train {cfg.relative_to(ROOT)} " + " ".join(f"--set {x}" for x in sets[:1]), flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "otterfast.cli", "train", str(cfg)] + [y for x in sets for y in ("--set", x)]
        rc = subprocess.run(cmd).returncode
        if rc:
            print(f"[demo] training {m} failed (exit {rc})", file=sys.stderr)
            return rc
        rows = read_metrics(run_dir)
        k = max(1, min(5, len(rows) // 4))
        first = sum(r["loss"] for r in rows[:k]) / k
        last = sum(r["loss"] for r in rows[-k:]) / k
        tps = sorted(r["tokens_per_s"] for r in rows)[len(rows) // 2]
        png = plot(run_dir)
        print(f"[demo] {m}: {len(rows)} steps in {time.perf_counter() - t0:.0f}s, loss {first:.2f} -> {last:.2f} "
              f"(mean of the first / last {k} steps), median {tps:.0f} tokens/s; curves {png}; "
              f"model {os.path.join(run_dir, 'export')}", flush=True)
        _ask(os.path.join(run_dir, "export"), os.path.join(out, f"index-{fmt[m]}"))
    for m in models:  # each model trained, ready to chat with in a browser or over the API (docs/serve.md)
        print(f"[demo] chat with the {'Otter' if m == 'otter' else 'OtterHD'}: otterfast serve "
              f"{os.path.join(out, f'train-{m}', 'export')} --port 8000   (then open http://127.0.0.1:8000/)",
              flush=True)
    return 0


def _pretrain(a, out: str) -> int:
    """Pretraining shards from the demo photos, then `otterfast train configs/train/demo-pretrain.yaml` on them (its
    own process): falling training loss and a validation curve (10% of the samples held out)."""
    import shutil
    import subprocess

    from .data.demo import build_pretrain_shards
    from .source_tree import ROOT
    from .train.plot import plot, read_metrics

    t0 = time.perf_counter()
    shard_dir = os.path.join(out, "pretrain")
    shutil.rmtree(shard_dir, ignore_errors=True)
    data_yaml = build_pretrain_shards(shard_dir, seed=a.seed)
    print(f"[demo] pretraining shards (MMC4 documents, LAION pairs) from the demo photos: {shard_dir} "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    cfg = ROOT / "configs" / "train" / "demo-pretrain.yaml"
    if not cfg.exists():
        raise SystemExit(f"otterfast demo: {cfg} not found: the demo trains from a source checkout")
    run_dir, idx_dir = os.path.join(out, "train-pretrain"), os.path.join(out, "index-pretrain")
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(idx_dir, ignore_errors=True)  # prepared again from the shards just written
    sets = [f"output_dir={run_dir}", f"data.yaml={data_yaml}", f"data.index={idx_dir}",
            f"data.tokenizer={os.path.join(out, 'data', 'tokenizer')}",
            f"model.config={ROOT / 'configs' / 'models' / 'otter-tiny.yaml'}", f"seed={a.seed}"]
    print(f"[demo] pretraining a tiny Otter on the shards: otterfast train {cfg.relative_to(ROOT)} "
          f"--set data.yaml={data_yaml}", flush=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "otterfast.cli", "train", str(cfg)] + [y for x in sets for y in ("--set", x)]
    rc = subprocess.run(cmd).returncode
    if rc:
        print(f"[demo] pretraining failed (exit {rc})", file=sys.stderr)
        return rc
    rows = read_metrics(run_dir)
    k = max(1, min(5, len(rows) // 4))
    first = sum(r["loss"] for r in rows[:k]) / k
    last = sum(r["loss"] for r in rows[-k:]) / k
    val = [f"{r['val_loss']:.2f}" for r in rows if r.get("val_loss") is not None]
    print(f"[demo] pretrain: {len(rows)} steps in {time.perf_counter() - t0:.0f}s, loss {first:.2f} -> {last:.2f} "
          f"(mean of the first / last {k} steps), validation loss {' -> '.join(val)}; curves {plot(run_dir)}",
          flush=True)
    return 0


def _ask(model_dir: str, index_dir: str) -> None:
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
