"""A faithful baseline of Otter's own data path, for benchmarks only (otter-reference 1.3, 2.3-2.5).

What it does, as Otter's `MimicitDataset` does: read every image table whole into pandas (`iter_batches(1000)`
-> `to_pandas()` -> `pd.concat`, keyed by id) before the first batch; per sample, tokenize its text, and for
each image `Image.open(BytesIO(base64.urlsafe_b64decode(df.loc[id]["base64"]))).convert("RGB")`, then
`Resize((224, 224), BICUBIC)`, `ToTensor`, `Normalize(FLAMINGO stats)`; collate pads to the longest.
It walks the prepared index's samples (so every backend sees the same samples and text) but none of the
index's image references: images come from the in-RAM tables, as in Otter.

`OtterStyleDataset` + `otter_dataloader` run it as Otter's trainer does: a map-style dataset in a torch
DataLoader with worker processes (Otter's `--workers`), the tables read before the fork, collate padding to the
longest. `OtterStyleLoader` alone is the same work in one process (0 workers).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from PIL import Image

from . import images as imgs
from .index import PreparedIndex


class OtterStyleLoader:
    def __init__(self, index: PreparedIndex | str, batch_size: int = 8, seed: int = 0):
        import pandas as pd
        import pyarrow.parquet as pq

        self.index = index if isinstance(index, PreparedIndex) else PreparedIndex(index)
        self.batch_size = batch_size
        self.seed = seed
        self.tokenizer = self.index.tokenizer()
        frames = []
        for src in self.index.sources:
            if src.kind == "json":
                with open(src.files[0]) as f:
                    d = json.load(f)
                frames.append(pd.DataFrame({"base64": list(d.values())}, index=list(d.keys())))
                continue
            for path in src.files:
                pf = pq.ParquetFile(path)
                df = pd.concat([b.to_pandas() for b in pf.iter_batches(batch_size=1000)])
                if src.id_column in df.columns:  # an `id` column instead of a pandas index
                    df = df.set_index(src.id_column)
                if src.image_column != "base64":  # raw bytes: Otter only reads base64; encode to match its path
                    df = pd.DataFrame({"base64": [base64.b64encode(v).decode() for v in df[src.image_column]]},
                                      index=df.index)
                frames.append(df[["base64"]])
        self.df = pd.concat(frames) if frames else None
        self.image_ids = self.index.images.column("image_id").to_pylist()

    def load(self, image_row: int) -> np.ndarray:
        b64 = self.df.loc[self.image_ids[image_row]]["base64"]
        img = Image.open(io.BytesIO(base64.urlsafe_b64decode(b64))).convert("RGB")
        return imgs.otter_transform(img)

    def __iter__(self):
        order = self.index.epoch_order(self.seed, 0)
        for i in range(0, len(order), self.batch_size):
            rows = order[i : i + self.batch_size]
            ids, pixels = [], []
            for r in rows:
                s = self.index.sample(r)
                enc = self.tokenizer(s.text, add_special_tokens=False)["input_ids"]
                ids.append([self.index.tok["bos_id"] or 0] + enc + [self.index.tok["eos_id"]])
                pixels.append([[self.load(img) for img in media] for media in s.media_images])
            T = max(len(x) for x in ids)
            out = np.full((len(ids), T), self.index.tok["pad_id"], dtype=np.int64)
            mask = np.zeros_like(out)
            for b, x in enumerate(ids):
                out[b, : len(x)] = x
                mask[b, : len(x)] = 1
            yield {"input_ids": out, "attention_mask": mask, "pixels": pixels, "sample_index": np.asarray(rows)}


class OtterStyleDataset:
    """Map-style, one sample per item, as Otter's MimicitDataset: the text tokenized again per sample; pixels
    decoded by the collate in the worker (Otter: pandas tables + base64 + PIL + square bicubic resize; OtterHD:
    the reference loader's Fuyu patches, as there is no Otter-style Fuyu path here)."""

    def __init__(self, index: PreparedIndex | str):
        from .reference import ReferenceLoader

        self.index = index if isinstance(index, PreparedIndex) else PreparedIndex(index)
        self.ref = ReferenceLoader(self.index, batch_size=1, pack=False, seed=0)
        self.tokenizer = self.index.tokenizer()
        if self.index.format != "fuyu":
            self.otter = OtterStyleLoader(self.index, seed=0)  # every image table read whole, before the fork
            self.ref.pixels = self.otter.load  # Otter's decode + square bicubic resize + normalise

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, row: int) -> int:
        self.tokenizer(self.index.sample(row).text, add_special_tokens=False)  # Otter tokenizes at every step
        return row

    def collate(self, rows: list[int]) -> dict:
        return self.ref.collate_rows([[r] for r in rows])


def otter_dataloader(index: PreparedIndex | str, workers: int, batch_size: int = 8, epochs: int = 1000,
                     seed: int = 0):
    """Otter's data path as its trainer runs it: a torch DataLoader over `OtterStyleDataset` with `workers`
    worker processes (0: in this process), batches of `batch_size` samples padded to the longest, the index's
    epoch orders one after another (`epochs` of them)."""
    import torch

    ds = OtterStyleDataset(index)
    order = [r for e in range(epochs) for r in ds.index.epoch_order(seed, e)]
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=order, num_workers=workers,
                                       collate_fn=ds.collate, persistent_workers=workers > 0,
                                       prefetch_factor=2 if workers > 0 else None)
