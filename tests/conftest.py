"""Shared fixtures: a small demo dataset (built once per session) and helpers to write MIMIC-IT files."""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> str:
    from otterfast.data.demo import build_demo

    out = str(tmp_path_factory.mktemp("demo"))
    build_demo(out, seed=0, scale=0.15)
    return out


@pytest.fixture(scope="session")
def demo_tok_dir(demo_dir) -> str:
    return os.path.join(demo_dir, "tokenizer")


def _prepare_demo(demo_dir, tmp_path_factory, fmt: str, video_frames: int) -> str:
    from otterfast.data.prepare import PrepareOptions, prepare

    out = str(tmp_path_factory.mktemp(f"index_{fmt}"))
    prepare(os.path.join(demo_dir, "data.yaml"), os.path.join(demo_dir, "tokenizer"), out,
            PrepareOptions(format=fmt, video_frames=video_frames))
    return out


@pytest.fixture(scope="session")
def demo_index(demo_dir, tmp_path_factory) -> str:
    return _prepare_demo(demo_dir, tmp_path_factory, "simple", video_frames=4)


@pytest.fixture(scope="session")
def demo_index_fuyu(demo_dir, tmp_path_factory) -> str:
    return _prepare_demo(demo_dir, tmp_path_factory, "fuyu", video_frames=3)


def encode_image(w: int, h: int, fmt: str = "PNG", seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


class MiniDataset:
    """Writes a tiny MIMIC-IT dataset by hand: instruction JSONs, image tables and a YAML."""

    def __init__(self, root):
        self.root = str(root)
        self.groups: dict[str, dict[str, dict]] = {}

    def instructions(self, name: str, data: dict) -> str:
        path = os.path.join(self.root, f"{name}_instructions.json")
        with open(path, "w") as f:
            json.dump({"meta": {"version": "test"}, "data": data}, f)
        return os.path.basename(path)

    def parquet_b64(self, name: str, images: dict[str, bytes], urlsafe: bool = False) -> str:
        import pandas as pd

        enc = base64.urlsafe_b64encode if urlsafe else base64.b64encode
        df = pd.DataFrame({"base64": [enc(b).decode() for b in images.values()]}, index=pd.Index(list(images)))
        path = os.path.join(self.root, f"{name}.parquet")
        df.to_parquet(path)
        return os.path.basename(path)

    def dataset(self, group: str, name: str, **fields) -> None:
        self.groups.setdefault(group, {})[name] = fields

    def yaml(self) -> str:
        import yaml

        path = os.path.join(self.root, "data.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(self.groups, f)
        return path


@pytest.fixture
def mini(tmp_path) -> MiniDataset:
    return MiniDataset(tmp_path)
