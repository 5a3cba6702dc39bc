"""The `otterfast` command. Thin: parse arguments, call the module that does the work, print.

Each area registers its own sub-commands (`register(sub)`), and imports nothing heavy until a command runs:

    otterfast demo                      demo_run.py: the main job on its embedded default
    otterfast data ...                  data/cli.py: demo, validate, prepare, inspect
    otterfast train | plot              train/cli.py (and `bench train`)
    otterfast generate                  generate/cli.py
    otterfast serve | bench serve       serve/cli.py (docs/serve.md)
    otterfast eval run | score          eval/cli.py
    otterfast bench loader | train      benches/*.py from a source checkout (source_tree.py)

Errors. `main` is the one place that turns what a user can get wrong into one line on stderr,
`otterfast <sub-command>: <message>`, and exit status 2: wrong usage (argparse), bad values and configs (ValueError,
which ConfigError, DataError, the eval errors and pyarrow's ArrowInvalid all are), YAML that does not parse, and
missing or unreadable files. Anything else is a bug and keeps its traceback; OTTERFAST_TRACEBACK=1 shows the
traceback of the user errors too.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import demo_run
from .data import cli as data_cli
from .eval import cli as eval_cli
from .generate import cli as generate_cli
from .serve import cli as serve_cli
from .source_tree import run_bench
from .train import cli as train_cli


def cmd_bench_loader(a) -> int:
    return run_bench("loader.py", a.args)


TRACEBACK_ENV = "OTTERFAST_TRACEBACK"


class _Parser(argparse.ArgumentParser):
    """Wrong usage is one line naming the problem (the sub-command parsers inherit this class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="otterfast", description="Fast, correct training for Otter / OtterHD.",
                epilog=f"Errors print one line; {TRACEBACK_ENV}=1 shows their traceback.")
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
    serve_cli.register(sub, bsub)  # `otterfast serve`, `otterfast bench serve`
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can get wrong (bad values, configs and data; YAML that does not parse; missing or unreadable
    files). Anything else is a bug: it keeps its traceback."""
    import yaml

    return (ValueError, yaml.YAMLError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            FileExistsError)


def _message(e: BaseException) -> str:
    """The error as one line; only a defect report (DefectsFound) keeps its lines: the count first, then one line
    per defect kind and example."""
    from .data.defects import DefectsFound

    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    msg = str(e) or type(e).__name__
    if isinstance(e, DefectsFound):
        return msg.strip()
    return " ".join(msg.split())


def _command_name(args: argparse.Namespace) -> str:
    words = ["otterfast", args.command]
    for k in ("data_command", "eval_command", "bench_command"):
        if getattr(args, k, None):
            words.append(getattr(args, k))
    return " ".join(words)


def main(argv: list[str] | None = None) -> int:
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
    if argv[:2] == ["bench", "serve"]:  # likewise benches/serve.py
        return serve_cli.cmd_bench_serve(argparse.Namespace(args=argv[2:]))
    args = build_parser().parse_args(argv)
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return args.func(args)
    try:
        return args.func(args)
    except _user_errors() as e:
        # one line per process, never a traceback; under a launcher the other ranks name themselves (an error
        # only one rank meets, e.g. its data shard, must not be silent; the same check on every rank is N lines)
        rank = os.environ.get("RANK", "0") or "0"
        where = "" if rank == "0" else f" [rank {rank}]"
        print(f"{_command_name(args)}{where}: {_message(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{_command_name(args)}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
