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


# ---- power-loss safety (issue 14 item 9) -------------------------------------------------------------------------

class _FakeDeepSpeed:
    """engine.save_checkpoint as DeepSpeed lays it out (files in the tag folder and below), without fsyncs."""

    def __init__(self, content="model"):
        self.content = content

    def save_checkpoint(self, root, tag, client_state, save_latest):
        d = os.path.join(root, tag)
        os.makedirs(os.path.join(d, "zero"), exist_ok=True)
        step = client_state["otterfast_step"]
        with open(os.path.join(d, "mp_rank_00_model_states.pt"), "w") as f:
            f.write(f"{self.content} {step}")
        with open(os.path.join(d, "zero", "optim_states.pt"), "w") as f:
            f.write(f"optim {step}")


@pytest.fixture
def no_barrier(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "barrier", lambda: None)


def _save(out, step, content="model", keep_last=2):
    return ck.save(_FakeDeepSpeed(content), str(out), step, 0, {"loader": {"epoch": 0, "batches": step, "seed": 0}},
                   {"step": step, "world_size": 1}, "seed: 0\n", keep_last)


def _fd_path(fd):
    return os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))


def test_every_file_and_folder_is_fsynced_before_the_rename(tmp_path, monkeypatch, no_barrier):
    synced: list[str] = []
    renames: list[tuple[str, str, set]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        synced.append(_fd_path(fd))
        real_fsync(fd)

    def rename(a, b):
        renames.append((os.path.realpath(a), os.path.realpath(b), set(synced)))
        real_rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    root = os.path.realpath(tmp_path / "checkpoints")
    _save(tmp_path, 3)
    final = os.path.join(root, "step_3")
    (src, dst, before), = [r for r in renames if r[1] == final]
    assert src == os.path.join(root, ".tmp-step_3")
    on_disk = set()
    for d, dirs, files in os.walk(final):
        on_disk.add(os.path.join(src, os.path.relpath(d, final)).rstrip("/.") if d != final else src)
        on_disk |= {os.path.join(src, os.path.relpath(os.path.join(d, f), final)) for f in files}
    assert os.path.join(src, "zero", "optim_states.pt") in on_disk and len(on_disk) == 8
    assert on_disk <= before, sorted(on_disk - before)  # DeepSpeed's files, the rank file, COMPLETE, the folders
    assert synced.index(root, len(before)) >= len(before)  # the parent, after the rename: the rename is durable


def test_export_is_fsynced_and_never_deletes_the_old_copy_first(tmp_path, monkeypatch, no_barrier):
    from otterfast.train import export as ex

    events: list[tuple] = []
    real_fsync, real_rename, real_rmtree = os.fsync, os.rename, ex.durable.shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", _fd_path(fd))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", os.path.realpath(a),
                                                                   os.path.realpath(b))), real_rename(a, b))[1])
    monkeypatch.setattr(ex.durable.shutil, "rmtree", lambda p, **kw: (events.append(("rmtree", os.path.realpath(p))),
                                                                      real_rmtree(p, **kw))[1])

    class Model:
        config = type("C", (), {"lora_config": None})()

        def save_pretrained(self, d, state_dict):
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "model.safetensors"), "w") as f:
                f.write(str(sorted(state_dict)))

    class Engine:
        module = torch.nn.Sequential()
        module.add_module("model", torch.nn.Linear(2, 2))

        def zero_optimization_stage(self):
            return 0

    try:
        import otterfast.models.weights_io as wio
        monkeypatch.setattr(wio, "save_trainable", lambda *a, **kw: None)
    except ImportError:
        pass
    out = os.path.realpath(tmp_path / "export")
    os.makedirs(out)
    (tmp_path / "export" / "old.txt").write_text("the previous export")
    ex.export(Engine(), Model(), str(tmp_path), str(tmp_path / "no-index"), 0, meta={"format": "simple"})
    assert sorted(os.listdir(out)) == ["model.safetensors", "otterfast.json"]
    tmp = out + ".tmp"
    i_in = events.index(("rename", tmp, out))
    assert ("fsync", os.path.join(tmp, "model.safetensors")) in events[:i_in]
    assert ("fsync", os.path.join(tmp, "otterfast.json")) in events[:i_in] and ("fsync", tmp) in events[:i_in]
    assert events.index(("rename", out, os.path.join(str(os.path.dirname(out)), ".old-export"))) < i_in
    assert ("fsync", os.path.dirname(out)) in events[i_in:]
    deleted = [e for e in events if e[0] == "rmtree" and "old-export" in e[1]]
    assert deleted and events.index(deleted[0]) > events.index(("fsync", os.path.dirname(out)), i_in)


class _Crash(BaseException):
    pass


def _crash_after(monkeypatch, n):
    """Every file-system mutation (rename, unlink, rmdir) counts; the n-th raises _Crash before it happens, as a
    power loss there would."""
    count = [0]

    def wrap(name):
        real = getattr(os, name)

        def op(*a, **kw):
            count[0] += 1
            if count[0] == n:
                raise _Crash(name)
            return real(*a, **kw)

        monkeypatch.setattr(os, name, op)

    for name in ("rename", "replace", "unlink", "remove", "rmdir"):
        wrap(name)
    return count


def _good_copies(out):
    """Complete checkpoints whose every file holds what its step wrote."""
    good = []
    for step, path in ck.complete_checkpoints(str(out)):
        model = open(os.path.join(path, "mp_rank_00_model_states.pt")).read()
        assert model.endswith(f" {step}") and open(os.path.join(path, "zero", "optim_states.pt")).read() == \
            f"optim {step}"
        assert json.load(open(os.path.join(path, "trainer.json")))["step"] == step
        assert ck.load_rank_state(os.path.join(path, "rank_0.pt"))["loader"]["batches"] == step
        good.append((step, model))
    return good


@pytest.mark.parametrize("new_step,content", [(4, "model"), (2, "replaced")])
def test_a_crash_at_any_point_of_a_save_leaves_a_good_copy(tmp_path, monkeypatch, no_barrier, new_step, content):
    """step_2 exists; a save of step 4 (keep_last 1: step_2 then deleted) or of step 2 again (NaN stop right after a
    save) is cut at every file-system operation in turn. After each cut the newest complete checkpoint is step 2 or
    the new one, whole; resume finds it; the next save cleans up every leftover. (Before: saving step 2 again began
    by deleting the complete step_2, so a crash there left none.)"""
    n = 1
    while True:
        out = tmp_path / f"run{n}"
        _save(out, 2)
        with monkeypatch.context() as m:
            count = _crash_after(m, n)
            try:
                _save(out, new_step, content, keep_last=1)
                finished = True
            except _Crash:
                finished = False
        good = _good_copies(out)
        assert good, f"no complete checkpoint after a crash at operation {n}"
        newest = good[-1]
        assert newest in ((2, "model 2"), (new_step, f"{content} {new_step}")), (n, good)
        assert ck.find_resume("auto", str(out)) == ck.complete_checkpoints(str(out))[-1][1]
        _save(out, 6, keep_last=1)  # the next run's save recovers and cleans
        assert sorted(os.listdir(out / "checkpoints")) == ["step_6"], n
        if finished:
            break
        n += 1
    assert n > 5 and count[0] < n  # every operation was cut once, then one save ran through


def test_a_leftover_aside_copy_is_resumed_and_put_back(tmp_path, no_barrier):
    _save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    os.rename(root / "step_2", root / ".old-step_2")  # cut between the two renames of a save replacing step 2
    os.makedirs(root / ".tmp-step_2")
    assert ck.complete_checkpoints(str(tmp_path)) == [(2, str(root / ".old-step_2"))]
    assert ck.find_resume("auto", str(tmp_path)) == str(root / ".old-step_2")
    _save(tmp_path, 3)
    assert sorted(os.listdir(root)) == ["step_2", "step_3"]
    assert [s for s, _ in _good_copies(tmp_path)] == [2, 3]
