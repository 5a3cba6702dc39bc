"""rank_R.pt (issue 14 item 10): the per-rank resume state holds only tensors, numbers, strings and containers, so it
loads with torch.load(weights_only=True) and opening a checkpoint cannot run code; the RNG streams continue exactly
as if the run had not stopped."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from otterfast.train import checkpoint as ck


def _draws() -> tuple:
    return (random.random(), random.getrandbits(64), np.random.random(4).tolist(), np.random.standard_normal(),
            np.random.randint(0, 1 << 30, 3).tolist(), torch.rand(4).tolist(), torch.randint(0, 100, (3,)).tolist())


def test_rank_state_loads_weights_only_and_rng_streams_continue(tmp_path):
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    _draws()
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state: it must survive too
    state = {"loader": {"epoch": 2, "batches": 17, "seed": 5}, "rng": ck.rng_state()}
    path = tmp_path / "rank_0.pt"
    path.write_bytes(ck._to_bytes(state))
    expected = [_draws() for _ in range(3)]  # what the uninterrupted run draws next

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)  # a fresh process, other states
    raw = torch.load(path, weights_only=True)  # plain torch, the safe loader
    mine = ck.load_rank_state(str(path))
    assert mine["loader"] == raw["loader"] == {"epoch": 2, "batches": 17, "seed": 5}
    ck.set_rng_state(mine["rng"])
    assert [_draws() for _ in range(3)] == expected  # bit-exact


def test_rank_state_holds_only_plain_types():
    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                assert isinstance(k, str)
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        else:
            assert v is None or isinstance(v, (bool, int, float, str, torch.Tensor)), type(v)

    walk(ck.rng_state())


class _Boom:
    """A pickle that runs code when unpickled (what weights_only=False would do)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_with_code_or_numpy_objects_is_refused(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "rank_0.pt"
    torch.save({"loader": {}, "rng": {"x": _Boom(str(marker))}}, bad)
    with pytest.raises(ValueError, match="weights_only=True"):
        ck.load_rank_state(str(bad))
    assert not marker.exists()  # nothing ran
    old = tmp_path / "old.pt"  # the format before: numpy's state as an ndarray inside a pickle
    torch.save({"loader": {}, "rng": {"numpy": np.random.get_state()}}, old)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        ck.load_rank_state(str(old))
    with pytest.raises(TypeError, match="weights_only loading refuses: .*numpy"):  # refused when saved, not at resume
        ck._to_bytes({"rng": {"numpy": np.random.get_state()}})


def test_checkpoint_load_uses_the_safe_loader(tmp_path):
    class Engine:
        def load_checkpoint(self, root, tag, **kw):
            return os.path.join(root, tag), {}

    step = tmp_path / "step_3"
    step.mkdir()
    (step / "trainer.json").write_text(json.dumps({"world_size": 1, "step": 3}))
    (step / "rank_0.pt").write_bytes(ck._to_bytes({"loader": {"epoch": 0, "batches": 3, "seed": 0},
                                                   "rng": ck.rng_state()}))
    trainer, mine = ck.load(Engine(), str(step), 0, 1)
    assert trainer["step"] == 3 and mine["loader"]["batches"] == 3
    marker = tmp_path / "ran"
    torch.save({"x": _Boom(str(marker))}, step / "rank_0.pt")  # replaced by a hostile file
    with pytest.raises(ValueError, match="weights_only=True"):
        ck.load(Engine(), str(step), 0, 1)
    assert not marker.exists()


# ---- the batch plan a checkpoint was saved under (issue 14 item 8) ----------------------------------------------

class _RecordingEngine:
    def __init__(self):
        self.loaded = False

    def load_checkpoint(self, root, tag, **kw):
        self.loaded = True
        return os.path.join(root, tag), {}


PLAN = {"seed": 0, "world_size": 1, "grad_accum": 2, "data.loader.batch_size": 4, "data.loader.pack": True,
        "data.loader.capacity": 2048, "data.loader.window": 1000, "data.loader.shuffle_batches": True,
        "data.loader.even_batches": True, "data": "a" * 64}


def _step_dir(tmp_path, plan):
    step = tmp_path / "step_3"
    step.mkdir()
    trainer = {"world_size": 1, "step": 3, "loader": {"epoch": 1, "batches": 5, "seed": 0}}
    if plan is not None:
        trainer["plan"] = plan
    (step / "trainer.json").write_text(json.dumps(trainer))
    (step / "rank_0.pt").write_bytes(ck._to_bytes({"loader": trainer["loader"], "rng": ck.rng_state()}))
    return str(step)


@pytest.mark.parametrize("key,value", [("data.loader.batch_size", 8), ("data.loader.capacity", 4096),
                                       ("grad_accum", 4), ("seed", 1), ("data", "b" * 64)])
def test_resume_under_another_batch_plan_is_refused(tmp_path, key, value):
    path = _step_dir(tmp_path, PLAN)
    engine = _RecordingEngine()
    now = dict(PLAN, **{key: value})
    with pytest.raises(ValueError, match=rf"step_3: resume would not be exact: {key} .* when saved, .* now.*"
                                         r"epoch 1, batch 5\) belongs to another batch plan") as e:
        ck.load(engine, path, 0, 1, now)
    assert "\n" not in str(e.value) and not engine.loaded  # one line; refused before anything is loaded
    trainer, mine = ck.load(engine, path, 0, 1, dict(PLAN))  # the same plan resumes
    assert engine.loaded and mine["loader"]["batches"] == 5


def test_resume_of_a_checkpoint_without_a_plan_is_refused(tmp_path):
    path = _step_dir(tmp_path, None)
    with pytest.raises(ValueError, match="saved without a batch-plan fingerprint"):
        ck.load(_RecordingEngine(), path, 0, 1, dict(PLAN))


def test_plan_fingerprint_names_the_keys_that_change_the_plan(demo_index):
    """Each key that changes which batches make a step shows in the fingerprint under its config name; keys that do
    not (threads, image size, on_error, run length) leave it as it is."""
    from otterfast.data.index import PreparedIndex
    from otterfast.train.config import load_config
    from otterfast.train.loop import plan_fingerprint, setup_data

    base = {"model": {"config": "configs/models/otter-tiny.yaml"}, "data": {"index": demo_index}, "max_steps": 2}
    index = PreparedIndex(demo_index)

    def fp(sets):
        cfg = load_config(base, sets)
        return plan_fingerprint(cfg, setup_data(cfg, index, demo_index, 0, 1), 1)

    ref = fp([])
    assert ref["data"] == index.fingerprint() and ref["data.loader.capacity"] == index.max_seq_len
    for sets, key in ((["data.loader.batch_size=3"], "data.loader.batch_size"),
                      (["data.loader.capacity=4096"], "data.loader.capacity"),
                      (["data.loader.pack=false"], "data.loader.pack"),
                      (["data.loader.window=10"], "data.loader.window"),
                      (["data.loader.shuffle_batches=false"], "data.loader.shuffle_batches"),
                      (["grad_accum=2"], "grad_accum"), (["seed=7"], "seed")):
        got = fp(sets)
        assert [k for k in ref if ref[k] != got[k]] == [key], sets
    for sets in (["data.loader.num_threads=1"], ["data.loader.image_size=112"], ["data.loader.on_error=skip"],
                 ["max_steps=3"]):
        assert fp(sets) == ref, sets
