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

Boundary: the index crosses to Rust as one `NativeIndex` (native_index.py) and the options as the `LoaderConfig`
itself, each read by a typed Rust struct (rust/index.rs, rust/config.rs). Rust checks the whole index when
the loader is built: an index that contradicts itself (an image reference outside the image table, offsets
or spans out of range, ...) raises DataError (a ValueError) naming the file and the sample, never a panic.

State: `state_dict()` is {"epoch", "batches"}: the epoch and how many batches of it were yielded;
`load_state_dict` resumes at exactly the next batch (the plan is recomputed from the seed, nothing is
decoded for the skipped batches). Each `iter()` after a finished epoch moves to the next epoch.

Pixel cache: with `otterfast data cache-pixels` run on the index, Otter / CLIP pixels are read from it instead
of being decoded (bit-identical batches; `pixel_cache` option, data/pixel_cache.py); `self.pixel_cache` names
the file in use, or is None.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Iterator

import numpy as np
from torch.utils.data import IterableDataset

from .. import _native
from . import pixel_cache
from .batching import EpochPlanner, LoaderConfig, shard_batches
from .defects import DataError
from .index import PreparedIndex
from .native_index import NativeIndex


class NativeLoader(IterableDataset):
    """An iterable of batches; also a torch IterableDataset (use DataLoader(loader, batch_size=None))."""

    def __init__(self, index: PreparedIndex | str, config: LoaderConfig | None = None, **overrides):
        self.index = index if isinstance(index, PreparedIndex) else PreparedIndex(index)
        self.index.check_image_files()  # the tables are the ones indexed (stat only), else DataError
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
        c, self._lengths = self.cfg, self.index.num_tokens().astype(np.uint32).tolist()
        # bound methods, not lambdas: the loader pickles (DataLoader workers, spawn)
        self.planner = EpochPlanner(self._rows_of, self._order_of, self._lengths, self.capacity,
                                    c.pack and c.carry_last_row, c.last_epoch)
        # Built (and the whole index checked) now, so a bad index fails here, not at the first batch. No
        # thread starts before iter(); a forked child builds its own engine (_engine_here).
        self._engine_here()

    # ---- the engine ------------------------------------------------------------------------------

    def _make_engine(self):
        # The options cross as the LoaderConfig itself (rust/config.rs reads its attributes), capacity resolved.
        config = dataclasses.replace(self.cfg, capacity=self.capacity)
        c = self.cfg
        cache = pixel_cache.find(self.index, c.image_transform, c.image_size, c.jpeg_draft, c.pixel_cache)
        self.pixel_cache = cache[0] if cache else None
        try:
            engine = _native.NativeLoader(NativeIndex.of(self.index), config)
        except ValueError as e:  # an index that contradicts itself: bad data, named by file and sample
            raise DataError(str(e)) from None
        if cache:
            try:
                engine.attach_pixel_cache(*cache)
            except ValueError as e:  # a .u8 missing or of the wrong length beside a valid .json
                if c.pixel_cache == "require":
                    raise DataError(f"pixel_cache: require, but {e}") from None
                warnings.warn(f"pixel cache not used: {e}", stacklevel=3)
                self.pixel_cache = None
        return engine

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
        batches = self.planner.batches(self.epoch if epoch is None else epoch, c.batch_size, c.shuffle_batches, c.seed)
        mine, self.dropped_batches = shard_batches(batches, c.rank, c.world_size, c.even_batches)
        return mine

    def _order_of(self, epoch: int) -> list[int]:
        return self.index.epoch_order(self.cfg.seed, epoch)

    def _rows_of(self, order: list[int]) -> list[list[int]]:
        """The packer (rust/pack.rs, equal to batching.plan_rows): one row per batch of one, unsharded."""
        c = self.cfg
        batches, _ = _native.plan_batches(self._lengths, order, 1, c.pack, self.capacity, c.window, 0, 1, False)
        return [b[0] for b in batches]

    def __len__(self) -> int:
        return len(self.plan())

    def __iter__(self) -> Iterator[dict]:
        self.index.check_image_files()  # again each epoch: a table rewritten during a long run is refused too
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


def as_torch(batch: dict) -> dict:
    """A loader batch (numpy arrays, from either loader) -> torch tensors without copying (torch.from_numpy);
    other values unchanged."""
    import torch

    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
