"""The `otterfast` command. Thin: parse arguments, call the module that does the work, print.

Each area registers its own sub-commands (`register(sub)`), and imports nothing heavy until a command runs:

    otterfast demo                      demo_run.py: the main job on its embedded default
    otterfast data ...                  data/cli.py: demo, validate, prepare, inspect
    otterfast train | plot              train/cli.py (and `bench train`)
    otterfast generate                  generate/cli.py
    otterfast eval run | score          eval/cli.py
    otterfast bench loader | train      benches/*.py from a source checkout (source_tree.py)
"""

from __future__ import annotations

import argparse
import os
import sys

from . import demo_run
from .data import cli as data_cli
from .eval import cli as eval_cli
from .generate import cli as generate_cli
from .source_tree import run_bench
from .train import cli as train_cli


def cmd_bench_loader(a) -> int:
    return run_bench("loader.py", a.args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otterfast", description="Fast, correct training for Otter / OtterHD.")
    sub = p.add_subparsers(dest="command", required=True)
    demo_run.register(sub)  # `otterfast demo`
    data_cli.register(sub)  # `otterfast data ...`

    b = sub.add_parser("bench", help="benchmarks (from a source checkout: benches/)")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    x = bsub.add_parser("loader", help="Otter-style vs reference vs native loader, side by side; "
                        "all arguments go to benches/loader.py (see its --help)", add_help=False)
    x.add_argument("args", nargs=argparse.REMAINDER)
    x.set_defaults(func=cmd_bench_loader)
    eval_cli.register(sub)  # `otterfast eval` (docs/eval.md)
    generate_cli.register(sub)  # `otterfast generate`
    train_cli.register(sub, bsub)  # train, plot, bench train
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
