"""The validation pass: token-mean loss over a held-out set, the same loss and packing as training.

    vset = ValidationSet(NativeLoader(RestrictedIndex(index, rows, fixed=True), cfg), rank, world, max_batches)
    res = validation_loss(loss_fn, vset, device)   # {"val_loss", "val_tokens", "val_samples", "val_batches"}

The set's plan is fixed: the held-out rows once each in row order, packed like training (same batch_size,
capacity, window), batches not shuffled, no row carried between passes, the same plan on every pass and for
every number of ranks. Batches are dealt round-robin to ranks (rank r: batches r, r + W, ...) and none is dropped;
a rank with one batch fewer than the others runs a padding forward (the plan's first batch) whose loss is not
counted, so every rank makes the same number of forward calls (ZeRO-3 gathers parameters collectively in each).

val_loss = (sum of every held-out labelled token's cross-entropy) / (their number), both summed over ranks
(models/build.py batch_loss, as in training: `labels[:, 1:] != -100`). Padding rows carry no labels.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch


def _allreduce(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def validation_loader_config(train_cfg):
    """The training loader's options, set for a fixed pass: one plan whatever the epoch, seed or rank count."""
    return dataclasses.replace(train_cfg, shuffle_batches=False, carry_last_row=False, even_batches=False,
                               last_epoch=-1)


class ValidationSet:
    """A loader over held-out rows (a fixed RestrictedIndex view) and this rank's share of its plan."""

    def __init__(self, loader, rank: int, world: int, max_batches: int | None = None, source: str = ""):
        c = loader.cfg
        if c.shuffle_batches or c.even_batches or (c.pack and c.carry_last_row):
            raise ValueError("a validation loader needs shuffle_batches, even_batches and carry_last_row off "
                             "(validation_loader_config)")
        if c.rank != rank or c.world_size != world:
            raise ValueError(f"validation loader is for rank {c.rank} of {c.world_size}, not {rank} of {world}")
        self.loader, self.rank, self.world, self.source = loader, rank, world, source
        everything = loader.planner.batches(0, c.batch_size, False, c.seed)  # before rank dealing
        self.batches = everything[:max_batches] if max_batches else everything
        if not self.batches:
            raise ValueError(f"the validation set ({source or loader.index.path}) makes no batch")
        self.samples = sum(len(row) for b in self.batches for row in b)
        self.mine = len(range(rank, len(self.batches), world))  # this rank's batches: r, r + W, ... of the plan
        self.calls = math.ceil(len(self.batches) / world)  # forward calls per rank (the same on every rank)
        self._pad = None

    def pad_batch(self) -> dict:
        if self._pad is None:
            self._pad = self.loader.collate_rows(self.batches[0])
        return self._pad

    def local_batches(self):
        """This rank's batches of the plan, decoded by the loader's threads (prefetched), then padding."""
        loader = self.loader
        loader.set_epoch(0)  # the same plan every pass
        it = iter(loader)
        try:
            for _, b in zip(range(self.mine), it):  # range first: no batch decoded beyond max_batches
                yield b, True
        finally:
            it.close()  # stops the loader's threads
        for _ in range(self.calls - self.mine):
            yield self.pad_batch(), False


def validation_loss(loss_fn, vset: ValidationSet, device, to_device=None) -> dict:
    """One pass: `loss_fn(batch) -> summed token loss` (the training LossModel or the DeepSpeed engine), called
    under no_grad; the caller sets eval mode. Returns the token-mean loss over all ranks and what it covers."""
    from ..data.loader import as_torch

    to_device = to_device or (lambda b: as_torch(b))
    t0 = time.perf_counter()
    loss_sum, n_lab, n_samples, n_batches = 0.0, 0.0, 0.0, 0.0
    with torch.no_grad():
        for b, counted in vset.local_batches():
            s = loss_fn(to_device(b))
            if counted:
                loss_sum += float(s.detach().double())
                n_lab += float(np.count_nonzero(b["labels"][:, 1:] != -100))
                n_samples += float(len(b["sample_index"]))
                n_batches += 1
    loss_sum, n_lab, n_samples, n_batches = _allreduce([loss_sum, n_lab, n_samples, n_batches], device)
    return {"val_loss": loss_sum / n_lab if n_lab else float("nan"), "val_tokens": int(n_lab),
            "val_samples": int(n_samples), "val_batches": int(n_batches), "val_s": time.perf_counter() - t0}
