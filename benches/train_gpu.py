"""Training throughput and MFU on one GPU at a ~1B-parameter OtterHD (Fuyu/Persimmon) shape, bf16, through the
trainer's own DeepSpeed engine (ZeRO-0, bf16 with fp32 master weights, torch fused AdamW, clipping 1.0); where
DeepSpeed is not installed (gpu_check.sh needs only torch), the same in plain torch (autocast bf16, fused AdamW).

    python benches/train_gpu.py [--steps 20] [--warmup 5] [--json benches/results/train_gpu.json]

Batches are synthetic but laid out as the native loader's packed Fuyu rows: rows of `--seq` tokens, each holding
samples of `--sample-len` tokens (an image of --patches 30x30 patches as placeholder tokens, then text), with
restarting positions and a block-diagonal causal mask (SDPA with a boolean mask), so only the model and the
engine are measured, not the data. MFU = flops_per_token(model, sample_len) x tokens/s / peak, with
flops_per_token from models/build.py (6 N + 12 L d T, T the sample length: attention stays within a sample)
and the peak from train/metrics.PEAK_TFLOPS (dense bf16; H100 SXM 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))


def synthetic_batch(rows: int, seq: int, sample_len: int, n_patches: int, vocab: int, image_id: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(16, vocab, (rows, seq), generator=g)
    labels = ids.clone()
    pos = torch.zeros(rows, seq, dtype=torch.long)
    seg = torch.full((rows, seq), -1, dtype=torch.int32)
    pidx = torch.full((rows, seq), -1, dtype=torch.long)
    n_img = 0
    per_row = seq // sample_len
    for r in range(rows):
        for k in range(per_row):
            lo = k * sample_len
            pos[r, lo : lo + sample_len] = torch.arange(sample_len)
            seg[r, lo : lo + sample_len] = k
            ids[r, lo : lo + n_patches] = image_id
            labels[r, lo : lo + n_patches + 1] = -100  # image tokens and each sample's first text token unlabelled
            pidx[r, lo : lo + n_patches] = torch.arange(n_img, n_img + n_patches)
            n_img += n_patches
        tail = per_row * sample_len
        ids[r, tail:] = 0
        labels[r, tail:] = -100
    patches = torch.randn(n_img, 2700, generator=g)
    b = {"input_ids": ids, "labels": labels, "position_ids": pos, "segment_ids": seg,
         "attention_mask": (seg >= 0).long(), "image_patches": patches, "image_patches_indices": pidx}
    return {k: v.to(device) for k, v in b.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=4096, help="packed row length")
    ap.add_argument("--rows", type=int, default=1, help="rows per micro-batch")
    ap.add_argument("--sample-len", type=int, default=512)
    ap.add_argument("--patches", type=int, default=150, help="image patches per sample (e.g. 300x450 px)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", default=os.path.join(ROOT, "benches", "results", "train_gpu.json"))
    ap.add_argument("--engine", default="auto", choices=["auto", "deepspeed", "torch"],
                    help="auto: the trainer's DeepSpeed engine when deepspeed imports, else plain torch (autocast bf16)")
    ap.add_argument("--cpu-smoke", action="store_true", help="run fp32 on the CPU (a check of the script itself)")
    a = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not a.cpu_smoke:
        print("train_gpu: no CUDA device; nothing measured", file=sys.stderr)
        return 0
    from otterfast.models.otterhd import OtterHDConfig, build_otterhd, flops_per_token

    import importlib.util

    # A bare GPU box (gpu_check.sh needs only torch) may lack DeepSpeed: then the same math in plain torch.
    engine_kind = a.engine if a.engine != "auto" else ("deepspeed" if importlib.util.find_spec("deepspeed") else "torch")
    torch.manual_seed(0)
    mcfg = OtterHDConfig(text_config={"hidden_size": a.hidden, "num_hidden_layers": a.layers,
                                      "num_attention_heads": a.heads, "intermediate_size": 4 * a.hidden,
                                      "max_position_embeddings": max(a.seq, 4096), "partial_rotary_factor": 0.5,
                                      "qk_layernorm": True, "hidden_act": "relu2"})
    model = build_otterhd(mcfg, vocab_size=a.vocab, image_token_id=5).train()
    n_params = sum(p.numel() for p in model.parameters())
    f_tok = float(flops_per_token(model, a.sample_len))
    precision = "fp32" if a.cpu_smoke else "bf16"
    if engine_kind == "deepspeed":
        from otterfast.train.config import load_config
        from otterfast.train.deepspeed_setup import device_for, ds_config, init_distributed, make_engine, setup_env
        from otterfast.train.loop import _loss_module
        from otterfast.train.optim import make_scheduler, param_groups

        setup_env()
        device = device_for(0)
        init_distributed(device)
        cfg = load_config({"max_steps": a.steps + a.warmup, "model": {"config": "unused"},
                           "data": {"index": "unused"}, "precision": precision, "optim": {"lr": 1e-4}})
        groups, _ = param_groups(model, cfg.optim.weight_decay)
        engine = make_engine(_loss_module(model), groups, cfg, ds_config(cfg, precision, a.rows, 1),
                             lambda opt: make_scheduler(opt, a.steps + a.warmup, 0, "constant", 0.0), device)

        def train_step(batch, n_lab):
            loss = engine(batch)
            engine.backward(loss / n_lab, scale_wrt_gas=False)
            engine.step()
    else:
        from otterfast.models.build import batch_loss

        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def train_step(batch, n_lab):  # fp32 master weights, bf16 matmuls: what DeepSpeed's bf16 does
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss_sum, _ = batch_loss(model, batch)
            (loss_sum / n_lab).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    batch = synthetic_batch(a.rows, a.seq, a.sample_len, a.patches, a.vocab, 5, device)
    n_lab = float((batch["labels"][:, 1:] != -100).sum())
    tokens = int(batch["attention_mask"].sum())
    times = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(a.warmup + a.steps):
        sync()
        t = time.perf_counter()
        train_step(batch, n_lab)
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    tps = tokens / med
    from otterfast.train.metrics import peak_tflops

    peak = peak_tflops(device, None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    res = {"gpu": name, "engine": engine_kind, "peak_tflops_bf16": peak, "params": n_params, "hidden": a.hidden, "layers": a.layers,
           "seq": a.seq, "rows": a.rows, "sample_len": a.sample_len, "tokens_per_step": tokens,
           "step_s_median": med, "tokens_per_s": tps, "flops_per_token": f_tok,
           "achieved_tflops": f_tok * tps / 1e12, "mfu": (f_tok * tps / (peak * 1e12)) if peak else None,
           "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None, "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(res, indent=1))
    print(f"train_gpu: {name}: {n_params / 1e9:.2f}B params, {tps:,.0f} tokens/s, {res['achieved_tflops']:.0f} TFLOP/s"
          + (f", MFU {res['mfu']:.1%} of {peak:.0f}" if peak else " (unknown peak: no MFU)"))
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
