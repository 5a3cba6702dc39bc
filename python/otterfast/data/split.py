"""A held-out validation split of a prepared index, and index views restricted to a set of rows.

    split = holdout(index, fraction=0.02, seed=0)          # whole groups of related samples held out
    train = RestrictedIndex(index, split.train_rows)       # epoch orders without the held-out rows
    val = RestrictedIndex(index, split.val_rows, fixed=True)  # the held-out rows once, in row order

Leak-free: samples are related when they share an instruction id (a sample's `source_ids`: its query and the
in-context examples rendered into it) or an image id (`media_images` -> images.arrow `image_id`, compared as
strings, so the same image listed by two tables counts once). Related samples form groups (connected
components); the split holds out whole groups, so no held-out sample, nothing built from its query or in-context
examples, and nothing showing one of its images, is ever trained on.

Deterministic: groups are visited in an order drawn from `seed` alone and taken while they fit the target
(round(fraction x samples)); a group larger than the room left is skipped, so a giant group (e.g. an in-context
dataset whose examples chain all of its samples together) stays in training rather than overshooting.

A view is a PreparedIndex (the loaders take it as is: they plan each epoch from `index.epoch_order`), sharing
the tables; row numbers stay those of the whole index.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .index import PreparedIndex, arrow_numpy


class RestrictedIndex(PreparedIndex):
    """`base` seen through a set of its rows. `fixed=False` (training): each epoch's order is the whole index's
    (num_samples resampling, seeded shuffle) with the other rows left out, so a run sees what it would see on the
    whole index minus the held-out samples. `fixed=True` (validation): every epoch is the kept rows once each, in
    row order, whatever the seed (num_samples does not apply: every held-out sample counts once)."""

    def __init__(self, base: PreparedIndex, rows, fixed: bool = False):  # noqa: D107 (no PreparedIndex.__init__)
        self.__dict__.update(base.__dict__)  # the same tables, meta and token counts: nothing is read again
        self.base = base
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) and (rows[0] < 0 or rows[-1] >= len(base)):
            raise ValueError(f"{base.path}: rows out of range [0, {len(base)})")
        self.rows = rows
        self.fixed = fixed
        self._keep = np.zeros(len(base), dtype=bool)
        self._keep[rows] = True

    def epoch_order(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if self.fixed:
            return self.rows.tolist()[rank::world_size]
        keep = self._keep
        return [i for i in self.base.epoch_order(seed, epoch) if keep[i]][rank::world_size]


# ---- related samples ----------------------------------------------------------------------------------

def _edges(index: PreparedIndex) -> tuple[np.ndarray, np.ndarray, int]:
    """(sample row, key) pairs and the number of keys: a key is an instruction id or an image id (equal ids, one
    key)."""
    s_rows, s_ids, i_rows, i_ids = _keyed(index)
    s_enc, i_enc = pc.dictionary_encode(s_ids), pc.dictionary_encode(i_ids)
    n_src = len(s_enc.dictionary)
    keys = np.concatenate([arrow_numpy(s_enc.indices).astype(np.int64),
                           n_src + arrow_numpy(i_enc.indices).astype(np.int64)])
    return np.concatenate([s_rows, i_rows]), keys, n_src + len(i_enc.dictionary)


def _keyed(index: PreparedIndex) -> tuple[np.ndarray, pa.Array, np.ndarray, pa.Array]:
    """(sample row, instruction id) and (sample row, image id) pairs, the ids as strings."""
    t = index.samples
    src = t.column("source_ids").combine_chunks()
    media = t.column("media_images").combine_chunks()
    media_sample = arrow_numpy(pc.list_parent_indices(media)).astype(np.int64)
    frames = pc.list_flatten(media)
    i_rows = media_sample[arrow_numpy(pc.list_parent_indices(frames)).astype(np.int64)] if len(frames) else \
        np.zeros(0, np.int64)
    image_rows = pa.array(arrow_numpy(pc.list_flatten(frames)).astype(np.int64) if len(frames) else
                          np.zeros(0, np.int64))
    image_ids = pc.take(index.images.column("image_id").combine_chunks(), image_rows)
    return (arrow_numpy(pc.list_parent_indices(src)).astype(np.int64), pc.list_flatten(src), i_rows, image_ids)


def shared_with(train: PreparedIndex, val: PreparedIndex) -> int:
    """How many of `val`'s samples share an instruction id or an image id with a sample of `train` (a dataset
    given for validation is the user's: the trainer warns when it overlaps)."""
    t_src_rows, t_src, t_img_rows, t_img = _keyed(train)
    v_src_rows, v_src, v_img_rows, v_img = _keyed(val)
    hit = np.zeros(len(val), dtype=bool)
    hit[v_src_rows[np.asarray(pc.is_in(v_src, value_set=pc.unique(t_src)), dtype=bool)]] = True
    if len(v_img) and len(t_img):
        hit[v_img_rows[np.asarray(pc.is_in(v_img, value_set=pc.unique(t_img)), dtype=bool)]] = True
    return int(hit.sum())


def related_groups(index: PreparedIndex) -> np.ndarray:
    """Each sample row's group (0..G-1, numbered by their smallest row): the connected components of the graph
    linking every sample to its instruction ids and image ids.

    Hook-and-jump (Shiloach-Vishkin style) over whole arrays: every edge hooks the larger of its two roots under
    the smaller, then pointers jump until each node points at its root; repeated until no edge joins two roots.
    A chain of in-context samples (each sharing ids with the next) joins in one round plus log2(length) jumps.
    tests/test_validation.py checks it against a plain union-find."""
    n = len(index)
    a, key, n_keys = _edges(index)
    u, v = a, n + key  # nodes: samples 0..n-1, then keys
    parent = np.arange(n + n_keys, dtype=np.int64)
    while True:
        pu, pv = parent[u], parent[v]
        diff = pu != pv
        if not diff.any():
            break
        lo, hi = np.minimum(pu[diff], pv[diff]), np.maximum(pu[diff], pv[diff])
        np.minimum.at(parent, hi, lo)  # hi and lo are roots (every node points at its root here): no cycle
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    _, groups = np.unique(parent[:n], return_inverse=True)
    return groups.astype(np.int64)


# ---- the split -----------------------------------------------------------------------------------------

@dataclass
class Split:
    fraction: float
    seed: int
    train_rows: np.ndarray
    val_rows: np.ndarray
    groups: int  # groups of related samples in the index
    val_groups: int  # ... held out
    largest_group: int  # samples in the largest group

    def digest(self) -> str:
        return hashlib.sha256(np.asarray(self.val_rows, dtype=np.int64).tobytes()).hexdigest()[:12]


def holdout(index: PreparedIndex, fraction: float, seed: int) -> Split:
    """Hold out about `fraction` of the index's samples (round(fraction x n), at least 1), whole groups of related
    samples only (related_groups), chosen by `seed`. ValueError when no group fits or nothing would be left to
    train on."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    n = len(index)
    groups = related_groups(index)
    sizes = np.bincount(groups)
    target = max(1, int(round(fraction * n)))
    taken = np.zeros(len(sizes), dtype=bool)
    held = 0
    for g in np.random.default_rng(np.random.SeedSequence([seed, 0x5B117])).permutation(len(sizes)).tolist():
        if held + sizes[g] <= target:
            taken[g] = True
            held += int(sizes[g])
            if held == target:
                break
    if held == 0:
        raise ValueError(f"{index.path}: validation fraction {fraction} asks for {target} sample(s), but every group "
                         f"of related samples (shared instruction or image ids) is larger (smallest "
                         f"{int(sizes.min())}); raise data.validation.fraction or give data.validation.yaml")
    in_val = taken[groups]
    if in_val.all():
        raise ValueError(f"{index.path}: validation fraction {fraction} leaves no sample to train on")
    return Split(fraction, seed, np.flatnonzero(~in_val), np.flatnonzero(in_val), len(sizes), int(taken.sum()), int(sizes.max()))
