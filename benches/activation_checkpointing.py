"""Activation checkpointing: peak memory and step time of one training step, per mode, side by side.

    python benches/activation_checkpointing.py                  # CPU: OtterHD d=384 x 6 layers, a 4,096-token row
    python benches/activation_checkpointing.py --model otter --tokens 8192

One packed row of `--tokens` tokens (samples of 37..1,500 tokens, no images) through a random-init model wider
than the tiny test ones (so that activations, not the process, dominate), forward + backward, each mode in its
own process: peak RSS (VmHWM) on the CPU, peak allocated on a GPU, and the step's seconds (median of
`--steps` after a warm-up step). The loss must be the same in every mode (checked). Writes JSON and markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import env_info, hwm_mb, write_report  # noqa: E402

MODES = ("none", "decoder", "all")


def model_and_batch(kind: str, tokens: int, width: int, layers: int, device):
    import torch

    from otterfast.models.build import build_model, load_model_config

    vocab, img = 4096, 3
    if kind == "otterhd":
        doc = {"architecture": "otterhd", "text_config": {
            "hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": width // 64,
            "intermediate_size": 4 * width, "max_position_embeddings": max(tokens, 4096),
            "partial_rotary_factor": 0.5, "qk_layernorm": True, "hidden_act": "relu2"}}
    else:
        doc = {"architecture": "otter", "otter": {
            "cross_attn_every_n_layers": 2, "perceiver_depth": 2, "perceiver_num_latents": 16,
            "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "image_size": 224, "patch_size": 32},
            "text_config": {"model_type": "llama", "hidden_size": width, "intermediate_size": 4 * width,
                            "num_hidden_layers": layers, "num_attention_heads": width // 64,
                            "num_key_value_heads": width // 64, "max_position_embeddings": max(tokens, 4096),
                            "tie_word_embeddings": False}}}
    tok = {"vocab_size": vocab, "fuyu_placeholder_id": img, "media_id": img, "eoc_id": 4}
    torch.manual_seed(0)
    model = build_model(load_model_config(doc), tok).float().to(device).train()
    g = torch.Generator().manual_seed(0)
    seg = torch.full((1, tokens), -1)
    pos = torch.zeros(1, tokens, dtype=torch.long)
    s, i, lens = 0, 0, [37, 512, 901, 1500, 7, 300, 64]
    while s < tokens:
        n = min(lens[i % len(lens)], tokens - s)
        seg[0, s:s + n], pos[0, s:s + n] = i, torch.arange(n)
        s, i = s + n, i + 1
    ids = torch.randint(5, vocab, (1, tokens), generator=g)
    labels = ids.clone()
    labels[pos == 0] = -100
    batch = {"input_ids": ids, "position_ids": pos, "segment_ids": seg, "labels": labels,
             "attention_mask": torch.ones_like(ids), "image_patches": torch.zeros(0, 2700),
             "image_patches_indices": torch.full_like(ids, -1), "pixel_values": torch.zeros(0, 3, 224, 224),
             "media_frames": torch.zeros(0, dtype=torch.long), "media_row": torch.zeros(0, dtype=torch.long)}
    return model, {k: v.to(device) for k, v in batch.items()}


def worker(a) -> dict:
    import torch

    from otterfast.models.build import batch_loss, set_activation_checkpointing

    device = torch.device(a.device)
    model, batch = model_and_batch(a.model, a.tokens, a.width, a.layers, device)
    set_activation_checkpointing(model, a.worker)
    times, loss = [], None
    for step in range(a.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        loss_sum, n = batch_loss(model, batch)
        (loss_sum / n).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t)
        loss = float(loss_sum / n)
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else hwm_mb()
    return {"mode": a.worker, "loss": loss, "step_s": statistics.median(times), "peak_mb": peak,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="otterhd", choices=["otterhd", "otter"])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default="benches/results/activation_checkpointing.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    rows = []
    for mode in MODES:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode] + [
            x for k in ("model", "tokens", "width", "layers", "steps", "device")
            for x in (f"--{k}", str(getattr(a, k)))]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{mode} failed:\n{p.stderr[-3000:]}")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    ref = rows[0]
    for r in rows:
        if abs(r["loss"] - ref["loss"]) > 1e-4 * max(1.0, abs(ref["loss"])):
            raise SystemExit(f"loss differs with {r['mode']}: {r['loss']} vs {ref['loss']}")
        r["peak_vs_none"] = r["peak_mb"] / ref["peak_mb"]
        r["time_vs_none"] = r["step_s"] / ref["step_s"]
    what = "peak allocated (GPU)" if a.device == "cuda" else "peak RSS (whole process)"
    cmd = "python benches/activation_checkpointing.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": cmd.strip(), "env": env_info("torch", "transformers"), "model": a.model, "tokens": a.tokens,
              "width": a.width, "layers": a.layers, "device": a.device, "results": rows}
    md = [f"# activation checkpointing: {a.model} d={a.width} x {a.layers} layers ({rows[0]['params_m']:.1f}M params), "
          f"one packed row of {a.tokens} tokens, fp32, {a.device}", "", f"`{report['command']}`", "",
          f"| mode | {what} MB | vs none | step s | vs none | loss |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['mode']} | {r['peak_mb']:.0f} | {r['peak_vs_none']:.0%} | {r['step_s']:.2f} | "
                  f"{r['time_vs_none']:.2f}x | {r['loss']:.5f} |")
    path = write_report(a.json, report, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {a.json} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
