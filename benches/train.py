"""Training benchmark on the CPU: the same tiny model, (a) the native packed loader vs (b) Otter's path.

    otterfast bench train                       # demo dataset, tiny Otter (OtterHD: --model otterhd)
    otterfast bench train --data DATA.yaml --json OUT.json

(a) native: NativeLoader, packed rows of `--capacity` tokens (one row per step), decoding on its own threads
    while the model computes.
(b) Otter-style: Otter's data path (data/otter_style.py: every image table read whole into pandas, per sample
    the text tokenized again, each image base64-decoded from the frame, PIL-decoded and resized in the training
    process, 0 workers) and Otter's batches: `--batch-size` samples padded to the longest. For OtterHD, whose
    Fuyu path has no Otter-style twin here, (b) is the native loader with pack=False (pad-to-longest batches of
    `--batch-size`): the padding effect alone.
Each step: packed forward (models/build.py batch_loss), backward of the token-mean loss, AdamW step. Every
backend runs in its own process, rounds interleaved, medians reported. Measured after the first step:
non-pad tokens/s, samples/s, padding fraction, the share of step time spent waiting for data, peak RSS.
Writes benches/results/train.json and train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class OtterStyleBatches:
    """Otter's data path in our batch layout: pixels from OtterStyleLoader (pandas + base64 + PIL, in this
    process), the index's tokens and labels, batches of `batch_size` samples padded to the longest."""

    def __init__(self, index, batch_size: int, seed: int = 0):
        from otterfast.data.otter_style import OtterStyleLoader
        from otterfast.data.reference import ReferenceLoader

        self.os = OtterStyleLoader(index, batch_size=batch_size, seed=seed)
        self.ref = ReferenceLoader(index, batch_size=batch_size, seed=seed, pack=False)
        self.ref.pixels = self.os.load  # Otter's decode + square bicubic resize + normalise
        self.index, self.batch_size, self.seed = self.os.index, batch_size, seed

    def __iter__(self):
        epoch = 0
        while True:
            order = self.index.epoch_order(self.seed, epoch)
            for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
                rows = order[i : i + self.batch_size]
                for r in rows:  # Otter tokenizes every sample's text again at every step
                    self.os.tokenizer(self.index.sample(r).text, add_special_tokens=False)
                yield self.ref.collate_rows([[r] for r in rows])
            epoch += 1


def worker(a) -> dict:
    import torch

    from otterfast.data.index import PreparedIndex
    from otterfast.data.loader import NativeLoader
    from otterfast.data.reference import as_torch
    from otterfast.models.build import batch_loss, build_model, load_model_config

    idx = PreparedIndex(a.index)
    torch.manual_seed(0)
    model = build_model(load_model_config(a.model_config), idx.tok).float().train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    t0 = time.perf_counter()
    if a.worker == "native":
        loader = NativeLoader(idx, batch_size=1, pack=True, capacity=a.capacity, seed=0)
    elif a.worker == "otter_style" and idx.format != "fuyu":
        loader = OtterStyleBatches(idx, a.batch_size)
    else:
        loader = NativeLoader(idx, batch_size=a.batch_size, pack=False, seed=0)

    def forever():
        while True:
            yield from loader

    it = forever()
    tokens = slots = samples = steps = 0
    wait = 0.0
    first = None
    t_start = None
    while samples < a.samples:
        t = time.perf_counter()
        b = next(it)
        dt_wait = time.perf_counter() - t
        tb = as_torch(b)
        loss_sum, n = batch_loss(model, tb)
        (loss_sum / max(n, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if first is None:  # the first step (construction, warm-up) is timed apart
            first = time.perf_counter() - t0
            t_start = time.perf_counter()
            continue
        steps += 1
        wait += dt_wait
        tokens += int(b["attention_mask"].sum())
        slots += int(b["attention_mask"].size)
        samples += len(b["sample_index"])
    dt = time.perf_counter() - t_start
    return {"backend": a.worker, "tokens_per_s": tokens / dt, "samples_per_s": samples / dt,
            "steps_per_s": steps / dt, "padding": 1 - tokens / slots, "data_wait_share": wait / dt,
            "peak_rss_mb": hwm_mb(), "first_step_s": first, "steps": steps, "samples": samples,
            "tokens": tokens}


def run_worker(backend: str, index: str, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, "--index", index, "--model-config",
           a.model_config, "--samples", str(a.samples), "--capacity", str(a.capacity),
           "--batch-size", str(a.batch_size)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise RuntimeError(f"{backend} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def env_info() -> dict:
    import torch

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(), "cpu": model,
            "date": time.strftime("%Y-%m-%d")}


def markdown(r: dict) -> str:
    e = r["env"]
    b = "Otter-style: Otter's data path (pandas tables, base64 + PIL decode in the training process, 0 workers)" \
        if r["format"] != "fuyu" else "pad-to-longest: the native loader with pack=False (no Otter-style Fuyu path)"
    lines = [f"# training benchmark ({e['date']}, {e['cpus']} CPUs: {e['cpu']}; torch {e['torch']})", "",
             f"Tiny {r['model']} ({r['model_config']}), fp32 on the CPU, AdamW, {r['samples']} samples measured per "
             f"run after a first step; {r['data']}: {r['n_samples']} samples. native: packed rows of "
             f"{r['capacity']} tokens, one per step. {b}, batches of {r['batch_size']} padded to the longest. "
             f"Medians of {r['rounds']} interleaved rounds, each run in its own process.", "",
             "| path | tokens/s | samples/s | steps/s | padding | data wait | peak RSS MB | first step s |",
             "|---|---|---|---|---|---|---|---|"]
    for x in r["results"]:
        lines.append(f"| {x['backend']} | {x['tokens_per_s']:.0f} | {x['samples_per_s']:.1f} | {x['steps_per_s']:.2f} "
                     f"| {x['padding']:.1%} | {x['data_wait_share']:.0%} | {x['peak_rss_mb']:.0f} | "
                     f"{x['first_step_s']:.2f} |")
    lines += ["", f"**native / Otter-style: {r['ratio_tokens_per_s']:.2f}x tokens/s, "
                  f"{r['ratio_samples_per_s']:.2f}x samples/s** (per-round ratios: "
                  + ", ".join(f"{x:.2f}" for x in r["round_ratios"]) + ")", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="otterfast bench train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="auto", choices=["auto", "otter", "otterhd"])
    ap.add_argument("--data", help="a dataset YAML (default: the demo dataset, built in a temp dir)")
    ap.add_argument("--samples", type=int, default=600, help="samples measured per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--capacity", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", default="benches/results/train.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--index", help=argparse.SUPPRESS)
    ap.add_argument("--model-config", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    model = a.model
    if model == "auto":
        model = "otter" if os.path.exists(os.path.join(ROOT, "configs", "models", "otter-tiny.yaml")) else "otterhd"
    a.model_config = os.path.join(ROOT, "configs", "models", f"{model}-tiny.yaml")
    fmt = "simple" if model == "otter" else "fuyu"
    from otterfast.data.index import PreparedIndex
    from otterfast.data.prepare import PrepareOptions, prepare

    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if not data:
            from otterfast.data.demo import build_demo

            build_demo(os.path.join(tmp, "demo"), seed=0)
            data = os.path.join(tmp, "demo", "data.yaml")
        tok = os.path.join(os.path.dirname(os.path.abspath(data)), "tokenizer")
        index = os.path.join(tmp, "index")
        prepare(data, tok, index, PrepareOptions(format=fmt, max_seq_len=min(2048, a.capacity), video_frames=8,
                                                 with_task_description=True, on_error="skip"))
        n = len(PreparedIndex(index))
        runs: dict[str, list] = {"native": [], "otter_style": []}
        order = list(runs)
        for r in range(a.rounds):
            for b in (order if r % 2 == 0 else order[::-1]):
                res = run_worker(b, index, a)
                runs[b].append(res)
                print(f"  round {r}: {b:<12} {res['tokens_per_s']:8.0f} tokens/s {res['samples_per_s']:7.1f} samples/s "
                      f"padding {res['padding']:.1%} data wait {res['data_wait_share']:.0%}", flush=True)
    results = []
    for b, rs in runs.items():
        med = {k: statistics.median(x[k] for x in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        med["backend"] = b
        results.append({k: round(v, 4) if isinstance(v, float) else v for k, v in med.items()})
    nat, ots = results
    report = {"model": model, "model_config": os.path.relpath(a.model_config, ROOT), "format": fmt,
              "data": "demo dataset" if not a.data else a.data, "n_samples": n, "capacity": a.capacity,
              "batch_size": a.batch_size, "samples": a.samples, "rounds": a.rounds, "env": env_info(),
              "results": results, "ratio_tokens_per_s": nat["tokens_per_s"] / ots["tokens_per_s"],
              "ratio_samples_per_s": nat["samples_per_s"] / ots["samples_per_s"],
              "round_ratios": [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs["native"], runs["otter_style"])]}
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(report, f, indent=1)
    md = markdown(report)
    md_path = os.path.splitext(a.json)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {a.json} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
