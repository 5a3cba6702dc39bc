"""Per-step metrics on rank 0: one console line per optimizer step (above a progress bar), metrics.jsonl,
TensorBoard, and wandb when configured and installed.

A step with a validation pass carries its `val_*` keys (val_loss, val_tokens, ...: train/validation.py) in the same
metrics.jsonl line; TensorBoard and wandb get them as `val/loss`, `val/tokens`, ..., the others as `train/...`.
A step with a quick eval (a checkpoint step with `eval_run` set: train/quick_eval.py) carries `eval_<dataset>_<metric>`
and `eval_s`, logged as `eval/...`.

MFU = achieved model FLOP/s per device / the device's peak dense bf16 FLOP/s, where achieved FLOP/s =
flops_per_token(model, L) * non-pad tokens/s per device and `flops_per_token` is the model's own estimate
(models/build.py: 6 N + 12 n_layers d_model L for OtterHD). L is the step's mean sample length: attention on
packed rows stays within each sample, so the attention term uses the sample's length, not the row's.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from ..gpu_specs import GPU_SPECS, gpu_spec

# Dense bf16 peak, TFLOP/s per device (gpu_specs.py, the one table). Matched by substring of the CUDA name.
PEAK_TFLOPS = {key: tflops for key, tflops, _ in GPU_SPECS}


def peak_tflops(device, configured: float | None) -> float | None:
    if configured:
        return configured
    if device.type != "cuda":
        return None  # no meaningful peak for a CPU: MFU is GPU-only
    import torch

    spec = gpu_spec(torch.cuda.get_device_name(device))
    return spec[0] if spec else None


def peak_memory_gb(device) -> float:
    """GPU: peak allocated by torch; CPU: the process's peak RSS (VmHWM)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


class Metrics:
    def __init__(self, output_dir: str, cfg, rank: int, total_steps: int, start_step: int, config_dict: dict):
        self.rank = rank
        self.on = rank == 0
        self.bar = None
        self.tb = None
        self.wandb = None
        if not self.on:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        lg = cfg.logging
        if lg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        if lg.wandb_project:
            try:
                import wandb
            except ImportError:
                print("[train] wandb_project is set but wandb is not installed: skipping wandb", flush=True)
            else:
                self.wandb = wandb.init(project=lg.wandb_project, entity=lg.wandb_entity,
                                        name=lg.wandb_name or os.path.basename(os.path.abspath(output_dir)),
                                        config=config_dict, resume="allow")
        if lg.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)

    def print(self, msg: str) -> None:
        if not self.on:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def log(self, rec: dict) -> None:
        if not self.on:
            return
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        step = rec["step"]
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(scalar_name(k), v, step)
        if self.wandb is not None:
            self.wandb.log({scalar_name(k): v for k, v in rec.items() if k != "step"}, step=step)
        self.print(format_line(rec))
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if not self.on:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()


def scalar_name(key: str) -> str:
    """TensorBoard / wandb tag of a metrics key: `val_loss` -> `val/loss`, `eval_pope_accuracy` ->
    `eval/pope_accuracy` (the quick eval, train/quick_eval.py), `loss` -> `train/loss`."""
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    if key.startswith("eval_"):
        return f"eval/{key[5:]}"
    return f"train/{key}"


def format_line(r: dict) -> str:
    gn = r.get("grad_norm")
    parts = [f"step {r['step']}", f"epoch {r['epoch']:.2f}", f"loss {r['loss']:.4f}",
             f"gnorm {gn:.3f}" if gn is not None else "gnorm -", f"lr {r['lr']:.2e}",
             f"{r['tokens_per_s']:.0f} tok/s", f"{r['samples_per_s']:.1f} samples/s", f"pad {r['padding']:.1%}",
             f"mem {r['peak_mem_gb']:.2f} GB"]
    if r.get("mfu") is not None:
        parts.append(f"MFU {r['mfu']:.1%}")
    if "val_loss" in r:
        parts.append(f"val loss {r['val_loss']:.4f} ({r['val_tokens']} tokens, {r['val_s']:.1f}s)")
    if "eval_s" in r:  # the quick eval: its accuracies on the console (at most 4), every score in metrics.jsonl
        scores = {k[5:]: v for k, v in r.items() if k.startswith("eval_") and k != "eval_s"}
        shown = [k for k in scores if k.endswith("_accuracy")][:4] or list(scores)[:4]
        more = f", +{len(scores) - len(shown)} in metrics.jsonl" if len(scores) > len(shown) else ""
        parts.append("eval " + (", ".join(f"{k} {scores[k]:.3f}" for k in shown) or "no numeric scores") + more
                     + f" ({r['eval_s']:.1f}s)")
    return " | ".join(parts)


class StepTimer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
