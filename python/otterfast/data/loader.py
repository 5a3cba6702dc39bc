"""The native loader's Python face: the prepared index in, model-ready batches out, decoded in Rust.

    loader = NativeLoader("IDX", batch_size=8, seed=0, pack=True)      # same options as ReferenceLoader
    for batch in loader:                                               # dict of numpy arrays
        batch = as_torch(batch)                                        # torch.from_numpy: no copy

Batches have exactly the reference loader's layout (reference.py): same plan, same tokens, labels,
positions and boundaries; pixels within a small tolerance (different JPEG decoder and resizer; see
tests/test_loader.py for the measured bound).

Threads: decoding runs on the loader's own Rust threads (`num_threads`, default all cores) with the GIL
released, `prefetch` batches ahead. Use it with `num_workers=0` (in a torch DataLoader, pass
`batch_size=None`); it needs no worker processes. Its threads are started by `iter()`, never at
construction, so a process forked before iterating starts its own.

State: `state_dict()` is {"epoch", "batches"}: the epoch and how many batches of it were yielded;
`load_state_dict` resumes at exactly the next batch (the plan is recomputed from the seed, nothing is
decoded for the skipped batches). Each `iter()` after a finished epoch moves to the next epoch.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
from torch.utils.data import IterableDataset

from .. import _native
from .batching import LoaderConfig, shard_batches, shuffle_batches
from .defects import DataError
from .index import PreparedIndex


def _offsets(col) -> np.ndarray:
    """Offsets of an Arrow list column (chunks combined) as int64."""
    return np.asarray(col.offsets.to_numpy(zero_copy_only=False), dtype=np.int64) - int(col.offsets[0].as_py())


def _values(col, dtype) -> np.ndarray:
    start, end = int(col.offsets[0].as_py()), int(col.offsets[-1].as_py())
    return np.asarray(col.values.slice(start, end - start).to_numpy(zero_copy_only=False), dtype=dtype)


class NativeLoader(IterableDataset):
    """An iterable of batches; also a torch IterableDataset (use DataLoader(loader, batch_size=None))."""

    def __init__(self, index: PreparedIndex | str, config: LoaderConfig | None = None, **overrides):
        self.index = index if isinstance(index, PreparedIndex) else PreparedIndex(index)
        self.cfg = LoaderConfig.make(config, **overrides)
        self.capacity = self.cfg.capacity or self.index.max_seq_len
        self.epoch = 0
        self._yielded = 0
        self._resume_at = 0
        self.dropped_batches = 0
        self.skipped = 0
        self._engine = None
        self._pid = None
        # Per-sample labels for the batch dicts, as plain lists (pyarrow scalar access per sample costs ~20 us).
        self._sample_ids = self.index.samples.column("sample_id").to_pylist()
        self._groups = self.index.samples.column("group").to_pylist()

    # ---- the engine ------------------------------------------------------------------------------

    def _make_engine(self):
        ix = self.index
        t = ix.samples

        def col(name):
            return t.column(name).combine_chunks()

        ids, spans, mpos, media = col("input_ids"), col("label_spans"), col("media_pos"), col("media_images")
        media_inner = media.values.slice(int(media.offsets[0].as_py()),
                                         int(media.offsets[-1].as_py()) - int(media.offsets[0].as_py()))
        im = ix.images
        src = [(s.kind == "json", list(s.files), s.image_column or "", s.encoding == "base64") for s in ix.sources]
        opts = ix.meta["options"]
        tok = ix.tok
        options = {
            "fuyu": ix.format == "fuyu", "pad_id": int(tok["pad_id"]),
            "placeholder_id": int(tok.get("fuyu_placeholder_id") or -1),
            "newline_id": int(tok.get("fuyu_newline_id") or -1),
            "fuyu_max_h": int(opts["fuyu_max_height"]), "fuyu_max_w": int(opts["fuyu_max_width"]),
            "clip": self.cfg.image_transform == "clip", "image_size": int(self.cfg.image_size),
            "pack": bool(self.cfg.pack), "capacity": int(self.capacity),
            "skip_errors": self.cfg.on_error == "skip", "num_threads": int(self.cfg.num_threads),
            "prefetch": int(self.cfg.prefetch), "blob_window": int(self.cfg.blob_window),
            "jpeg_draft": bool(self.cfg.jpeg_draft), "blob_window_bytes": int(self.cfg.blob_window_mb) << 20,
        }

        def icol(name, dtype):
            return np.ascontiguousarray(im.column(name).to_numpy(), dtype=dtype)

        arrays = {
            "tok_off": _offsets(ids), "tokens": _values(ids, np.int32),
            "span_off": _offsets(spans), "spans": _values(spans, np.int32),
            "mpos_off": _offsets(mpos), "mpos": _values(mpos, np.int32),
            "media_off": _offsets(media), "media_img_off": _offsets(media_inner),
            "media_imgs": _values(media_inner, np.int32),
            "img_source": icol("source", np.int32), "img_file": icol("file", np.int32),
            "img_rg": icol("row_group", np.int32), "img_row": icol("row", np.int32),
            "img_off": icol("byte_offset", np.int64), "img_len": icol("byte_length", np.int64),
            "img_w": icol("width", np.int32), "img_h": icol("height", np.int32), "img_bytes": self._stored_bytes(),
        }
        return _native.NativeLoader(arrays, t.column("dataset").to_pylist(), im.column("image_id").to_pylist(),
                                    src, options)

    def _stored_bytes(self) -> np.ndarray:
        """Each image's size as stored (base64 is 4/3 of the encoded bytes), for the byte-bounded read window."""
        im = self.index.images
        n = im.column("encoded_len").to_numpy().astype(np.int64)
        b64 = np.array([self.index.sources[s].encoding == "base64" for s in im.column("source").to_pylist()], bool)
        return np.where(b64, (n * 4 + 2) // 3, n).astype(np.int64)

    def _engine_here(self):
        # A fork after construction must not reuse the parent's engine (its threads do not exist here).
        if self._engine is None or self._pid != os.getpid():
            self._engine = self._make_engine()
            self._pid = os.getpid()
        return self._engine

    # ---- plan and iteration --------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_engine"] = None  # threads and Rust buffers do not travel; the copy builds its own
        state["_pid"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._resume_at = 0

    def plan(self, epoch: int | None = None) -> list[list[list[int]]]:
        """This rank's batches for `epoch` (default: the current one; rust/pack.rs; equal to
        batching.plan_batches). Token counts only: no pixels are read."""
        c = self.cfg
        epoch = self.epoch if epoch is None else epoch
        order = self.index.epoch_order(c.seed, epoch)
        lengths = self.index.num_tokens().astype(np.uint32).tolist()
        if not c.shuffle_batches:
            batches, self.dropped_batches = _native.plan_batches(
                lengths, order, c.batch_size, c.pack, self.capacity, c.window, c.rank, c.world_size, c.even_batches)
            return batches
        everything, _ = _native.plan_batches(lengths, order, c.batch_size, c.pack, self.capacity, c.window, 0, 1, False)
        mine, self.dropped_batches = shard_batches(shuffle_batches(everything, c.seed, epoch), c.rank,
                                                   c.world_size, c.even_batches)
        return mine

    def __len__(self) -> int:
        return len(self.plan())

    def __iter__(self) -> Iterator[dict]:
        batches = self.plan()
        start = self._resume_at
        self._resume_at = 0
        engine = self._engine_here()
        engine.start(batches[start:])
        self._yielded = start
        try:
            while True:
                try:
                    b = engine.next_batch()
                except ValueError as e:
                    raise DataError(str(e)) from None
                if b is None:
                    break
                self._yielded += 1
                self.skipped += b["skipped"]
                self._label(b)
                yield b
        finally:
            engine.stop()
        self.epoch += 1  # a finished epoch: the next iter() is the next epoch
        self._yielded = 0

    def collate_rows(self, rows: list[list[int]]) -> dict:
        """One batch of the given rows (lists of index sample rows), outside any epoch (inspect, tests)."""
        engine = self._engine_here()
        engine.start([rows])
        try:
            b = engine.next_batch()
        except ValueError as e:
            raise DataError(str(e)) from None
        finally:
            engine.stop()
        self._label(b)
        return b

    def _label(self, b: dict) -> None:
        rows = b["sample_index"].tolist()
        b["sample_id"] = [self._sample_ids[i] for i in rows]
        b["group"] = [self._groups[i] for i in rows]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self._yielded, "seed": self.cfg.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.cfg.seed) != self.cfg.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this loader has seed {self.cfg.seed}")
        self.epoch = int(state["epoch"])
        self._resume_at = int(state["batches"])
        self._yielded = self._resume_at
