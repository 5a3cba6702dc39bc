"""Score saved replies against a benchmark file, without a model."""

from __future__ import annotations

import os
from typing import Any

from .judge import Judge
from .predictions import read_predictions
from .report import markdown, write_json, write_jsonl
from .tasks import get_task


def withheld(metrics: dict) -> bool:
    """True when a judged metric was withheld because of judge failures (the caller exits non-zero)."""
    def bad(m: dict) -> bool:
        return bool(m.get("judge_failures")) or any(isinstance(v, dict) and bad(v) for v in m.values())
    return bad(metrics)


def score_lines(task_name: str, data: str, lines: dict[int, dict], options: dict | None = None,
                judge: Judge | None = None, loaded=None) -> tuple[dict, list[dict]]:
    """(result, per-sample records). result = {"task", "n", "metrics", ...}; n counts the rows scored."""
    task = get_task(task_name)
    opts = task.resolve_options(options)
    loaded = loaded or task.load(data, with_images=False)
    bad = [r for r in lines if r >= loaded.n_rows]
    if bad:
        raise ValueError(f"predictions name rows {bad[:5]} but {data} has {loaded.n_rows} rows")
    kept = [it for it in loaded.items if task.skip(it, opts) is None]
    metrics, samples = task.metrics(loaded.items, _text_replies(lines), opts, judge)
    result: dict[str, Any] = {
        "task": task_name, "n": len(samples), "metrics": metrics, "data": data, "layout": loaded.layout,
        "rows": loaded.n_rows, "missing": sum(it.row not in lines for it in kept),
        "skipped": loaded.n_rows - len(kept), "options": opts,
    }
    if judge is not None:
        result["judge"] = {"model": judge.cfg.model, **judge.stats.as_dict()}
    return result, samples


def _text_replies(lines: dict[int, dict]) -> dict[int, dict]:
    """Every reply as text (a model object may hand back something else): the parsers read strings or None."""
    out = {}
    for r, line in lines.items():
        bad = [k for k, v in line.items() if k.endswith("reply") and v is not None and not isinstance(v, str)]
        out[r] = {**line, **{k: str(line[k]) for k in bad}} if bad else line
    return out


def score_files(task_name: str, data: str, predictions: str, json_out: str, options: dict | None = None,
                judge: Judge | None = None, out_dir: str | None = None) -> dict:
    """`otterfast eval score`: writes OUT.json, plus <stem>.samples.jsonl and <stem>.md beside it (or in out_dir)."""
    task = get_task(task_name)
    loaded = task.load(data, with_images=False)
    lines = read_predictions(predictions, loaded.n_rows)
    result, samples = score_lines(task_name, data, lines, options, judge, loaded)
    result["predictions"] = predictions
    write_json(json_out, result)
    stem = os.path.splitext(os.path.basename(json_out))[0]
    folder = out_dir or os.path.dirname(os.path.abspath(json_out))
    write_jsonl(os.path.join(folder, f"{stem}.samples.jsonl"), samples)
    with open(os.path.join(folder, f"{stem}.md"), "w", encoding="utf-8") as f:
        f.write(markdown([result]))
    return result
