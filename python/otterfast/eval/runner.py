"""`otterfast eval run CONFIG.yaml`: generate (or replay) replies for every model x dataset, then score them.

Config (paths relative to the YAML's folder):

    output: runs/eval            # required: <output>/<model>/<dataset>/{predictions,samples}.jsonl, metrics.json
    limit: 100                   # optional, every dataset (MME keeps pairs, MMBench keeps circular groups)
    resume: true                 # keep rows already in predictions.jsonl whose prompt and decode settings match
    judge: {url: http://host/v1, model: gpt-4o, api_key_env: OPENAI_API_KEY}   # optional
    models:
      - {name: otter, kind: otter, path: ckpt/, template: otter, decode: {num_beams: 1}, options: {...}}
      - {name: old, kind: replay, predictions: runs/old/otter}
    datasets:
      - {task: mme, data: MME.parquet, name: mme, limit: 20, options: {prompt: lmms}, decode: {max_new_tokens: 16}}
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, check_keys, coerce, read_yaml
from .judge import Judge, JudgeConfig, SecretInConfigWarning
from .model_api import DEFAULT_DECODE, GENERATOR_KEYS, MODEL_KINDS, ReplayModel, describe, load_eval_model
from .predictions import read_predictions, write_line
from .progress import Progress
from .report import markdown, write_json, write_jsonl
from .score import score_lines, withheld
from .tasks import TASKS, get_task
from .tasks.mc import argmax_letter
from .templates import canonical, continuation, wrap

TOP_KEYS = ("output", "models", "datasets", "judge", "limit", "resume")
MODEL_KEYS = ("name", "kind", "path", "template", "decode", "options", "predictions")
DATASET_KEYS = ("task", "data", "name", "limit", "options", "decode")
DECODE_KEYS = ("max_new_tokens", "num_beams", "no_repeat_ngram_size", "do_sample", "temperature", "top_p", "top_k",
               "length_penalty", "repetition_penalty", "min_new_tokens", "early_stopping")


@dataclass
class RunConfig:
    output: str
    models: list[dict]
    datasets: list[dict]
    judge: dict | None = None
    limit: int | None = None
    resume: bool = True
    base_dir: str = "."
    raw: dict = field(default_factory=dict)


def parse_config(cfg: dict, base_dir: str = ".") -> RunConfig:
    """Validate a config mapping; every unknown key is an error naming the valid ones."""
    cfg = copy.deepcopy(cfg)
    check_keys(cfg, TOP_KEYS, "config")
    for k in ("output", "models", "datasets"):
        if not cfg.get(k):
            raise ConfigError(f"config: `{k}` is required")

    def path(p: str) -> str:
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))

    names = set()
    for i, m in enumerate(cfg["models"]):
        where = f"models[{i}]"
        check_keys(m, MODEL_KEYS, where)
        if not m.get("name") or not m.get("kind"):
            raise ConfigError(f"{where}: `name` and `kind` are required")
        check_name(m["name"], f"{where}.name")
        if m["kind"] not in MODEL_KINDS:
            raise ConfigError(f"{where}: kind {m['kind']!r}; valid: {list(MODEL_KINDS)}")
        if m["name"] in names:
            raise ConfigError(f"{where}: model name {m['name']!r} used twice")
        names.add(m["name"])
        if m["kind"] in ("otter", "otterhd"):
            if not m.get("path"):
                raise ConfigError(f"{where}: kind {m['kind']} needs `path` (a local checkpoint folder)")
            m["path"] = path(m["path"])
        if m["kind"] == "replay":
            p = m.get("predictions")
            if not p:
                raise ConfigError(f"{where}: kind replay needs `predictions`")
            m["predictions"] = {k: path(v) for k, v in p.items()} if isinstance(p, dict) else path(p)
        if m.get("template") is not None and m["kind"] not in ("otter", "otterhd"):
            try:  # otter/otterhd templates are checked by otterfast.generate against the checkpoint's family
                canonical(m["template"])
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from e
        if m["kind"] in ("otter", "otterhd"):
            check_keys(m.get("options") or {}, GENERATOR_KEYS, f"{where}.options")
        check_keys(m.get("decode") or {}, DECODE_KEYS, f"{where}.decode")
    dnames = set()
    for i, d in enumerate(cfg["datasets"]):
        where = f"datasets[{i}]"
        check_keys(d, DATASET_KEYS, where)
        if not d.get("task") or not d.get("data"):
            raise ConfigError(f"{where}: `task` and `data` are required")
        if d["task"] not in TASKS:
            raise ConfigError(f"{where}: task {d['task']!r}; valid: {sorted(TASKS)}")
        d["data"] = path(d["data"])
        if "limit" in d:
            d["limit"] = coerce(d["limit"], int | None, f"{where}.limit")
        d.setdefault("name", d["task"])
        check_name(d["name"], f"{where}.name")
        if d["name"] in dnames:
            raise ConfigError(f"{where}: dataset name {d['name']!r} used twice")
        dnames.add(d["name"])
        try:
            get_task(d["task"]).resolve_options(d.get("options"))
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from e
        check_keys(d.get("decode") or {}, DECODE_KEYS, f"{where}.decode")
    if cfg.get("judge") is not None:
        try:
            JudgeConfig.from_dict(cfg["judge"])
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from e
        if cfg["judge"].get("api_key"):
            warnings.warn("judge.api_key is written in the config, which gets copied, committed and logged: put the "
                          "key in an environment variable and name it with judge.api_key_env", SecretInConfigWarning,
                          stacklevel=2)
    return RunConfig(output=path(coerce(cfg["output"], str, "output")), models=cfg["models"],
                     datasets=cfg["datasets"], judge=cfg.get("judge"),
                     limit=coerce(cfg.get("limit"), int | None, "limit"),
                     resume=coerce(cfg.get("resume", True), bool, "resume"), base_dir=base_dir, raw=cfg)


def check_name(name, where: str) -> None:
    """A model or dataset name is a folder under `output`: one plain path component, so that no name (`../x`, an
    absolute path, `a/b`) writes outside the output folder."""
    if not isinstance(name, str):
        raise ConfigError(f"{where}: {name!r} is not a string")
    bad = None
    if name in ("", ".", ".."):
        bad = "is not a folder name"
    elif os.path.isabs(name) or os.path.splitdrive(name)[0] or name.startswith("\\"):
        bad = "is an absolute path"
    elif "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        bad = "contains a path separator"
    elif any(ord(c) < 32 or c == "\x7f" for c in name):
        bad = "contains a control character"
    if bad:
        raise ConfigError(f"{where}: {name!r} {bad}; it names a folder under `output`: use a plain name such as "
                          "'otter-9b'")


def output_folder(rc: RunConfig, model_name: str, dataset_name: str) -> str:
    """<output>/<model>/<dataset>, refused when the names would leave <output>."""
    check_name(model_name, "model name")
    check_name(dataset_name, "dataset name")
    root = os.path.abspath(rc.output)
    folder = os.path.abspath(os.path.join(root, model_name, dataset_name))
    if os.path.commonpath([root, folder]) != root:
        raise ConfigError(f"{model_name}/{dataset_name}: leaves the output folder {root}")
    return folder


def load_config(path: str) -> RunConfig:
    return parse_config(read_yaml(path) or {}, os.path.dirname(os.path.abspath(path)))


def _judge(rc: RunConfig) -> Judge | None:
    if not rc.judge:
        return None
    j = dict(rc.judge)
    j.setdefault("cache_dir", os.path.join(rc.output, "judge_cache"))
    return Judge(JudgeConfig.from_dict(j))


def run_dataset(model, mspec: dict, dspec: dict, rc: RunConfig, judge: Judge | None, progress: bool = True) -> dict:
    task = get_task(dspec["task"])
    opts = task.resolve_options(dspec.get("options"))
    mode = task.mode(opts)
    replay = isinstance(model, ReplayModel)
    loaded = task.load(dspec["data"], with_images=not replay)
    limit = dspec.get("limit", rc.limit)
    items = task.subset(loaded.items, limit)
    render = getattr(model, "render", None)
    template = getattr(model, "template", None) if callable(render) else \
        canonical(mspec.get("template") or getattr(model, "template", None) or "otter-image")
    decode = {**DEFAULT_DECODE.get(mspec["kind"], {}), **(mspec.get("decode") or {}), **(dspec.get("decode") or {})}

    folder = output_folder(rc, mspec["name"], dspec["name"])
    os.makedirs(folder, exist_ok=True)
    pred_path = os.path.join(folder, "predictions.jsonl")
    old = _resumable(pred_path) if rc.resume else {}
    model_id = _model_identity(mspec)
    todo = [it for it in items if task.skip(it, opts) is None]
    lines: dict[int, dict] = {}
    bar = Progress(len(todo), f"{mspec['name']}/{dspec['name']}") if progress else None
    with open(pred_path + ".tmp", "w", encoding="utf-8") as f:
        for it in todo:
            q = task.question(it, opts)
            prompt = render(q, it.n_images) if callable(render) else wrap(template, q, it.n_images)
            settings = {"scoring": "option_loglik_sum"} if mode == "likelihood" else decode
            prev = old.get(it.row)
            if (prev is not None and prev.get("prompt") == prompt and prev.get("decode") == settings
                    and prev.get("model_id") == model_id):
                line = prev  # resume: same model files, prompt and settings: reply kept
            else:
                line = {"row": it.row, "reply": None, "prompt": prompt, "decode": settings, "template": template,
                        "mode": mode, "n_images": it.n_images, "model_id": model_id}
                if replay:
                    got = model.lookup(dspec["name"], it.row)
                    if got is None:
                        raise ValueError(f"replay model {mspec['name']!r}: no reply for {dspec['name']} row {it.row}")
                    for k in ("reply", "logliks", "options", *(f"{x}_reply" for x in task.extra_questions(it, opts))):
                        if k in got:
                            line[k] = got[k]
                else:
                    images = it.images()
                    if mode == "likelihood":
                        letters, texts = task.loglik_options(it, opts)
                        conts = [continuation(template, t) for t in texts]
                        ll = [float(v) for v in model.option_logliks(prompt, images, conts)]
                        best = argmax_letter(letters, ll)
                        line.update(options=conts, logliks=ll, reply=best or "")
                    else:
                        line["reply"] = model.generate(prompt, images, **decode)
                        for name, q2 in task.extra_questions(it, opts).items():
                            p2 = render(q2, it.n_images) if callable(render) else wrap(template, q2, it.n_images)
                            line[f"{name}_prompt"] = p2
                            line[f"{name}_reply"] = model.generate(p2, images, **decode)
            write_line(f, line)
            lines[it.row] = line
            if bar:
                bar.update()
    os.replace(pred_path + ".tmp", pred_path)
    if bar:
        bar.close()

    result, samples = score_lines(dspec["task"], dspec["data"], lines, dspec.get("options"), judge, loaded)
    result.update(model=mspec["name"], dataset=dspec["name"], predictions=pred_path, template=template,
                  decode=None if mode == "likelihood" else decode, mode=mode, model_info=describe(model))
    if limit is not None:
        result["limit"] = limit
    write_jsonl(os.path.join(folder, "samples.jsonl"), samples)
    write_json(os.path.join(folder, "metrics.json"), result)
    return result


def run_config(rc: RunConfig | dict, models: dict[str, Any] | None = None, progress: bool = True) -> list[dict]:
    """Run every model on every dataset. `models` maps a config model name to an object implementing EvalModel
    (used instead of loading; required for kind `external`)."""
    if isinstance(rc, dict):
        rc = parse_config(rc)
    models = models or {}
    judge = _judge(rc)
    results = []
    for mspec in rc.models:
        if mspec["name"] in models:
            model = models[mspec["name"]]
        elif mspec["kind"] == "external":
            raise ConfigError(f"model {mspec['name']!r}: kind external but no object supplied")
        else:
            model = load_eval_model(mspec)
        for dspec in rc.datasets:
            results.append(run_dataset(model, mspec, dspec, rc, judge, progress))
    os.makedirs(rc.output, exist_ok=True)
    write_json(os.path.join(rc.output, "results.json"), results)
    with open(os.path.join(rc.output, "summary.md"), "w", encoding="utf-8") as f:
        f.write(markdown(results))
    return results


__all__ = ["ConfigError", "RunConfig", "load_config", "parse_config", "run_config", "run_dataset", "withheld"]


def _resumable(pred_path: str) -> dict[int, dict]:
    """Replies of an earlier run: its finished predictions file, then what an interrupted run had written to its
    `.tmp` (a torn last line, from a kill mid-write, is ignored)."""
    old = read_predictions(pred_path) if os.path.exists(pred_path) else {}
    tmp = pred_path + ".tmp"
    if os.path.exists(tmp):
        with open(tmp, encoding="utf-8") as f:
            for raw in f:
                try:
                    line = json.loads(raw)
                except ValueError:
                    break
                if isinstance(line, dict) and isinstance(line.get("row"), int):
                    old[line["row"]] = line
    return old


def _model_identity(mspec: dict) -> str:
    """What a kept reply must have been generated by: the model's kind, path and its files' newest mtime (a
    retrained checkpoint under the same name is a different model)."""
    path = mspec.get("path")
    stamp = 0.0
    if path and os.path.isdir(path):
        stamp = max((os.path.getmtime(os.path.join(path, n)) for n in os.listdir(path)), default=0.0)
    return f"{mspec.get('kind')}:{path or mspec.get('name')}:{stamp:.0f}"
