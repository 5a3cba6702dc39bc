"""A faithful baseline of Otter's (OpenFlamingo's) webdataset pretraining pipeline, for benchmarks only.

What it does, stage by stage as `get_laion_dataset` / `get_mmc4_dataset` build it (webdataset is not a
dependency: its stages are plain tar streaming, written out here with the same work per sample):
- shards split across DataLoader workers (`split_by_worker`), each tar read as a stream, members grouped by key
  (`tarfile_to_samples`), a shuffle buffer of 1,000 samples (`wds.shuffle`, Otter's `_SAMPLE_SHUFFLE_SIZE` /
  initial 500 fill);
- LAION: samples without caption or image dropped, `wds.decode("pilrgb")` (PIL open + RGB, on raw or base64
  `.png` members as Otter's converted shards need), batches of `batch_size`, then Otter's random horizontal flip
  (p 0.5) and the CLIP image processor per image (shortest side to 224 bicubic, centre crop, CLIP stats) and the captions tokenized as
  `<image>{caption}<|endofchunk|>{eos}`, max 32 tokens, padded to the longest;
- MMC4: per document: JSON parsed, every image base64-decoded, the 10 KB and `matched_sim` filters, PIL decode,
  CLIP processor, at most 5 images, padded to 5 with zero images, the text built and tokenized to 256 tokens padded
  to 256 (`padding="max_length"`); documents with no `<image>` left, or one with probability 0.5, dropped; batches
  of `batch_size`.
A torch DataLoader with `workers` processes runs it (Otter's `--workers`), `batch_size=None` (the dataset batches).
Each batch also carries `n_images` and `mp` (decoded source megapixels) for the benchmark's accounting.
"""

from __future__ import annotations

import base64
import io
import json
import random

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset

from . import images as imgs
from .shards import MAX_TOKENS, iter_samples, laion_text, mmc4_text

SHUFFLE = 1000
SHUFFLE_INITIAL = 500


def _decode_pil(data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception:  # Otter's converted shards: base64 text in a .png member
        img = Image.open(io.BytesIO(base64.b64decode(data)))
    return img.convert("RGB")


class OtterWdsDataset(IterableDataset):
    """An iterable over one kind of shard ("LAION" or "MMC4"), yielding Otter's padded batches."""

    def __init__(self, files: list[str], kind: str, tokenizer_dir: str, batch_size: int, epochs: int = 1000,
                 seed: int = 0, sim_threshold: float = 0.32):
        self.files, self.kind, self.tok_dir = list(files), kind, tokenizer_dir
        self.batch_size, self.epochs, self.seed, self.sim = batch_size, epochs, seed, sim_threshold

    def _samples(self, files):
        for f in files:
            for _key, members in iter_samples(f, lambda *a: None):
                yield members

    def _shuffled(self, it, rng):
        buf = []
        for x in it:
            buf.append(x)
            if len(buf) < SHUFFLE_INITIAL:
                continue
            if len(buf) >= SHUFFLE:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def __iter__(self):
        import torch
        from transformers import AutoTokenizer

        from . import prompts

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        tok = AutoTokenizer.from_pretrained(self.tok_dir, local_files_only=True)
        if tok.pad_token is None:
            tok.add_special_tokens({"pad_token": prompts.PAD})
        rng = random.Random(self.seed + wid)
        batch = []
        for epoch in range(self.epochs):
            files = self.files[wid::nw] if len(self.files) >= nw else self.files  # split_by_worker
            for members in self._shuffled(self._samples(files), rng):
                s = self._laion(members, rng) if self.kind == "LAION" else self._mmc4(members, tok, rng)
                if s is None:
                    continue
                batch.append(s)
                if len(batch) == self.batch_size:
                    yield self._collate(batch, tok)
                    batch = []

    def _laion(self, m, rng):
        ext = next((e for e in ("jpg", "png", "jpeg") if e in m), None)
        if ext is None or "txt" not in m:
            return None
        img = _decode_pil(m[ext].data)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return {"text": m["txt"].data.decode("utf-8"), "images": [img]}

    def _mmc4(self, m, tok, rng):
        info = json.loads(m["json"].data)
        sentences = info["text_list"]
        images, ixs = [], []
        for im in info["image_info"]:
            raw = base64.b64decode(im["image_base64"])
            if len(raw) // 1000 <= 10 or im["matched_sim"] < self.sim:
                continue
            images.append(Image.open(io.BytesIO(raw)).convert("RGB"))
            ixs.append(im["matched_text_index"])
        images, ixs = images[:5], ixs[:5]
        if not images:
            return None
        text = mmc4_text(sentences, ixs, tok.eos_token)
        enc = tok(text, max_length=MAX_TOKENS["MMC4"], truncation=True, padding="max_length")
        n = sum(1 for t in enc["input_ids"] if t == tok.convert_tokens_to_ids("<image>"))
        if n == 0 or (n == 1 and rng.random() <= 0.5):
            return None
        return {"ids": enc["input_ids"], "mask": enc["attention_mask"], "images": images}

    def _collate(self, batch, tok):
        mp = sum(i.width * i.height for s in batch for i in s["images"]) / 1e6
        n_images = sum(len(s["images"]) for s in batch)
        if self.kind == "LAION":
            enc = tok([laion_text(s["text"], tok.eos_token) for s in batch], max_length=MAX_TOKENS["LAION"],
                      truncation=True, padding="longest")
            ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])
            pixels = np.stack([imgs.clip_transform(s["images"][0]) for s in batch])[:, None, None]
        else:
            ids = np.asarray([s["ids"] for s in batch])
            mask = np.asarray([s["mask"] for s in batch])
            pixels = np.zeros((len(batch), 5, 1, 3, 224, 224), np.float32)  # padded to 5 images
            for b, s in enumerate(batch):
                for k, im in enumerate(s["images"]):
                    pixels[b, k, 0] = imgs.clip_transform(im)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "n_images": n_images, "mp": mp,
                "n_samples": len(batch)}


def otter_wds_dataloader(files: list[str], kind: str, tokenizer_dir: str, workers: int, batch_size: int):
    import torch

    return torch.utils.data.DataLoader(OtterWdsDataset(files, kind, tokenizer_dir, batch_size), batch_size=None,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       prefetch_factor=2 if workers > 0 else None)
