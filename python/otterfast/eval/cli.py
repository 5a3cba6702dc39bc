"""`otterfast eval run|score`. Registered from otterfast.cli; imports nothing heavy until a command runs. Their
errors (LayoutError, PredictionsError, ConfigError, TaskError: ValueErrors; missing files) are printed as one line by
otterfast.cli's `main`."""

from __future__ import annotations

import argparse
import sys
import warnings


def _kv(s: str) -> tuple[str, object]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    import yaml

    k, v = s.split("=", 1)
    return k.strip(), yaml.safe_load(v)  # typed: true/false, numbers, strings


def cmd_score(a) -> int:
    from .judge import Judge, JudgeConfig
    from .report import markdown
    from .score import score_files, withheld

    judge = None
    if bool(a.judge_url) != bool(a.judge_model):
        raise ValueError("--judge-url and --judge-model go together: the judge needs both (an OpenAI-compatible "
                         "base URL and the model it serves)")
    if a.judge_url:
        cfg = {"url": a.judge_url, "model": a.judge_model, "api_key_env": a.judge_key_env,
               "cache_dir": a.judge_cache, "max_attempts": a.judge_attempts}
        judge = Judge(JudgeConfig.from_dict({k: v for k, v in cfg.items() if v is not None}))
    res = score_files(a.task, a.data, a.predictions, a.json, dict(a.option or []), judge, a.out_dir)
    sys.stdout.write(markdown([res]))
    print(f"wrote {a.json}")
    if withheld(res["metrics"]):
        print("otterfast: judge failures: a judged metric is withheld (rerun to retry; valid replies are cached)",
              file=sys.stderr)
        return 3
    return 0


def cmd_run(a) -> int:
    from .judge import SecretInConfigWarning
    from .report import markdown
    from .runner import load_config, run_config
    from .score import withheld

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SecretInConfigWarning)
        rc = load_config(a.config)
    for w in caught:
        print(f"otterfast eval run: warning: {w.message}", file=sys.stderr)
    if a.output:
        import os

        rc.output = os.path.abspath(a.output)
    if a.limit is not None:
        rc.limit = a.limit
    if a.no_resume:
        rc.resume = False
    results = run_config(rc, progress=not a.quiet)
    sys.stdout.write(markdown(results))
    print(f"results in {rc.output}/ (summary.md, results.json, <model>/<dataset>/)")
    if any(withheld(r["metrics"]) for r in results):
        print("otterfast: judge failures: some judged metrics are withheld", file=sys.stderr)
        return 3
    return 0


def register(subparsers) -> None:
    from .tasks import TASKS

    e = subparsers.add_parser("eval", help="benchmarks: run a model on local parquet files, or re-score replies")
    esub = e.add_subparsers(dest="eval_command", required=True)

    r = esub.add_parser("run", help="generate and score every model x dataset of a YAML config")
    r.add_argument("config", help="YAML with output, models, datasets (and optionally judge, limit)")
    r.add_argument("--output", help="override the config's output folder")
    r.add_argument("--limit", type=int, help="rows per dataset (MME keeps pairs, MMBench circular groups)")
    r.add_argument("--no-resume", action="store_true", help="regenerate rows already in predictions.jsonl")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)

    s = esub.add_parser("score", help="re-score saved replies without a model")
    s.add_argument("--task", required=True, choices=sorted(TASKS))
    s.add_argument("--data", required=True, help="the benchmark parquet file")
    s.add_argument("--predictions", required=True, help='JSONL, one {"row": i, "reply": "..."} per line')
    s.add_argument("--json", required=True, help="OUT.json: {task, n, metrics}")
    s.add_argument("--out-dir", help="where <stem>.samples.jsonl and <stem>.md go (default: beside OUT.json)")
    s.add_argument("--option", action="append", type=_kv, metavar="KEY=VALUE",
                   help="task option, e.g. prompt=lmms, mode=generate, hint=false, extractor=judge")
    s.add_argument("--judge-url", help="OpenAI-compatible base URL (…/v1) for MM-Vet, MagnifierBench free-form")
    s.add_argument("--judge-model")
    s.add_argument("--judge-key-env", help="environment variable that holds the judge's API key")
    s.add_argument("--judge-cache", help="folder for cached judge replies")
    s.add_argument("--judge-attempts", type=int, help="attempts per judge prompt (default 4)")
    s.set_defaults(func=cmd_score)
