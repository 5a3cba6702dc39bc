"""Training benchmark on the CPU: the same tiny model fed (a) by otterfast's native packed loader and (b) by
Otter's data path, run as Otter runs it, at equal cores.

    otterfast bench train                                   # tiny Otter, demo dataset, rows of 512/2048/8192
    otterfast bench train --model otterhd                   # tiny OtterHD against pad-to-longest batches
    otterfast bench train --capacities 2048 --json OUT.json

(a) native: NativeLoader, packed rows of each `--capacities` length (one row per step), decoding on its own
    `--cores` threads while the model computes; packed attention (models/attention.py).
(b) otter_style: a torch DataLoader with `--cores` worker processes (Otter's `--workers`), the model step in the
    main process. Each worker runs Otter's per-sample work: the text tokenized again, and for Otter the images
    from the image tables read whole into pandas (base64 + PIL + square bicubic resize: data/otter_style.py);
    for OtterHD (no Otter-style Fuyu loader here) the reference loader's Fuyu patches in Python. Batches of
    `--batch-size` samples padded to the longest (Otter's collate).
Both: torch uses `--cores` threads in the main process (default: every core). Each step: forward
(models/build.py batch_loss), backward of the token-mean loss, AdamW step. Every (backend, capacity) runs in its
own process; rounds interleaved; medians reported. Measured after the first step: non-pad tokens/s, samples/s,
padding, data wait, peak RSS (main process + the DataLoader workers' peaks: fork-shared pages count in each).
Writes benches/results/train.json and train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import children_hwm_mb, env_info, hwm_mb, write_report  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_batches(a, index_dir: str):
    """An endless iterator of loader batches (numpy) for the worker's backend, and what it ran with."""
    from otterfast.data.index import PreparedIndex
    from otterfast.data.loader import NativeLoader

    if a.worker == "native":
        loader = NativeLoader(PreparedIndex(index_dir), batch_size=1, pack=True, capacity=a.capacity, seed=0,
                              num_threads=a.cores)

        def forever():
            while True:
                yield from loader

        return forever(), {"threads": a.cores}
    from otterfast.data.otter_style import otter_dataloader

    dl = otter_dataloader(index_dir, a.cores, a.batch_size)  # endless enough for any --samples
    return iter(dl), {"workers": a.cores}


def worker(a) -> dict:
    import torch

    from otterfast.data.index import PreparedIndex
    from otterfast.data.loader import as_torch
    from otterfast.models.build import batch_loss, build_model, load_model_config

    torch.set_num_threads(a.cores)
    idx = PreparedIndex(a.index)
    torch.manual_seed(0)
    model = build_model(load_model_config(a.model_config), idx.tok).float().train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    t0 = time.perf_counter()
    it, counts = make_batches(a, a.index)
    tokens = slots = samples = steps = 0
    wait = 0.0
    first = t_start = None
    while samples < a.samples:
        t = time.perf_counter()
        b = next(it)
        dt_wait = time.perf_counter() - t
        loss_sum, n = batch_loss(model, as_torch(b))
        (loss_sum / max(n, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if first is None:  # the first step (construction, warm-up, workers starting) is timed apart
            first = time.perf_counter() - t0
            t_start = time.perf_counter()
            continue
        steps += 1
        wait += dt_wait
        tokens += int(b["attention_mask"].sum())
        slots += int(b["attention_mask"].size)
        samples += len(b["sample_index"])
    dt = time.perf_counter() - t_start
    rss = hwm_mb() + children_hwm_mb()
    return {"backend": a.worker, "capacity": a.capacity if a.worker == "native" else None,
            "batch_size": 1 if a.worker == "native" else a.batch_size, **counts, "torch_threads": a.cores,
            "tokens_per_s": tokens / dt, "samples_per_s": samples / dt, "steps_per_s": steps / dt,
            "padding": 1 - tokens / slots, "data_wait_share": wait / dt, "peak_rss_mb": rss, "first_step_s": first,
            "steps": steps, "samples": samples, "tokens": tokens}


def run_worker(backend: str, capacity: int, index: str, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, "--index", index, "--model-config",
           a.model_config, "--samples", str(a.samples), "--capacity", str(capacity), "--batch-size",
           str(a.batch_size), "--cores", str(a.cores)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"{backend} (capacity {capacity}) failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def markdown(r: dict) -> str:
    e = r["env"]
    base = ("Otter's data path (image tables read whole into pandas, base64 + PIL + resize per sample)" if
            r["format"] != "fuyu" else "the reference loader's Fuyu patches in Python (no Otter-style Fuyu path)")
    lines = [f"# training benchmark: tiny {r['model']} ({e['date']}, {e['cpus']} CPUs: {e['cpu']}; torch {e.get('torch')})",
             "", f"`{r['command']}`", "",
             f"{r['model_config']}, fp32 on the CPU, AdamW, {r['samples']} samples measured per run after a first step; "
             f"{r['data']}: {r['n_samples']} samples, prepared with max_seq_len {r.get('max_seq_len', '?')} (the smallest "
             f"row, so that every backend and capacity sees the same samples). **native**: packed rows of the given capacity, one per step, "
             f"{r['cores']} loader threads. **otter_style**: a torch DataLoader with {r['cores']} worker processes "
             f"running {base}, batches of {r['batch_size']} padded to the longest. Both: {r['cores']} torch threads "
             f"for the model in the main process. Medians of {r['rounds']} interleaved rounds, each run in its own "
             "process. Peak RSS: main process plus the workers' peaks.", "",
             "| backend | capacity | threads / workers | tokens/s | samples/s | padding | data wait | peak RSS MB | first step s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in r["results"]:
        cw = f"{x['threads']} threads" if "threads" in x else f"{x['workers']} workers"
        lines.append(f"| {x['backend']} | {x['capacity'] or '-'} | {cw} | {x['tokens_per_s']:.0f} | "
                     f"{x['samples_per_s']:.1f} | {x['padding']:.1%} | {x['data_wait_share']:.0%} | "
                     f"{x['peak_rss_mb']:.0f} | {x['first_step_s']:.2f} |")
    lines.append("")
    for cap, v in r["ratios"].items():
        lines.append(f"- native at {cap} / otter_style: **{v['tokens_per_s']:.2f}x tokens/s**, "
                     f"{v['samples_per_s']:.2f}x samples/s (per round: "
                     + ", ".join(f"{x:.2f}" for x in v["rounds"]) + ")")
    if r.get("long_vs_short"):
        s = r["long_vs_short"]
        lines.append(f"- native tokens/s at {s['long']} / at {s['short']}: **{s['ratio']:.2f}**")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="otterfast bench train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="otter", choices=["otter", "otterhd"])
    ap.add_argument("--data", help="a dataset YAML (default: the demo dataset, built in a temp dir)")
    ap.add_argument("--samples", type=int, default=600, help="samples measured per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--capacities", default="512,2048,8192", help="native packed row lengths")
    ap.add_argument("--capacity", type=int, help=argparse.SUPPRESS)  # one row length (the worker's; old flag)
    ap.add_argument("--batch-size", type=int, default=8, help="otter_style: samples per padded batch")
    ap.add_argument("--cores", type=int, default=os.cpu_count(),
                    help="loader threads (native) = DataLoader workers (otter_style) = torch threads")
    ap.add_argument("--json", default="benches/results/train.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--index", help=argparse.SUPPRESS)
    ap.add_argument("--model-config", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    caps = [a.capacity] if a.capacity else [int(x) for x in a.capacities.split(",")]
    a.model_config = os.path.join(ROOT, "configs", "models", f"{a.model}-tiny.yaml")
    fmt = "simple" if a.model == "otter" else "fuyu"
    from otterfast.data.index import PreparedIndex
    from otterfast.data.prepare import PrepareOptions, prepare

    runs: dict[tuple, list] = {("otter_style", 0): []}
    runs.update({("native", c): [] for c in caps})
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if not data:
            from otterfast.data.demo import build_demo

            build_demo(os.path.join(tmp, "demo"), seed=0)
            data = os.path.join(tmp, "demo", "data.yaml")
        tok = os.path.join(os.path.dirname(os.path.abspath(data)), "tokenizer")
        index = os.path.join(tmp, "index")
        prepare(data, tok, index, PrepareOptions(format=fmt, max_seq_len=min(2048, min(caps)), video_frames=8,
                                                 with_task_description=True, on_error="skip"))
        n = len(PreparedIndex(index))
        order = list(runs)
        for r in range(a.rounds):
            for key in (order if r % 2 == 0 else order[::-1]):
                res = run_worker(key[0], key[1], index, a)
                runs[key].append(res)
                print(f"  round {r}: {key[0]:<12} {key[1] or '':>5} {res['tokens_per_s']:8.0f} tokens/s "
                      f"{res['samples_per_s']:7.1f} samples/s padding {res['padding']:.1%} "
                      f"data wait {res['data_wait_share']:.0%} rss {res['peak_rss_mb']:.0f} MB", flush=True)
    results = []
    for (b, cap), rs in runs.items():
        med = {k: statistics.median(x[k] for x in rs) for k in rs[0]
               if isinstance(rs[0][k], (int, float)) and not isinstance(rs[0][k], bool)}
        med.update(backend=b, model=a.model, capacity=cap or None)
        results.append({k: round(v, 4) if isinstance(v, float) else v for k, v in med.items()})
    ots = runs[("otter_style", 0)]
    ratios = {}
    for c in caps:
        nat = runs[("native", c)]
        ratios[str(c)] = {
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in nat) / statistics.median(x["tokens_per_s"] for x in ots),
            "samples_per_s": statistics.median(x["samples_per_s"] for x in nat) / statistics.median(x["samples_per_s"] for x in ots),
            "rounds": [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(nat, ots)]}
    long_short = None
    if len(caps) > 1:
        med = {c: statistics.median(x["tokens_per_s"] for x in runs[("native", c)]) for c in caps}
        long_short = {"short": min(caps), "long": max(caps), "ratio": med[max(caps)] / med[min(caps)]}
    cmd = "otterfast bench train " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": cmd.strip(), "model": a.model, "model_config": os.path.relpath(a.model_config, ROOT),
              "format": fmt, "data": "demo dataset" if not a.data else a.data, "n_samples": n, "capacities": caps,
              "max_seq_len": min(2048, min(caps)),
              "batch_size": a.batch_size, "cores": a.cores, "samples": a.samples, "rounds": a.rounds,
              "env": env_info("torch", "transformers"), "results": results, "ratios": ratios,
              "long_vs_short": long_short}
    md = markdown(report)
    md_path = write_report(a.json, report, md)
    print(md)
    print(f"wrote {a.json} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
