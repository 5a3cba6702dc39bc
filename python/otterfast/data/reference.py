"""The reference loader: the prepared index -> model-ready, pad-to-longest batches, in plain Python.

It is the obviously-correct oracle for the native loader (same index, same order, same outputs) and
the baseline for benchmarks. Batches are dicts of numpy arrays (`as_torch` turns them into tensors):

Otter formats (simple, llama2, idefics):
    input_ids (B, T) int64, right-padded with the pad id; attention_mask (B, T); labels (B, T), -100 on
    pads and unlabelled tokens; pixel_values (B, M, F, 3, S, S) float32 where M is the most media of a
    sample in the batch and F the most frames of a media (zeros where absent); media_frames (B, M) int64:
    frames of each media (0 = no media in that slot).
fuyu:
    input_ids (B, T) with every image's placeholder + newline tokens inserted at its media position;
    labels -100 on image tokens; image_patches (N, 2700) float32, all the batch's patches in order;
    image_patches_indices (B, T) int64: the row of image_patches a placeholder takes, -1 elsewhere.
Both: position_ids (B, T), sample_id, group (lists).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from . import images as imgs
from .index import PreparedIndex, Sample
from .sources import BlobReader
from .tokenizer import labels_from_spans


@dataclass
class ReferenceLoaderConfig:
    batch_size: int = 8
    seed: int = 0
    image_transform: str = "otter"  # "otter" (training: square resize) or "clip" (resize + centre crop)
    image_size: int = imgs.OTTER_SIZE
    rank: int = 0
    world_size: int = 1
    drop_last: bool = False


class ReferenceLoader:
    def __init__(self, index: PreparedIndex | str, config: ReferenceLoaderConfig | None = None, **overrides):
        self.index = index if isinstance(index, PreparedIndex) else PreparedIndex(index)
        cfg = config or ReferenceLoaderConfig()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise TypeError(f"unknown option {k!r}")
            setattr(cfg, k, v)
        if cfg.image_transform not in imgs.IMAGE_TRANSFORMS:
            raise ValueError(f"image_transform must be one of {list(imgs.IMAGE_TRANSFORMS)}")
        self.cfg = cfg
        self.epoch = 0
        self.blobs = BlobReader(self.index.sources)
        self.tok = self.index.tok
        self.is_fuyu = self.index.format == "fuyu"
        opts = self.index.meta["options"]
        self.fuyu_max = (opts["fuyu_max_height"], opts["fuyu_max_width"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        c = self.cfg
        return self.index.epoch_order(c.seed, self.epoch, c.rank, c.world_size)

    def __len__(self) -> int:
        n = len(self.order())
        return n // self.cfg.batch_size if self.cfg.drop_last else -(-n // self.cfg.batch_size)

    def __iter__(self) -> Iterator[dict]:
        order = self.order()
        bs = self.cfg.batch_size
        for i in range(0, len(order), bs):
            rows = order[i : i + bs]
            if len(rows) < bs and self.cfg.drop_last:
                break
            yield self.collate([self.index.sample(r) for r in rows])

    # ---- pixels ------------------------------------------------------------------------------------

    def load_image(self, image_row: int):
        source, ref = self.index.image_ref(image_row)
        blob = self.blobs.read(source, ref)
        if blob is None:
            raise ValueError(f"image row {image_row}: null bytes")
        if self.index.sources[source].encoding == "base64":
            blob = imgs.b64decode(blob)
        return imgs.decode_rgb(blob)

    # ---- collate -----------------------------------------------------------------------------------

    def collate(self, samples: list[Sample]) -> dict:
        return self._collate_fuyu(samples) if self.is_fuyu else self._collate_otter(samples)

    def _pad_text(self, seqs: list[list[int]], labels: list[list[int]]) -> dict:
        B, T = len(seqs), max(len(s) for s in seqs)
        ids = np.full((B, T), self.tok["pad_id"], dtype=np.int64)
        lab = np.full((B, T), -100, dtype=np.int64)
        att = np.zeros((B, T), dtype=np.int64)
        pos = np.zeros((B, T), dtype=np.int64)
        for b, (s, l) in enumerate(zip(seqs, labels)):
            ids[b, : len(s)] = s
            lab[b, : len(l)] = l
            att[b, : len(s)] = 1
            pos[b, : len(s)] = np.arange(len(s))
        return {"input_ids": ids, "labels": lab, "attention_mask": att, "position_ids": pos}

    def _collate_otter(self, samples: list[Sample]) -> dict:
        out = self._pad_text([s.input_ids for s in samples],
                             [labels_from_spans(s.input_ids, s.label_spans) for s in samples])
        M = max([len(s.media_images) for s in samples] + [0])
        F = max([len(m) for s in samples for m in s.media_images] + [0])
        S = self.cfg.image_size
        pix = np.zeros((len(samples), M, F, 3, S, S), dtype=np.float32)
        frames = np.zeros((len(samples), M), dtype=np.int64)
        tf = imgs.IMAGE_TRANSFORMS[self.cfg.image_transform]
        for b, s in enumerate(samples):
            for m, media in enumerate(s.media_images):
                frames[b, m] = len(media)
                for f, row in enumerate(media):
                    pix[b, m, f] = tf(self.load_image(row), S)
        out.update(pixel_values=pix, media_frames=frames,
                   sample_id=[s.sample_id for s in samples], group=[s.group for s in samples])
        return out

    def fuyu_sequence(self, s: Sample) -> tuple[list[int], list[int], list[int], list[np.ndarray]]:
        """One sample's ids, labels and patch indices (local to the sample) with image tokens inserted."""
        ph, nl = self.tok["fuyu_placeholder_id"], self.tok["fuyu_newline_id"]
        labels = labels_from_spans(s.input_ids, s.label_spans)
        inserts: dict[int, list] = {}
        for pos, media in zip(s.media_pos, s.media_images):
            inserts.setdefault(pos, []).extend(media)
        ids: list[int] = []
        lab: list[int] = []
        pidx: list[int] = []
        patches: list[np.ndarray] = []
        n_patches = 0
        for t in range(len(s.input_ids) + 1):
            for row in inserts.get(t, []):
                p, rows, cols = imgs.fuyu_patches(self.load_image(row), *self.fuyu_max)
                tid, tidx = imgs.fuyu_image_tokens(rows, cols, ph, nl)
                ids += tid.tolist()
                lab += [-100] * len(tid)
                pidx += [i + n_patches if i >= 0 else -1 for i in tidx.tolist()]
                patches.append(p)
                n_patches += len(p)
            if t < len(s.input_ids):
                ids.append(s.input_ids[t])
                lab.append(labels[t])
                pidx.append(-1)
        return ids, lab, pidx, patches

    def _collate_fuyu(self, samples: list[Sample]) -> dict:
        seqs, labs, idxs, all_patches = [], [], [], []
        offset = 0
        for s in samples:
            ids, lab, pidx, patches = self.fuyu_sequence(s)
            seqs.append(ids)
            labs.append(lab)
            idxs.append([i + offset if i >= 0 else -1 for i in pidx])
            n = sum(len(p) for p in patches)
            all_patches += patches
            offset += n
        out = self._pad_text(seqs, labs)
        T = out["input_ids"].shape[1]
        pi = np.full((len(samples), T), -1, dtype=np.int64)
        for b, x in enumerate(idxs):
            pi[b, : len(x)] = x
        patch_dim = imgs.FUYU_PATCH * imgs.FUYU_PATCH * 3
        out.update(
            image_patches=np.concatenate(all_patches) if all_patches else np.zeros((0, patch_dim), np.float32),
            image_patches_indices=pi,
            sample_id=[s.sample_id for s in samples],
            group=[s.group for s in samples],
        )
        return out


def as_torch(batch: dict) -> dict:
    """numpy arrays -> torch tensors without copying (torch.from_numpy); other values unchanged."""
    import torch

    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
