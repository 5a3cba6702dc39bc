"""MIMIC-IT as Otter writes it: the dataset YAML, instruction JSONs and train-config JSONs.

Decisions that differ from Otter (otter-reference section 8.2), each on purpose:
- `task_description` may be a string (one description) or a list; Otter's `random.choice` on a string
  picks a single character.
- An instruction id present in two different instruction files of one group is a defect
  (`duplicate_instruction_id`), not a silent `dict.update` overwrite.
- `num_samples` is applied per epoch by the index (a fresh draw each epoch, from the run's seed), not
  once with `random.seed(0)`; see `resample_keys`.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

import numpy as np
import yaml

from .defects import DataError, DefectReport

GROUPS = ("IMAGE_TEXT", "TEXT_ONLY", "IMAGE_TEXT_IN_CONTEXT", "VIDEO_TEXT")
IMAGE_GROUPS = ("IMAGE_TEXT", "IMAGE_TEXT_IN_CONTEXT", "VIDEO_TEXT")
DATASET_KEYS = ("mimicit_path", "images_path", "num_samples", "train_config_path", "task_description")


@dataclass
class DatasetSpec:
    """One dataset entry of the YAML, paths resolved against the YAML's folder."""

    name: str
    group: str
    mimicit_path: str
    images_path: str | None = None
    num_samples: int = 0  # -1 or 0: all; more: repeat + sample; fewer: sample
    train_config_path: str | None = None
    task_descriptions: list[str] = field(default_factory=list)


@dataclass
class Record:
    id: str
    instruction: str | None
    answer: str | None
    image_ids: list[str]
    rel_ins_ids: list[str]
    path: str  # the instruction file it came from


def _resolve(base: str, p: str) -> str:
    p = os.path.expanduser(str(p))
    return os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))


def load_data_yaml(path: str) -> list[DatasetSpec]:
    """The MIMIC-IT datasets of a dataset YAML (its MMC4 / LAION shard groups checked too: `load_data_yaml_all`).
    Structural errors raise DataError naming the file and the key."""
    return load_data_yaml_all(path)[0]


def load_data_yaml_all(path: str):
    """Read a dataset YAML: (MIMIC-IT DatasetSpecs, pretraining shards.ShardSpecs). Structural errors raise
    DataError naming the file and the key."""
    from .shards import SHARD_GROUPS, parse_shard_group

    path = os.path.abspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: dataset YAML not found") from None
    except yaml.YAMLError as e:
        raise DataError(f"{path}: malformed YAML: {e}") from None
    if not isinstance(doc, dict) or not doc:
        raise DataError(f"{path}: expected a mapping of groups ({', '.join(GROUPS + SHARD_GROUPS)}) at the top level")
    base = os.path.dirname(path)
    specs: list[DatasetSpec] = []
    shard_specs = []
    for group, datasets in doc.items():
        if group in SHARD_GROUPS:
            shard_specs += parse_shard_group(path, base, group, datasets)
            continue
        if group not in GROUPS:
            raise DataError(f"{path}: unknown group {group!r}; valid groups: {', '.join(GROUPS + SHARD_GROUPS)}")
        if datasets is None:
            continue
        if not isinstance(datasets, dict):
            raise DataError(f"{path}: group {group}: expected a mapping of dataset name -> fields")
        for name, fields in datasets.items():
            where = f"{path}: {group}.{name}"
            if not isinstance(fields, dict):
                raise DataError(f"{where}: expected a mapping of fields")
            unknown = sorted(set(fields) - set(DATASET_KEYS))
            if unknown:
                raise DataError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(DATASET_KEYS)}")
            if "mimicit_path" not in fields:
                raise DataError(f"{where}: `mimicit_path` is required")
            spec = DatasetSpec(name=str(name), group=group, mimicit_path=_resolve(base, fields["mimicit_path"]))
            if fields.get("images_path"):
                spec.images_path = _resolve(base, fields["images_path"])
            elif group in IMAGE_GROUPS:
                raise DataError(f"{where}: `images_path` is required in group {group}")
            if fields.get("train_config_path"):
                spec.train_config_path = _resolve(base, fields["train_config_path"])
            n = fields.get("num_samples", 0)
            if n is None:
                n = 0
            if isinstance(n, bool) or not isinstance(n, int) or n < -1:
                raise DataError(f"{where}: `num_samples` must be an integer >= -1, got {n!r}")
            spec.num_samples = n
            td = fields.get("task_description")
            if isinstance(td, str):
                spec.task_descriptions = [td]
            elif isinstance(td, list) and all(isinstance(t, str) for t in td):
                spec.task_descriptions = list(td)
            elif td is not None:
                raise DataError(f"{where}: `task_description` must be a string or a list of strings")
            for key in ("mimicit_path", "images_path", "train_config_path"):
                p = getattr(spec, key)
                if p is not None and not os.path.exists(p):
                    raise DataError(f"{where}: `{key}` does not exist: {p}")
            specs.append(spec)
    if not specs and not shard_specs:
        raise DataError(f"{path}: no datasets listed")
    return specs, shard_specs


def _load_json(path: str) -> object:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from None


def _str_list(v: object) -> list[str] | None:
    if v is None:
        return []
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    return None


def load_instructions(path: str) -> dict[str, Record]:
    """Read one `*_instructions.json`: `{"meta": ..., "data": {id: {instruction, answer, image_ids, rel_ins_ids}}}`.

    Missing `instruction`/`answer` are kept as None here and reported by the caller (a record-level
    defect); a file that is not of this shape raises.
    """
    doc = _load_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        raise DataError(f"{path}: expected {{'meta': ..., 'data': {{id: record}}}} at the top level")
    out: dict[str, Record] = {}
    for rid, rec in doc["data"].items():
        if not isinstance(rec, dict):
            raise DataError(f"{path}: id {rid!r}: record is not an object")
        image_ids = _str_list(rec.get("image_ids"))
        rel = _str_list(rec.get("rel_ins_ids"))
        if image_ids is None or rel is None:
            raise DataError(f"{path}: id {rid!r}: `image_ids` and `rel_ins_ids` must be lists of strings")
        ins, ans = rec.get("instruction"), rec.get("answer")
        out[rid] = Record(
            id=rid,
            instruction=ins if isinstance(ins, str) and ins.strip() else None,
            answer=ans if isinstance(ans, str) and ans.strip() else None,
            image_ids=image_ids,
            rel_ins_ids=rel,
            path=path,
        )
    return out


def load_train_config(path: str) -> dict[str, list[str]]:
    """Read a `*_train.json`: query id -> ordered context ids. Only its keys become training samples."""
    doc = _load_json(path)
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected {{query_id: [context ids]}}")
    out: dict[str, list[str]] = {}
    for k, v in doc.items():
        lst = _str_list(v)
        if lst is None:
            raise DataError(f"{path}: id {k!r}: expected a list of instruction ids")
        out[k] = lst
    return out


def merge_group_instructions(
    specs: list[DatasetSpec], report: DefectReport
) -> tuple[dict[str, Record], set[str]]:
    """Merge the instruction files of one group (Otter merges per group, so context ids may cross files).

    A file listed by two datasets is read once. An id present in two different files is a
    `duplicate_instruction_id` defect; the returned set holds those ids (samples using them are skipped).
    """
    merged: dict[str, Record] = {}
    dupes: set[str] = set()
    seen_paths: set[str] = set()
    for spec in specs:
        if spec.mimicit_path in seen_paths:
            continue
        seen_paths.add(spec.mimicit_path)
        for rid, rec in load_instructions(spec.mimicit_path).items():
            if rid in merged:
                report.add(
                    "duplicate_instruction_id", rec.path, rid,
                    f"also defined in {merged[rid].path}; ids must be unique within a group",
                )
                dupes.add(rid)
                continue
            merged[rid] = rec
    return merged, dupes


def resample_keys(keys: list[str], num_samples: int, rng: random.Random) -> list[str]:
    """Otter's `resample_data` rule, drawn from `rng` (the index seeds it per epoch).

    -1/0 or len: all keys; more: every key N // len times plus N % len drawn with replacement;
    fewer: N drawn without replacement.
    """
    n = len(keys)
    if num_samples in (-1, 0) or num_samples == n or n == 0:
        return list(keys)
    if num_samples > n:
        return list(keys) * (num_samples // n) + rng.choices(keys, k=num_samples % n)
    return rng.sample(keys, num_samples)


def resample_frames(frame_ids: list[str], k: int) -> list[str]:
    """Otter's uniform frame sampling: `np.linspace(0, len-1, k, dtype=int)` (repeats when len < k)."""
    if not frame_ids or k <= 0:
        return list(frame_ids)
    idx = np.linspace(0, len(frame_ids) - 1, k, dtype=int)
    return [frame_ids[i] for i in idx]
