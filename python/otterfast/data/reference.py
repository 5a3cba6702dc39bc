"""The reference loader: the prepared index -> model-ready batches, in plain Python (PIL + numpy).

It is the obviously-correct oracle for the native loader (same index, same plan, same outputs) and a
baseline for benchmarks. A batch is a dict of numpy arrays (`loader.as_torch` wraps them without a copy). Rows
hold one sample (pack=False, padded to the longest row) or several (pack=True, padded to `capacity`):

    input_ids       (B, T) int64   pad id after the row's samples
    labels          (B, T) int64   -100 on pads, unlabelled and image tokens
    attention_mask  (B, T) int64   1 on sample tokens
    position_ids    (B, T) int64   restart at 0 for every sample; 0 on pads
    segment_ids     (B, T) int32   0, 1, ... = which sample of the row; -1 on pads
    cu_seqlens      (S+1,) int32   boundaries over the flattened B*T tokens: every sample, and every row's pad
                                   tail as a segment of its own (varlen attention can run on the flat batch)
    sample_index    (N,)   int64   index rows of the batch's samples, in layout order
Otter formats (simple, llama2, idefics):
    pixel_values    (F, 3, S, S) float32   every frame of every media, in layout order
    media_row, media_pos, media_frames (M,) int64   per media: its row, its <image> position, its frame count
fuyu:
    image_patches   (P, 2700) float32      every patch, in layout order
    image_patches_indices (B, T) int64     the image_patches row of each placeholder token; -1 elsewhere
and `sample_id`, `group` (lists, per sample), `skipped` (samples left out by on_error="skip").
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from . import images as imgs
from .batching import EpochPlanner, LoaderConfig, plan_rows, shard_batches
from .defects import DataError
from .index import PreparedIndex, Sample
from .sources import BlobReader
from .tokenizer import labels_from_spans


class ReferenceLoader:
    def __init__(self, index: PreparedIndex | str, config: LoaderConfig | None = None, **overrides):
        self.index = index if isinstance(index, PreparedIndex) else PreparedIndex(index)
        self.index.check_image_files()  # the tables are the ones indexed (stat only), else DataError
        self.cfg = LoaderConfig.make(config, **overrides)
        self.capacity = self.cfg.capacity or self.index.max_seq_len
        self.epoch = 0
        self.blobs = BlobReader(self.index.sources)
        self.tok = self.index.tok
        self.is_fuyu = self.index.format == "fuyu"
        opts = self.index.meta["options"]
        self.fuyu_max = (opts["fuyu_max_height"], opts["fuyu_max_width"])
        self.max_pixels = int(opts.get("max_image_pixels", imgs.DEFAULT_MAX_IMAGE_PIXELS))
        self.dropped_batches = 0
        c, self._lengths = self.cfg, self.index.num_tokens().tolist()
        self.planner = EpochPlanner(self._rows_of, self._order_of, self._lengths, self.capacity,
                                    c.pack and c.carry_last_row, c.last_epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> list[list[list[int]]]:
        """This rank's batches for the current epoch: batches of rows of index sample rows."""
        c = self.cfg
        batches = self.planner.batches(self.epoch, c.batch_size, c.shuffle_batches, c.seed)
        mine, self.dropped_batches = shard_batches(batches, c.rank, c.world_size, c.even_batches)
        return mine

    def _order_of(self, epoch: int) -> list[int]:
        return self.index.epoch_order(self.cfg.seed, epoch)

    def _rows_of(self, order: list[int]) -> list[list[int]]:
        c = self.cfg
        return plan_rows(self._lengths, order, self.capacity, c.window) if c.pack else [[s] for s in order]

    def __len__(self) -> int:
        return len(self.plan())

    def __iter__(self) -> Iterator[dict]:
        self.index.check_image_files()  # again each epoch: a table rewritten during a long run is refused too
        for rows in self.plan():
            yield self.collate_rows(rows)

    # ---- pixels ------------------------------------------------------------------------------------

    def load_image(self, image_row: int, draft: int | None = None):
        """Decode one image row (its header size checked first, images.check_size); DataError naming it."""
        source, ref = self.index.image_ref(image_row)
        try:
            blob = self.blobs.read(source, ref)
            if blob is None:
                raise ValueError("null image bytes")
            if self.index.sources[source].encoding == "base64":
                blob = imgs.b64decode(blob)
            return imgs.decode_rgb(blob, draft, self.max_pixels)
        except Exception as e:  # PIL raises many types for bad bytes
            raise self._image_error(image_row, e) from None

    def _image_error(self, image_row: int, e: Exception) -> DataError:
        source, ref = self.index.image_ref(image_row)
        info = self.index.image(image_row)
        src = self.index.sources[source]
        return DataError(f"{src.files[ref.file]}: image id {info['image_id']!r}: cannot decode: {e}")

    def fuyu_patches(self, image_row: int):
        img = self.load_image(image_row)
        try:
            return imgs.fuyu_patches(img, *self.fuyu_max)
        except imgs.ImageSizeError as e:
            raise self._image_error(image_row, e) from None

    # ---- layout ------------------------------------------------------------------------------------

    def sample_sequence(self, s: Sample) -> dict:
        """One sample's tokens, labels and media, with Fuyu image tokens inserted where they belong."""
        labels = labels_from_spans(s.input_ids, s.label_spans)
        if not self.is_fuyu:
            frames = [[self.pixels(r) for r in media] for media in s.media_images]
            return {"ids": list(s.input_ids), "labels": labels, "media_pos": list(s.media_pos), "frames": frames}
        ph, nl = self.tok["fuyu_placeholder_id"], self.tok["fuyu_newline_id"]
        inserts: dict[int, list[int]] = {}
        for pos, media in zip(s.media_pos, s.media_images):
            inserts.setdefault(pos, []).extend(media)
        ids: list[int] = []
        lab: list[int] = []
        pidx: list[int] = []
        patches: list[np.ndarray] = []
        n_patches = 0
        for t in range(len(s.input_ids) + 1):
            for row in inserts.get(t, []):
                p, rows, cols = self.fuyu_patches(row)
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
        return {"ids": ids, "labels": lab, "patch_idx": pidx, "patches": patches}

    def pixels(self, image_row: int) -> np.ndarray:
        draft = self.cfg.image_size if self.cfg.jpeg_draft else None
        img = self.load_image(image_row, draft)
        if self.cfg.image_transform == "otter":
            return imgs.otter_transform(img, self.cfg.image_size)
        try:
            return imgs.clip_transform(img, self.cfg.image_size, self.max_pixels)
        except imgs.ImageSizeError as e:
            raise self._image_error(image_row, e) from None

    def collate(self, samples: list[Sample]) -> dict:
        """One sample per row, padded to the longest (what `pack=False` yields)."""
        return self._assemble([[s] for s in samples], None)

    def collate_rows(self, rows: list[list[int]]) -> dict:
        return self._assemble([[self.index.sample(r) for r in row] for row in rows],
                              self.capacity if self.cfg.pack else None)

    def _assemble(self, rows: list[list[Sample]], width: int | None) -> dict:
        seqs: list[list[tuple[Sample, dict]]] = []
        skipped = 0
        for row in rows:
            kept = []
            for s in row:
                try:
                    kept.append((s, self.sample_sequence(s)))
                except DataError:
                    if self.cfg.on_error == "raise":
                        raise
                    skipped += 1
            seqs.append(kept)
        B = len(rows)
        T = width or max([sum(len(q["ids"]) for _, q in row) for row in seqs] + [1])
        ids = np.full((B, T), self.tok["pad_id"], dtype=np.int64)
        lab = np.full((B, T), -100, dtype=np.int64)
        att = np.zeros((B, T), dtype=np.int64)
        pos = np.zeros((B, T), dtype=np.int64)
        seg = np.full((B, T), -1, dtype=np.int32)
        cu = [0]
        out: dict = {"sample_index": [], "sample_id": [], "group": []}
        frames, media_row, media_pos, media_frames = [], [], [], []
        patches, pidx = [], np.full((B, T), -1, dtype=np.int64)
        n_patches = 0
        for b, row in enumerate(seqs):
            off = 0
            for k, (s, q) in enumerate(row):
                n = len(q["ids"])
                if off + n > T:
                    raise AssertionError("row overflow: the plan and the lengths disagree")
                ids[b, off : off + n] = q["ids"]
                lab[b, off : off + n] = q["labels"]
                att[b, off : off + n] = 1
                pos[b, off : off + n] = np.arange(n)
                seg[b, off : off + n] = k
                cu.append(b * T + off + n)
                out["sample_index"].append(s.row)
                out["sample_id"].append(s.sample_id)
                out["group"].append(s.group)
                if self.is_fuyu:
                    pidx[b, off : off + n] = [i + n_patches if i >= 0 else -1 for i in q["patch_idx"]]
                    patches += q["patches"]
                    n_patches += sum(len(p) for p in q["patches"])
                else:
                    for p, fr in zip(q["media_pos"], q["frames"]):
                        media_row.append(b)
                        media_pos.append(off + p)
                        media_frames.append(len(fr))
                        frames += fr
                off += n
            if off < T:
                cu.append((b + 1) * T)  # the pad tail, a segment of its own
        out.update(input_ids=ids, labels=lab, attention_mask=att, position_ids=pos, segment_ids=seg,
                   cu_seqlens=np.asarray(cu, dtype=np.int32),
                   sample_index=np.asarray(out["sample_index"], dtype=np.int64), skipped=skipped)
        if self.is_fuyu:
            dim = imgs.FUYU_PATCH * imgs.FUYU_PATCH * 3
            out["image_patches"] = np.concatenate(patches) if patches else np.zeros((0, dim), np.float32)
            out["image_patches_indices"] = pidx
        else:
            S = self.cfg.image_size
            out["pixel_values"] = np.stack(frames) if frames else np.zeros((0, 3, S, S), np.float32)
            out["media_row"] = np.asarray(media_row, dtype=np.int64)
            out["media_pos"] = np.asarray(media_pos, dtype=np.int64)
            out["media_frames"] = np.asarray(media_frames, dtype=np.int64)
        return out


def dense_media(batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """Otter's model layout from the flat one: (B, M, F, 3, S, S) zero-padded, and (B, M) frame counts."""
    B = batch["input_ids"].shape[0]
    rows, counts = batch["media_row"], batch["media_frames"]
    per_row = np.bincount(rows, minlength=B) if len(rows) else np.zeros(B, np.int64)
    M, F = int(per_row.max(initial=0)), int(counts.max(initial=0))
    S = batch["pixel_values"].shape[-1] if batch["pixel_values"].ndim == 4 else 224
    out = np.zeros((B, M, F, 3, S, S), dtype=np.float32)
    frames = np.zeros((B, M), dtype=np.int64)
    slot = np.zeros(B, dtype=np.int64)
    start = 0
    for r, n in zip(rows.tolist(), counts.tolist()):
        m = slot[r]
        out[r, m, :n] = batch["pixel_values"][start : start + n]
        frames[r, m] = n
        slot[r] += 1
        start += n
    return out, frames
