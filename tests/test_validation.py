"""Validation during training (issue 15 item 3): the held-out split (data/split.py), the validation pass
(train/validation.py) and `otterfast train` with eval_every.

- no held-out sample, nor any sample sharing one of its instruction ids or image ids, is in any training batch,
  over several epochs and for 1 and 2 ranks; the split is seeded;
- the grouping equals a plain union-find (including a long in-context chain);
- the pass's loss equals a slow reference: every held-out sample forwarded alone, unpacked, token losses averaged;
- a short run logs val_loss at eval_every multiples and the last step; 2 gloo ranks give 1 rank's val_loss.
"""

import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from otterfast.data.batching import LoaderConfig
from otterfast.data.index import PreparedIndex
from otterfast.data.loader import NativeLoader, as_torch
from otterfast.data.split import RestrictedIndex, holdout, related_groups
from otterfast.train.validation import ValidationSet, validation_loader_config, validation_loss

from test_train_runs import metrics, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _keys(index, rows):
    """Instruction ids and image ids of these sample rows."""
    image_ids = index.images.column("image_id").to_pylist()
    src, img = set(), set()
    for r in rows:
        s = index.sample(int(r))
        src.update(s.source_ids)
        img.update(image_ids[i] for m in s.media_images for i in m)
    return src, img


def _union_find_groups(index) -> np.ndarray:
    """The slow reference grouping: a dict-based union-find over samples, instruction ids and image ids."""
    parent = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    image_ids = index.images.column("image_id").to_pylist()
    srcs = index.samples.column("source_ids").to_pylist()
    media = index.samples.column("media_images").to_pylist()
    for i in range(len(index)):
        find(("s", i))
        for k in [("id", x) for x in srcs[i]] + [("img", image_ids[r]) for m in media[i] for r in m]:
            parent[find(k)] = find(("s", i))
    roots = [find(("s", i)) for i in range(len(index))]
    first = {}
    return np.array([first.setdefault(r, len(first)) for r in roots])


def _same_partition(a, b) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


class _FakeIndex:
    """Just what related_groups reads: samples (source_ids, media_images) and images (image_id)."""

    def __init__(self, source_ids, media_images, image_ids):
        self.samples = pa.table({"source_ids": pa.array(source_ids, pa.list_(pa.string())),
                                 "media_images": pa.array(media_images, pa.list_(pa.list_(pa.int32())))})
        self.images = pa.table({"image_id": pa.array(image_ids, pa.string())})

    def __len__(self):
        return self.samples.num_rows


def test_groups_equal_a_union_find(demo_index):
    ix = PreparedIndex(demo_index)
    assert _same_partition(related_groups(ix), _union_find_groups(ix))
    # a long in-context chain (each sample's examples are the two before it), pairs sharing an image listed under
    # two image rows with the same id, text-only singletons, and a random sprinkling of shared ids
    rng = np.random.default_rng(0)
    n = 3000
    src = [[f"q{j}" for j in range(max(0, i - 2), i + 1)] if i < 1500 else [f"q{i}"] for i in range(n)]
    for i in rng.integers(1500, n, 200):
        src[i].append(f"q{rng.integers(1500, n)}")
    image_ids = [f"img{k // 2}" for k in range(800)]  # rows 2k and 2k+1: the same id
    media = [[[int(rng.integers(0, 800))]] if i % 3 == 0 else [] for i in range(n)]
    fake = _FakeIndex(src, media, image_ids)
    got, ref = related_groups(fake), _union_find_groups(fake)
    assert _same_partition(got, ref)
    assert len(set(got[:1500].tolist())) == 1  # the chain is one group


def test_split_is_seeded_and_whole_groups(demo_index):
    ix = PreparedIndex(demo_index)
    a, b, c = holdout(ix, 0.1, 0), holdout(ix, 0.1, 0), holdout(ix, 0.1, 1)
    assert np.array_equal(a.val_rows, b.val_rows) and np.array_equal(a.train_rows, b.train_rows)
    assert not np.array_equal(a.val_rows, c.val_rows)
    for s in (a, c):
        assert len(s.val_rows) == round(0.1 * len(ix))  # the demo's groups (1, 2 or 5 samples) fill it exactly
        assert sorted(s.val_rows.tolist() + s.train_rows.tolist()) == list(range(len(ix)))
        groups = related_groups(ix)
        assert not set(groups[s.val_rows].tolist()) & set(groups[s.train_rows].tolist())
    with pytest.raises(ValueError, match="every group of related samples"):
        holdout(_Tiny(ix), 0.01, 0)


class _Tiny(PreparedIndex):
    """The demo index seen as if all its samples were one group (a single shared image id): nothing fits."""

    def __init__(self, base):
        self.__dict__.update(base.__dict__)
        n = len(base)
        self.samples = pa.table({"source_ids": pa.array([["x"]] * n, pa.list_(pa.string())),
                                 "media_images": pa.array([[]] * n, pa.list_(pa.list_(pa.int32())))})


@pytest.mark.parametrize("world", [1, 2])
def test_no_held_out_sample_or_relative_is_ever_trained_on(demo_index, world):
    """The trainer's own set-up (loop.setup_data): every batch of 4 epochs on every rank (the plans the loader
    decodes; one epoch also decoded, its batches' sample rows equal to the plan's), against the held-out rows,
    their instruction ids and their image ids."""
    from otterfast.train.config import load_config
    from otterfast.train.loop import setup_data

    ix = PreparedIndex(demo_index)
    cfg = load_config({"model": {"config": "configs/models/otter-tiny.yaml"}, "epochs": 4,
                       "data": {"index": demo_index, "validation": {"fraction": 0.1, "seed": 3},
                                "loader": {"batch_size": 2, "capacity": 512, "num_threads": 1}}})
    trained = []
    for rank in range(world):
        plan = setup_data(cfg, ix, demo_index, rank, world)
        held = plan.split.val_rows
        assert sorted(r for b in plan.val.batches for row in b for r in row) == held.tolist()
        for e in range(4):
            trained += [s for b in plan.loader.plan(e) for row in b for s in row]
        decoded = [int(s) for b in plan.loader for s in b["sample_index"]]  # epoch 0, as the loop reads it
        assert decoded == [s for b in plan.loader.plan(0) for row in b for s in row]
    assert len(trained) >= 3 * (len(ix) - len(held))  # the training data is there (minus even-batch drops)
    assert not set(trained) & set(held.tolist())
    v_src, v_img = _keys(ix, held)
    t_src, t_img = _keys(ix, set(trained))
    assert v_src and v_img  # the held-out set has queries and images to leak
    assert not v_src & t_src and not v_img & t_img


def test_fingerprint_names_the_split(demo_index, tmp_path):
    """The fraction split changes the training plan: its keys show in the resume fingerprint; a dataset of its
    own and eval_every do not."""
    from otterfast.train.config import load_config
    from otterfast.train.loop import plan_fingerprint, setup_data

    base = {"model": {"config": "configs/models/otter-tiny.yaml"}, "data": {"index": demo_index}, "max_steps": 2}
    index = PreparedIndex(demo_index)

    def fp(sets, val_index=None):
        cfg = load_config(base, sets)
        return plan_fingerprint(cfg, setup_data(cfg, index, demo_index, 0, 1, val_index), 1)

    ref = fp([])
    assert ref["data.validation.fraction"] is None and ref["data.validation.held_out"] is None
    split = fp(["data.validation.fraction=0.1"])
    assert {k for k in ref if ref[k] != split[k]} == {"data.validation.fraction", "data.validation.seed",
                                                      "data.validation.held_out"}
    other_seed = fp(["data.validation.fraction=0.1", "data.validation.seed=1"])
    assert {k for k in ref if split[k] != other_seed[k]} == {"data.validation.seed", "data.validation.held_out"}
    assert fp(["data.validation.index=x", "eval_every=5"], val_index=index) == ref


def _tiny_otter(ix):
    from otterfast.models.build import build_model, load_model_config

    torch.manual_seed(0)
    return build_model(load_model_config(os.path.join(ROOT, "configs/models/otter-tiny.yaml")), ix.tok).float().eval()


def test_validation_loss_equals_a_per_sample_reference(demo_index):
    from otterfast.models.build import batch_loss
    from otterfast.train.loop import LossModel

    ix = PreparedIndex(demo_index)
    split = holdout(ix, 0.1, 0)
    model = _tiny_otter(ix)
    # slow reference: each held-out sample alone, unpacked, its summed token loss and labelled tokens
    alone = NativeLoader(ix, batch_size=1, pack=False, num_threads=1)
    sums, counts = [], []
    with torch.no_grad():
        for row in split.val_rows.tolist():
            s, n = batch_loss(model, as_torch(alone.collate_rows([[row]])))
            sums.append(float(s))
            counts.append(n)
    ref = sum(sums) / sum(counts)

    cfg = validation_loader_config(LoaderConfig(batch_size=1, capacity=256, num_threads=1))
    view = RestrictedIndex(ix, split.val_rows, fixed=True)
    vset = ValidationSet(NativeLoader(view, cfg), 0, 1)
    assert len(vset.batches) % 2 == 1  # packed rows of several samples; an odd count: one rank of two pads
    assert max(len(row) for b in vset.batches for row in b) > 1
    got = validation_loss(LossModel(model), vset, torch.device("cpu"))
    assert got["val_loss"] == pytest.approx(ref, rel=1e-5)
    assert got["val_tokens"] == sum(counts) and got["val_samples"] == len(split.val_rows)
    again = validation_loss(LossModel(model), vset, torch.device("cpu"))  # the same plan every pass
    assert again["val_loss"] == got["val_loss"]

    # two ranks (the all-reduce done by hand): batches dealt r, r + 2, ...; both make the same number of forward
    # calls (the one with fewer pads, uncounted); the sums over ranks give the same mean
    parts = []
    for rank in (0, 1):
        c = LoaderConfig.make(cfg, rank=rank, world_size=2)
        vs = ValidationSet(NativeLoader(view, c), rank, 2)
        calls = []
        counting = LossModel(model)
        res = validation_loss(lambda b: calls.append(1) or counting(b), vs, torch.device("cpu"))
        assert len(calls) == -(-len(vset.batches) // 2)
        parts.append(res)
    assert sum(p["val_samples"] for p in parts) == len(split.val_rows)
    total = sum(p["val_loss"] * p["val_tokens"] for p in parts) / sum(p["val_tokens"] for p in parts)
    assert total == pytest.approx(ref, rel=1e-5)

    # max_batches: the first N batches of the plan, whatever the rank count; a rank with none runs a padding call
    one = ValidationSet(NativeLoader(view, LoaderConfig.make(cfg, rank=1, world_size=2)), 1, 2, max_batches=1)
    calls = []
    res = validation_loss(lambda b: calls.append(1) or LossModel(model)(b), one, torch.device("cpu"))
    assert len(calls) == 1 and res["val_tokens"] == 0 and res["val_samples"] == 0


def test_train_logs_val_loss_and_two_ranks_agree(tmp_path, demo_index_fuyu):
    """1 process at grad_accum 2 and 2 gloo ranks at grad_accum 1 take the same steps (test_train_runs): their
    validation losses agree too. eval_every 3 of 4 steps: passes at step 3 and at the last step."""
    sets = ["max_steps=4", "save_every=0", "export=false", "eval_every=3", "data.validation.fraction=0.1",
            "logging.tensorboard=true"]
    one = str(tmp_path / "one")
    p = train(one, demo_index_fuyu, *sets, "grad_accum=2")
    assert "validation: " in p.stdout and "samples held out of the training data" in p.stdout
    assert "val loss" in p.stdout
    rows = metrics(one)
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 4]
    ix = PreparedIndex(demo_index_fuyu)
    held = round(0.1 * len(ix))
    for r in rows:
        if "val_loss" in r:
            assert r["val_samples"] == held and r["val_tokens"] > 0 and np.isfinite(r["val_loss"])
    two = str(tmp_path / "two")
    p = train(two, demo_index_fuyu, *sets, nproc=2)
    got = metrics(two)
    for a, b in zip(rows, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
            assert (b["val_tokens"], b["val_samples"]) == (a["val_tokens"], a["val_samples"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from otterfast.train.plot import plot

    ea = EventAccumulator(os.path.join(one, "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("val/loss")] == [3, 4]
    png = plot(one)
    assert os.path.getsize(png) > 10_000


def test_validation_dataset_of_its_own(tmp_path, demo_dir, demo_index_fuyu):
    """data.validation.yaml: prepared like data.yaml (its options, the training index's tokenizer) into
    data.validation.index; the whole of it is the set; overlapping the training data is warned about (here it is
    the same data: every sample); without eval_every, one pass at the last step."""
    out, val = str(tmp_path / "run"), str(tmp_path / "val_index")
    p = train(out, demo_index_fuyu, "max_steps=2", "save_every=0", "export=false",
              f"data.validation.yaml={os.path.join(demo_dir, 'data.yaml')}", f"data.validation.index={val}")
    n = len(PreparedIndex(val))
    assert f"prepared {os.path.join(demo_dir, 'data.yaml')} -> {val}" in p.stdout
    assert f"warning: {n} of {n} samples of the validation index" in p.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows if "val_loss" in r] == [2] and rows[-1]["val_samples"] == n
