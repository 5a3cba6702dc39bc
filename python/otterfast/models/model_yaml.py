"""A model YAML's dataclass from a dict: unknown keys and the wrong architecture are errors naming the valid ones."""

from __future__ import annotations

import os
from dataclasses import fields

import yaml


class ModelYaml:
    """`Config.load(path)`: a model YAML file through the dataclass's own `from_dict` checks."""

    @classmethod
    def load(cls, path: str):
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {}, path)


def from_yaml_dict(cls, doc: dict, where: str, architecture: str):
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(doc) - valid)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {sorted(valid)}")
    cfg = cls(**doc)
    if cfg.architecture != architecture:
        raise ValueError(f"{where}: architecture {cfg.architecture!r} is not {architecture}")
    return cfg


def local_checkpoint(path: str, what: str) -> str:
    """`path` when it is a folder; else the error every builder gives (nothing is ever downloaded)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} checkpoint folder not found: {path} (a local copy is needed)")
    return path
