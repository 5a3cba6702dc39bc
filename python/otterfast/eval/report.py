"""Markdown summary table and result files."""

from __future__ import annotations

import json
import os

HEADLINE = {
    "mme": ("perception", "cognition"),
    "pope": ("accuracy", "precision", "recall", "f1", "yes_ratio"),
    "mmbench": ("accuracy", "circular_accuracy"),
    "seedbench": ("accuracy",),
    "scienceqa": ("accuracy",),
    "mathvista": ("accuracy",),
    "mmvet": ("score",),
    "magnifierbench": ("accuracy", "freeform_accuracy"),
}


def fmt(task: str, key: str, v) -> str:
    if v is None:
        return "withheld"
    if task == "mme":
        return f"{v:.2f}"
    if isinstance(v, float):
        return f"{100 * v:.2f}%"
    return str(v)


def markdown(results: list[dict]) -> str:
    """One row per (model, dataset): n, the headline metrics, `other` replies and judge failures."""
    lines = ["| model | dataset | task | n | metrics | other | judge failures |", "|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["metrics"]
        heads = ", ".join(f"{k} {fmt(r['task'], k, m.get(k))}" for k in HEADLINE.get(r["task"], ()) if k in m)
        jf = m.get("judge_failures")
        if jf is None and isinstance(m.get("freeform"), dict):
            jf = m["freeform"].get("judge_failures")
        lines.append(f"| {r.get('model', '-')} | {r.get('dataset', r['task'])} | {r['task']} | {r['n']} | {heads} | "
                     f"{m.get('other', '-')} | {'-' if jf is None else jf} |")
    return "\n".join(lines) + "\n"


def write_json(path: str, obj) -> None:
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_jsonl(path: str, rows: list[dict]) -> None:
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
