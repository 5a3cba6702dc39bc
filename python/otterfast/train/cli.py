"""`otterfast train`, `otterfast plot` and `otterfast bench train`. Light at import: nothing heavy until run."""

from __future__ import annotations

import argparse
import sys


def cmd_train(a) -> int:
    """A bad config and the loop's clear ValueErrors (a mismatched index, too little data, bf16 on a CPU, ...)
    propagate to otterfast.cli's `main`, which prints them as one line `otterfast train: ...`, by rank 0 only (every
    rank meets the same checks), and exits 2; a stop on purpose is exit 3."""
    from .config import load_config

    cfg = load_config(a.config, a.set)
    from .loop import TrainingStopped, run

    try:
        run(cfg, a.config)
    except TrainingStopped as e:
        print(f"otterfast train: stopped: {e}", file=sys.stderr)
        return 3
    return 0


def cmd_plot(a) -> int:
    from .plot import plot

    path = plot(a.output_dir, a.out)
    print(path)
    return 0


def cmd_bench_train(a) -> int:
    from ..source_tree import run_bench

    argv = ["--samples", str(a.samples), "--rounds", str(a.rounds), "--json", a.json, "--model", a.model,
            "--capacities", a.capacities, "--batch-size", str(a.batch_size)]
    if a.cores:
        argv += ["--cores", str(a.cores)]
    if a.data:
        argv += ["--data", a.data]
    return run_bench("train.py", argv)


def register(sub, bench_sub=None) -> None:
    """Add `train` and `plot` to the top-level sub-commands and `train` under `bench`."""
    x = sub.add_parser("train", help="train Otter / OtterHD on DeepSpeed from a YAML config (docs/train.md)",
                       description="Train from one YAML config. Single process as is; several with torchrun or "
                                   "the deepspeed launcher.")
    x.add_argument("config", help="a training YAML (configs/train/*.yaml)")
    x.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config key, e.g. --set optim.lr=3e-4 --set max_steps=100 (repeatable)")
    x.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    x.set_defaults(func=cmd_train)

    x = sub.add_parser("plot", help="PNG of loss and throughput curves from OUTPUT_DIR/metrics.jsonl")
    x.add_argument("output_dir")
    x.add_argument("--out", default=None, help="PNG path (default OUTPUT_DIR/metrics.png)")
    x.set_defaults(func=cmd_plot)

    if bench_sub is not None:
        x = bench_sub.add_parser("train", help="training tokens/s on the CPU at equal cores: native packed loader "
                                 "vs Otter's data path in DataLoader workers, same tiny model (benches/train.py)")
        x.add_argument("--model", default="otter", choices=["otter", "otterhd"],
                       help="tiny model (otterhd: against pad-to-longest batches of the reference Fuyu path)")
        x.add_argument("--data", default=None, help="a dataset YAML (default: the demo dataset, built in a temp dir)")
        x.add_argument("--samples", type=int, default=600, help="samples measured per run (after a first step)")
        x.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
        x.add_argument("--capacities", default="512,2048,8192", help="packed row lengths (native), comma-separated")
        x.add_argument("--batch-size", type=int, default=8, help="Otter-style samples per padded batch")
        x.add_argument("--cores", type=int, default=None,
                       help="loader threads = DataLoader workers = torch threads (default: every core)")
        x.add_argument("--json", default="benches/results/train.json")
        x.set_defaults(func=cmd_bench_train)
