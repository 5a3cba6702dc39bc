"""Batch planning: which samples go into which row of which batch, from token counts alone.

Shared by both loaders (the native loader runs the same rules in rust/pack.rs; tests prove the plans are
equal). Lengths are known before any pixel is decoded (text tokens + image tokens from header sizes), so a
whole epoch is planned up front.

- pack=False: consecutive `batch_size` samples of the order, one per row (pad-to-longest, Otter's batches).
- pack=True: best-fit-decreasing over windows of `window` samples: within a window, samples are placed in
  decreasing length (ties: earlier in the order first) into the open row with the least room that still
  fits, else a new row of capacity `capacity`. Rows keep the window's order of creation; `batch_size` rows
  make a batch (the last batch of the epoch may be short).
- Ranks: batches are dealt round-robin, rank r takes batches r, r + world_size, ...; with `even=True` the
  final batches that do not fill a round are dropped (counted), so that every rank runs the same number of
  steps (a DDP requirement); the next epoch's new order drops different samples.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class LoaderConfig:
    """Options shared by the reference and the native loader (same meaning, same defaults).

    The native engine reads this object itself: rust/config.rs `Config` takes the fields it needs by name
    (a new native option is a field here and one there; a renamed field must be renamed there too)."""

    batch_size: int = 8  # rows per batch
    seed: int = 0
    pack: bool = True  # False: one sample per row, padded to the longest in the batch
    capacity: int | None = None  # tokens per packed row; default: the index's max_seq_len
    window: int = 1000  # best-fit-decreasing window, in samples
    image_transform: str = "otter"  # "otter" (square bicubic resize) or "clip" (resize + centre crop)
    image_size: int = 224
    # Otter/CLIP pixels, opt-in: decode greyscale/colour JPEGs at reduced DCT scale (1/2..1/8, keeping both sides
    # >= image_size), as PIL's draft() does, before resizing (native: libjpeg-turbo, exactly as PIL). Off by
    # default: on the demo photos the images it shrinks drift by 42.6 dB PSNR (mean abs 0.45 of 255) from the full
    # decode, more than two accepted bicubic resizes differ (56.5 dB, 0.15) (benches/results/draft_drift.md);
    # it saves ~0.6 ms of ~2.2 ms per 0.8 MP photo (benches/results/loader_profile.md). Never used for Fuyu.
    jpeg_draft: bool = False
    rank: int = 0
    world_size: int = 1
    even_batches: bool = True  # drop the last batches that do not fill a round of ranks
    # Visit the epoch's batches in a seeded random order (per seed and epoch), then deal them to ranks. Packing
    # emits each window's rows longest samples first, so without it the loss swings with the position inside
    # every window (seen in the demo as a spike at each epoch end).
    shuffle_batches: bool = True
    # Packed: carry each epoch's least-full row into the next epoch's first window instead of emitting it half
    # empty (on the demo data at 4,096 tokens the last row is 26% full and the epoch's padding 6.9%); the run's
    # `last_epoch` (set by `otterfast train`; -1: none) keeps its own (EpochPlanner).
    carry_last_row: bool = True
    last_epoch: int = -1
    on_error: str = "raise"  # or "skip": leave out a sample whose image fails to decode, counted
    num_threads: int = 0  # native only: 0 = all cores
    prefetch: int = 2  # native only: batches decoded ahead (a packed Otter row of 4096 tokens can hold ~100 MB of pixels)
    blob_window: int = 1024  # native only: images whose encoded bytes are read from the tables at once
    blob_window_mb: int = 256  # native only: ... and at most this many MiB of them
    # native only: Otter / CLIP pixels from the index's pixel cache (`otterfast data cache-pixels`, data/pixel_cache.py;
    # bit-identical batches): "auto" when one matches this index and image_transform / image_size / jpeg_draft,
    # "never", or "require" (an error when there is none)
    pixel_cache: str = "auto"

    @classmethod
    def make(cls, config: "LoaderConfig | None" = None, **overrides) -> "LoaderConfig":
        cfg = LoaderConfig(**{f.name: getattr(config, f.name) for f in fields(cls)}) if config else cls()
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                valid = ", ".join(f.name for f in fields(cls))
                raise TypeError(f"unknown loader option {k!r}; valid: {valid}")
            setattr(cfg, k, v)
        if cfg.on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        if cfg.image_transform not in ("otter", "clip"):
            raise ValueError("image_transform must be 'otter' or 'clip'")
        if cfg.pixel_cache not in ("auto", "never", "require"):
            raise ValueError("pixel_cache must be 'auto', 'never' or 'require'")
        if cfg.batch_size < 1 or cfg.window < 1:
            raise ValueError("batch_size and window must be >= 1")
        return cfg


def plan_rows(lengths: list[int], order: list[int], capacity: int, window: int) -> list[list[int]]:
    """Best-fit-decreasing packing of `order` (sample rows) into rows of `capacity` tokens.

    Each window's least-full row (the most room; ties: the later row) is not emitted but carried into the
    next window as an open row, so short samples of the next window fill it: without this, the last row of
    every window is half empty (measured: 4% padding at 4,096 tokens with ~56-token samples).
    """
    rows: list[list[int]] = []
    carried: list[tuple[list[int], int]] = []  # at most one (row, room)
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        ranked = sorted(range(len(chunk)), key=lambda i: (-lengths[chunk[i]], i))
        bins: list[list[int]] = [b for b, _ in carried]
        room: list[int] = [r for _, r in carried]
        for i in ranked:
            s = chunk[i]
            n = lengths[s]
            if n > capacity:
                raise ValueError(f"sample row {s} has {n} tokens, more than the packing capacity {capacity}")
            best, best_room = -1, capacity + 1
            for b, r in enumerate(room):
                if n <= r < best_room:
                    best, best_room = b, r
            if best < 0:
                bins.append([s])
                room.append(capacity - n)
            else:
                bins[best].append(s)
                room[best] -= n
        carried = []
        if start + window < len(order) and bins:
            k = max(range(len(bins)), key=lambda b: (room[b], b))
            carried = [(bins.pop(k), room.pop(k))]
        rows += bins
    return rows


class EpochPlanner:
    """Each epoch's rows, with the leftover row carried across epochs (LoaderConfig.carry_last_row).

    Epoch e plans `carry(e) + order(e)`: carry(e) is the least-full row of epoch e-1's plan (the most room; ties:
    the later row), taken out of e-1 and put at the front of e's order, so that its samples share e's first
    window with e's own (best-fit-decreasing places them like any other). carry(0) is empty; a plan of one row
    keeps it; a full row is never carried; the run's last epoch (`last_epoch`) keeps its least-full row among its
    other rows (shuffled with them: made of the epoch's shortest samples, it must not be the run's final step).
    No sample is lost: a carried sample is trained at the start of the next epoch instead of the end of its own.
    Plans before the last epoch do not depend on `last_epoch` (the resume check relies on it).

    carry(e) depends on every epoch before it, so planning epoch e plans 0..e-1 first (token counts only; the
    carries are kept, so a run plans each epoch once): a resume at epoch e pays e plans. `rows_of(order)` is the
    packer (the native or the Python twin): both loaders share this class, so their plans stay equal.
    """

    def __init__(self, rows_of, order_of, lengths, capacity: int, carry: bool, last_epoch: int = -1):
        self.rows_of, self.order_of, self.lengths = rows_of, order_of, lengths
        self.capacity, self.carry, self.last_epoch = capacity, carry, last_epoch
        self._carry_in: dict[int, list[int]] = {0: []}

    def rows(self, epoch: int) -> list[list[int]]:
        e = max(k for k in self._carry_in if k <= epoch)
        while e < epoch:  # the carries of the epochs before this one, once
            self._plan(e)
            e += 1
        return self._plan(epoch)

    def _plan(self, epoch: int) -> list[list[int]]:
        rows = self.rows_of(self._carry_in[epoch] + list(self.order_of(epoch)))
        out: list[int] = []
        if self.carry and epoch != self.last_epoch and len(rows) > 1:
            fill = [sum(self.lengths[s] for s in r) for r in rows]
            k = max(range(len(rows)), key=lambda b: (self.capacity - fill[b], b))
            if fill[k] < self.capacity:
                out = rows.pop(k)
        self._carry_in[epoch + 1] = out
        return rows

    def batches(self, epoch: int, batch_size: int, shuffle: bool, seed: int) -> list[list[list[int]]]:
        """The whole epoch's batches, before rank sharding: rows in batches of `batch_size`, shuffled (seeded by
        seed and epoch) when asked."""
        rows = self.rows(epoch)
        out = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        return shuffle_batches(out, seed, epoch) if shuffle else out


def plan_batches(lengths: list[int], order: list[int], batch_size: int, pack: bool, capacity: int,
                 window: int) -> list[list[list[int]]]:
    """The epoch as batches of rows of sample rows."""
    if pack:
        rows = plan_rows(lengths, order, capacity, window)
    else:
        rows = [[s] for s in order]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def shard_batches(batches: list, rank: int, world_size: int, even: bool = True) -> tuple[list, int]:
    """This rank's batches and how many batches the epoch dropped to keep ranks even."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    n = len(batches) - len(batches) % world_size if even else len(batches)
    return batches[rank:n:world_size], len(batches) - n


def shuffle_batches(batches: list, seed: int, epoch: int) -> list:
    """The epoch's batches in a seeded random order (before rank sharding, so one process at grad_accum W sees
    the same steps as W ranks)."""
    import random

    out = list(batches)
    random.Random(f"otterfast/batches/{seed}/{epoch}").shuffle(out)
    return out
