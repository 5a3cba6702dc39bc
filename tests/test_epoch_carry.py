"""The packed epoch's least-full row carried into the next epoch (batching.EpochPlanner): padding, no sample lost,
both loaders' plans equal, exact resume in a later epoch."""

from __future__ import annotations

from collections import Counter

import pytest

from otterfast.data.batching import EpochPlanner, plan_rows
from otterfast.data.loader import NativeLoader
from otterfast.data.reference import ReferenceLoader


def _padding(plan, lengths, capacity):
    rows = [r for b in plan for r in b]
    return 1 - sum(lengths[s] for r in rows for s in r) / (len(rows) * capacity)


def test_carry_cuts_padding_and_loses_nothing(demo_index):
    kw = dict(batch_size=2, seed=4, pack=True, capacity=1024, num_threads=1, last_epoch=3)
    old = NativeLoader(demo_index, carry_last_row=False, **kw)
    new = NativeLoader(demo_index, **kw)
    L = new._lengths
    pad_old = [_padding(old.plan(e), L, 1024) for e in range(4)]
    pad_new = [_padding(new.plan(e), L, 1024) for e in range(4)]
    # every epoch ends without its half-empty row but the last, which keeps its own
    assert all(n < o for n, o in zip(pad_new[:3], pad_old[:3])), (pad_old, pad_new)
    assert sum(pad_new) < sum(pad_old)
    # over the run every sample of every epoch's order is trained exactly as often as without the carry
    seen_old = Counter(s for e in range(4) for b in old.plan(e) for r in b for s in r)
    seen_new = Counter(s for e in range(4) for b in new.plan(e) for r in b for s in r)
    assert seen_old == seen_new


def _without_least_full(rows, lengths, capacity):
    fills = [sum(lengths[s] for s in r) for r in rows]
    k = max(range(len(rows)), key=lambda b: (capacity - fills[b], b))
    return rows[:k] + rows[k + 1 :], rows[k]


def test_carried_row_is_the_least_full_and_starts_the_next_epoch():
    lengths = [60, 50, 40, 30, 10, 5, 45, 35]
    orders = {0: [0, 1, 2, 3, 4, 5], 1: [6, 7, 4]}
    rows_of = lambda order: plan_rows(lengths, order, 100, 1000)  # noqa: E731
    p = EpochPlanner(rows_of, orders.__getitem__, lengths, 100, carry=True)
    kept0, least = _without_least_full(plan_rows(lengths, orders[0], 100, 1000), lengths, 100)
    assert p.rows(0) == kept0
    kept1, _ = _without_least_full(plan_rows(lengths, least + orders[1], 100, 1000), lengths, 100)
    assert p.rows(1) == kept1  # the next epoch plans carry + its own order
    # a fresh planner asked for epoch 1 first gets the same rows (it plans epoch 0 on the way)
    q = EpochPlanner(rows_of, orders.__getitem__, lengths, 100, carry=True)
    assert q.rows(1) == kept1


def test_last_epoch_keeps_its_leftover_and_single_rows_stay():
    lengths = [30, 20]
    rows_of = lambda order: plan_rows(lengths, order, 100, 1000)  # noqa: E731
    p = EpochPlanner(rows_of, lambda e: [0, 1], lengths, 100, carry=True)
    assert p.rows(0) == [[0, 1]]  # one row: an epoch is never emptied
    lengths = [90, 90, 20]
    rows_of = lambda order: plan_rows(lengths, order, 100, 1000)  # noqa: E731
    last = EpochPlanner(rows_of, lambda e: [0, 1, 2], lengths, 100, carry=True, last_epoch=1)
    longer = EpochPlanner(rows_of, lambda e: [0, 1, 2], lengths, 100, carry=True, last_epoch=3)
    # epoch 0: rows [0] [1] [2]: the 20-token row is carried; epoch 1 plans [2] + [0, 1, 2] = [0] [1] [2, 2]: the
    # last epoch keeps its least-full row, a longer run carries it on
    assert last.rows(0) == longer.rows(0) == [[0], [1]]
    assert last.rows(1) == [[0], [1], [2, 2]] and longer.rows(1) == [[0], [1]]


@pytest.mark.parametrize("shuffle", [True, False])
def test_native_and_reference_plans_equal_with_carry(demo_index, shuffle):
    kw = dict(batch_size=3, seed=7, pack=True, capacity=512, shuffle_batches=shuffle, last_epoch=2,
              rank=1, world_size=2)
    nat = NativeLoader(demo_index, num_threads=1, **kw)
    ref = ReferenceLoader(demo_index, **kw)
    for e in range(3):
        ref.set_epoch(e)
        assert nat.plan(e) == ref.plan()


def test_resume_in_a_later_epoch_is_exact(demo_index):
    kw = dict(batch_size=2, seed=9, pack=True, capacity=512, num_threads=1, last_epoch=1)
    straight = NativeLoader(demo_index, **kw)
    e0 = [b["sample_index"].tolist() for b in straight]
    e1 = [b["sample_index"].tolist() for b in straight]
    first = NativeLoader(demo_index, **kw)
    first.set_epoch(1)
    it = iter(first)
    head = [next(it)["sample_index"].tolist() for _ in range(2)]
    state = first.state_dict()
    del it
    second = NativeLoader(demo_index, **kw)  # a new process: epoch 0's carry is planned again from the seed
    second.load_state_dict(state)
    assert head + [b["sample_index"].tolist() for b in second] == e1 and e0 != e1


def test_resume_accepts_a_changed_epoch_count_only_before_both_last_epochs():
    from otterfast.train.checkpoint import check_plan

    plan = {"seed": 0, "data.loader.last_epoch": 2}
    for saved_last, ep, ok in [(4, 1, True), (4, 2, False), (4, 3, False), (-1, 1, True), (-1, 2, False)]:
        trainer = {"plan": {"seed": 0, "data.loader.last_epoch": saved_last}, "loader": {"epoch": ep, "batches": 3}}
        if ok:
            check_plan("ck", trainer, plan)
        else:
            with pytest.raises(ValueError, match="data.loader.last_epoch"):
                check_plan("ck", trainer, plan)
