"""Training checkpoints: complete or absent, never half-written, and still there after a power loss.

Layout, OUTPUT_DIR/checkpoints/:
    step_N/                       a complete checkpoint (the only names `resume` considers, with .old-step_N)
        COMPLETE                  written last, before the rename (a copied folder keeps the mark)
        trainer.json              step, world size, tokens seen, the batch plan's fingerprint, ... (rank 0)
        config.yaml               the resolved training config
        rank_R.pt                 per rank: the loader's state_dict and the RNG states (python, numpy, torch, cuda),
                                  only tensors, numbers, strings, tuples, lists and dicts: loaded with
                                  torch.load(weights_only=True), so opening a checkpoint cannot run code
        <DeepSpeed's files>       model + optimizer + LR scheduler (engine.save_checkpoint, sharded under ZeRO)
    .tmp-step_N/                  a save in progress (or one killed mid-way: ignored, removed by the next save)
    .old-step_N/                  the previous step_N while a save of the same step replaces it (durable.py): if a
                                  save was cut short between the two renames it is the last good copy, so resume
                                  takes it, and the next save renames it back (or removes it, if step_N made it)
    .del-*/                       a folder being deleted (renamed first, so no half-deleted step_N ever exists)

Protocol: every rank writes into .tmp-step_N (DeepSpeed's collective save, then its own rank file) and fsyncs every
file there (DeepSpeed does not: without it a power loss can leave a renamed step_N of truncated shards); a barrier;
rank 0 writes trainer.json, config.yaml and COMPLETE, fsyncs every file and folder again, and publishes the folder
as step_N (durable.publish: an existing step_N is renamed aside, never deleted first; the rename is fsynced in the
parent before the old copy goes), then deletes complete checkpoints beyond `keep_last`; a barrier. A kill -9 or a
power loss at any point leaves a complete newest checkpoint: the previous one, or this one. The output folder must
be on a file system every rank sees (as DeepSpeed's own checkpoints need).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal

import numpy as np
import torch

from . import durable

_STEP = re.compile(r"^step_(\d+)$")
_ASIDE = re.compile(r"^" + re.escape(durable.ASIDE) + r"step_(\d+)$")
KILL_HOOK = "OTTERFAST_TEST_KILL_IN_SAVE"  # tests: SIGKILL rank 0 in the save of this step, before the rename


def ckpt_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first. A complete .old-step_N without a step_N (a save of
    step N replacing it was cut short) counts as step N: it is the last good copy. Read only: every rank may call
    it at once; rank 0's next save puts the aside copy back (recover)."""
    root = ckpt_root(output_dir)
    if not os.path.isdir(root):
        return []
    names = os.listdir(root)
    found: dict[int, str] = {}
    for name in names:
        m = _STEP.match(name) or _ASIDE.match(name)
        path = os.path.join(root, name)
        if m and os.path.exists(os.path.join(path, "COMPLETE")):
            step = int(m.group(1))
            if name.startswith("step_") or step not in found:
                found[step] = path
    return sorted(found.items())


def find_resume(resume: str, output_dir: str) -> str | None:
    """The checkpoint folder to resume from: `auto` -> the newest complete one (or None), `off` -> None."""
    if resume == "off":
        return None
    if resume == "auto":
        done = complete_checkpoints(output_dir)
        return done[-1][1] if done else None
    path = resume
    if not os.path.exists(os.path.join(path, "COMPLETE")):
        raise FileNotFoundError(f"resume: {path} is not a complete checkpoint (no COMPLETE marker)")
    return path


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict:
    """Every RNG's state in plain types (weights_only-loadable): python's as its tuple of ints, numpy's legacy
    MT19937 as a dict of an int64 tensor and numbers, torch's (and CUDA's) as byte tensors."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state = {"python": random.getstate(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, output_dir: str, step: int, rank: int, rank_state: dict, trainer_state: dict, config_yaml: str,
         keep_last: int) -> str:
    """Collective: every rank calls it. Returns the complete checkpoint's path."""
    import torch.distributed as dist

    root = ckpt_root(output_dir)
    tag = f".tmp-step_{step}"
    tmp, final = os.path.join(root, tag), os.path.join(root, f"step_{step}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        durable.clean_trash(root)
        for name in os.listdir(root):
            if name.startswith(".tmp-step_"):  # leftovers of saves that were killed
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            m = _ASIDE.match(name)
            if m:  # a save that replaced step_N and was cut short: the aside copy back, or gone if step_N made it
                durable.recover(os.path.join(root, f"step_{m.group(1)}"))
    dist.barrier()
    engine.save_checkpoint(root, tag=tag, client_state={"otterfast_step": step}, save_latest=False)
    _write(os.path.join(tmp, f"rank_{rank}.pt"), _to_bytes(rank_state))
    durable.fsync_tree(tmp)  # DeepSpeed's files are not fsynced by DeepSpeed; each rank flushes what it wrote
    dist.barrier()
    if rank == 0:
        if os.environ.get(KILL_HOOK) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        _write(os.path.join(tmp, "trainer.json"), json.dumps(trainer_state, indent=1).encode())
        _write(os.path.join(tmp, "config.yaml"), config_yaml.encode())
        _write(os.path.join(tmp, "COMPLETE"), b"")
        durable.publish(tmp, final)  # fsync every file and folder, rename in (an existing step_N aside first)
        if keep_last:
            for _, old in complete_checkpoints(output_dir)[:-keep_last]:
                durable.remove(old)
    dist.barrier()
    return final


def _to_bytes(obj) -> bytes:
    """torch.save's bytes, checked to load with weights_only=True (so a state that would need pickled code to
    load is refused when saved, not when resumed)."""
    import io
    import pickle

    b = io.BytesIO()
    torch.save(obj, b)
    try:
        torch.load(io.BytesIO(b.getvalue()), weights_only=True)
    except pickle.UnpicklingError as e:
        raise TypeError(f"rank state holds a type that weights_only loading refuses{_refused(e)}") from e
    return b.getvalue()


def load_rank_state(path: str) -> dict:
    """A rank_R.pt, with weights_only=True: only tensors and plain Python values come back, never code. A file
    that needs more (an older otterfast's pickled numpy state, or no checkpoint at all) is a ValueError."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: not loadable with weights_only=True (written by an otterfast before rank states "
                         f"were plain tensors and numbers, or not a checkpoint file); refusing to unpickle it"
                         f"{_refused(e)}") from e


def _refused(e: Exception) -> str:
    """The global torch's safe unpickler refused, from its long message: ': GLOBAL module.name' or ''."""
    what = next((x.strip().split(" was not")[0] for x in str(e).splitlines() if "Unsupported global" in x), "")
    return f": {what}" if what else ""


def check_plan(path: str, trainer: dict, plan: dict) -> None:
    """ValueError unless the checkpoint was saved under this batch plan (loop.plan_fingerprint): its data position
    (epoch, batches) would otherwise be batch N of another plan, and the resume not exact. One line naming every
    key that changed."""
    saved = trainer.get("plan")
    if saved is None:
        raise ValueError(f"{path}: saved without a batch-plan fingerprint (by an older otterfast): whether resuming "
                         "it would be exact cannot be checked; start afresh in a new output_dir")
    changed = [k for k in plan if saved.get(k) != plan[k]]
    last, ep = "data.loader.last_epoch", trainer.get("loader", {}).get("epoch")
    if last in changed and saved.get(last) is not None and ep is not None:
        # `epochs` changed: epochs before both runs' last one are planned alike (batching.EpochPlanner)
        firsts = [e for e in (saved[last], plan[last]) if e >= 0]
        if not firsts or ep < min(firsts):
            changed.remove(last)
    if changed:
        def show(k, v):
            return f"{v[:12]}" if k == "data" and isinstance(v, str) else repr(v)

        what = ", ".join(f"{k} {show(k, saved.get(k))} when saved, {show(k, plan[k])} now" for k in changed)
        why = " (the prepared index: its data, prepare options or files changed)" if "data" in changed else ""
        ep = trainer.get("loader", {})
        raise ValueError(f"{path}: resume would not be exact: {what}{why}; its data position (epoch "
                         f"{ep.get('epoch')}, batch {ep.get('batches')}) belongs to another batch plan; set "
                         f"{'it' if len(changed) == 1 else 'them'} back, or start afresh in a new output_dir")


def load(engine, path: str, rank: int, world_size: int, plan: dict | None = None) -> tuple[dict, dict]:
    """Restore the engine (model, optimizer, scheduler) from `path`; returns (trainer_state, this rank's state).
    With `plan` (the run's loop.plan_fingerprint), a checkpoint saved under another batch plan is refused first."""
    with open(os.path.join(path, "trainer.json")) as f:
        trainer = json.load(f)
    if trainer["world_size"] != world_size:
        raise ValueError(f"{path} was saved by {trainer['world_size']} ranks, this run has {world_size}: the "
                         "data position and DeepSpeed's sharded state are per rank; resume with the same number")
    if plan is not None:
        check_plan(path, trainer, plan)
    root, tag = os.path.split(os.path.abspath(path))
    loaded, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    mine = load_rank_state(os.path.join(path, f"rank_{rank}.pt"))
    return trainer, mine
