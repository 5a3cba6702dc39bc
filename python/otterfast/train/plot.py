"""`otterfast plot OUTPUT_DIR`: loss (and lr, and the validation loss where a step has one) and throughput curves
from metrics.jsonl, as one PNG."""

from __future__ import annotations

import json
import os


def read_metrics(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (a training run writes it)")
    rows = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                r = json.loads(line)
                rows[r["step"]] = r  # a resumed run may log a step again: the last write wins
    return [rows[k] for k in sorted(rows)]


def plot(output_dir: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(output_dir)
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    ax1.plot(steps, [r["loss"] for r in rows], label="training loss", color="tab:blue")
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax1.plot([s for s, _ in val], [v for _, v in val], "o-", color="tab:orange", label="validation loss")
        ax1.legend(loc="upper right")
    ax1.set_ylabel("loss (token mean)")
    ax1.grid(alpha=0.3)
    lr_ax = ax1.twinx()
    lr_ax.plot(steps, [r["lr"] for r in rows], color="tab:gray", alpha=0.5, label="lr")
    lr_ax.set_ylabel("lr", color="tab:gray")
    ax2.plot(steps, [r["tokens_per_s"] for r in rows], color="tab:green", label="tokens/s")
    ax2.set_ylabel("tokens/s (all ranks)")
    ax2.set_xlabel("optimizer step")
    ax2.grid(alpha=0.3)
    if any(r.get("mfu") is not None for r in rows):
        m_ax = ax2.twinx()
        m_ax.plot(steps, [r.get("mfu") or 0.0 for r in rows], color="tab:red", alpha=0.6)
        m_ax.set_ylabel("MFU", color="tab:red")
    fig.suptitle(os.path.abspath(output_dir))
    fig.tight_layout()
    out = out or os.path.join(output_dir, "metrics.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
