"""Self-attention on packed rows, forward + backward: the ways to compute it, side by side in one run.

    python benches/packed_attention.py                           # CPU: rows of 2k and 8k tokens
    python benches/packed_attention.py --lengths 2048,8192,32768 # GPU (benches/gpu_check.sh)

One row of T tokens holds samples of realistic lengths (a seeded log-normal, median ~200 tokens, 8-2,048; or the
sample lengths of a prepared index with --index), 8 heads of 64. Each way computes the same causal attention
within each sample (checked against the dense path before timing, where the dense one runs):
- dense: SDPA with the (1, 1, T, T) block-diagonal bool mask (otterfast's path before the packed one);
- per_sample: SDPA with is_causal, one call per distinct sample length (models/packing.py, slack 1.0);
- grouped: SDPA with is_causal over groups of similar lengths padded to the group's longest (slack 1.3, the
  default);
- flash_varlen: flash-attn's varlen kernel over the samples' cu_seqlens (CUDA with flash-attn only).
Timings: medians of interleaved repetitions, after a warm-up. Writes JSON and markdown (benches/results/).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import env_info, write_report  # noqa: E402


def sample_lengths(T: int, seed: int, index: str | None):
    import numpy as np

    rng = np.random.default_rng(seed)
    if index:
        from otterfast.data.index import PreparedIndex

        idx = PreparedIndex(index)
        pool = np.array([idx.sample(i).n_tokens for i in range(len(idx))])
    else:
        pool = np.clip(rng.lognormal(np.log(200), 0.8, 10_000).astype(int), 8, 2048)
    lens, left = [], T
    while left > 0:
        n = int(min(rng.choice(pool), left))
        lens.append(n)
        left -= n
    return lens


def make_inputs(lens, heads, dim, device, dtype):
    import torch

    T = sum(lens)
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None].to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, T, dim, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    return seg, q, k, v


def ways(device, dtype):
    import torch
    import torch.nn.functional as F

    from otterfast.models import attention
    from otterfast.models.packing import PackedLayout, block_causal_mask

    def dense(seg, q, k, v, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(seg), scale=scale).transpose(1, 2)

    def grouped_with(slack):
        def run(seg, q, k, v, scale):
            return attention.packed_attention(q, k, v, PackedLayout.from_segment_ids(seg, slack=slack), scale,
                                              use_flash=False)
        return run

    flash_ok = attention.flash_attn_available(torch.device(device)) and dtype != torch.float32
    out = {"dense": dense, "per_sample": grouped_with(1.0), "grouped": grouped_with(1.3)}
    if flash_ok:
        def flash(seg, q, k, v, scale):
            return attention.packed_attention(q, k, v, PackedLayout.from_segment_ids(seg), scale, use_flash=True)

        out["flash_varlen"] = flash
    return out


def time_one(fn, seg, q, k, v, device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(seg, q, k, v, q.shape[-1] ** -0.5)
    out.float().square().mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    for x in (q, k, v):
        x.grad = None
    return dt, out.detach()


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="2048,8192", help="row lengths T")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dense-max", type=int, default=8192, help="skip the dense path above this T (memory)")
    ap.add_argument("--index", help="a prepared index: its sample lengths instead of the log-normal")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default="benches/results/packed_attention.json")
    a = ap.parse_args(argv)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    rows = []
    for T in [int(x) for x in a.lengths.split(",")]:
        lens = sample_lengths(T, 0, a.index)
        seg, q, k, v = make_inputs(lens, a.heads, a.head_dim, a.device, dtype)
        fns = {n: f for n, f in ways(a.device, dtype).items() if n != "dense" or T <= a.dense_max}
        times = {n: [] for n in fns}
        ref = None
        for n, f in fns.items():  # warm-up and agreement
            _, out = time_one(f, seg, q, k, v, a.device)
            if ref is None:
                ref = out
            else:
                err = float((out.float() - ref.float()).abs().max())
                if err > (1e-4 if dtype == torch.float32 else 3e-2):
                    raise SystemExit(f"{n} differs from {next(iter(fns))} by {err} at T={T}")
        for r in range(a.reps):
            for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                times[n].append(time_one(fns[n], seg, q, k, v, a.device)[0])
        med = {n: statistics.median(t) for n, t in times.items()}
        base = med.get("dense")
        for n, t in med.items():
            rows.append({"T": T, "way": n, "samples": len(lens), "fwd_bwd_ms": round(t * 1000, 2),
                         "tokens_per_s": round(T / t), "vs_dense": round(base / t, 2) if base else None})
            print(f"T={T:6d} {n:<12} {t * 1000:9.1f} ms  {T / t:10.0f} tokens/s"
                  + (f"  {base / t:5.2f}x dense" if base else ""), flush=True)
    report = {"env": env_info("torch"), "device": a.device, "dtype": str(dtype), "heads": a.heads,
              "head_dim": a.head_dim, "reps": a.reps, "lengths_from": a.index or "log-normal(200, 0.8) in 8..2048",
              "results": rows}
    md = ["# packed self-attention, forward + backward", "",
          f"{a.device} ({report['env'].get('gpu', report['env']['cpu'])}), {dtype}, {a.heads} heads x {a.head_dim}, "
          f"one row of T tokens packed with samples of {report['lengths_from']} tokens; medians of {a.reps} "
          f"interleaved repetitions (`python benches/packed_attention.py --lengths {a.lengths}`).", "",
          "| T | way | samples | fwd+bwd ms | tokens/s | vs dense |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['T']} | {r['way']} | {r['samples']} | {r['fwd_bwd_ms']} | {r['tokens_per_s']} | "
                  f"{r['vs_dense'] if r['vs_dense'] else '-'} |")
    path = write_report(a.json, report, "\n".join(md) + "\n")
    print(f"wrote {a.json} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
