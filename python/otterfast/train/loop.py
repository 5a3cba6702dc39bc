"""The training loop: `otterfast train CONFIG.yaml` (one process, torchrun, or the deepspeed launcher).

One optimizer step = `grad_accum` micro-batches per rank, each one loader batch (`data.loader.batch_size`
packed rows). Loss normalisation: every labelled token of the step weighs the same, whatever micro-batch or
rank it is on. Before the step's first forward, the step's micro-batches are taken from the loader and their
labelled tokens counted (from the numpy labels, no compute); one all-reduce gives the step's total N. Each
micro-batch then backpropagates (its summed token loss) * world_size / N: DeepSpeed averages gradients over
ranks (the world_size cancels that) and is told not to divide by grad_accum (`scale_wrt_gas=False`), so the
step's gradient is exactly d(sum of all token losses of the step) / N. The logged loss is that same mean.
Otter divides each micro-batch's mean loss by GA instead, so a short batch weighs as much as a long one.

Data: the native loader, sharded by rank (round-robin batches, even across ranks), one new order per epoch
(its epoch-seeded plan). Micro-batches stream across epoch boundaries: an epoch's last batches that do not fill
an optimizer step go into the next step, so every epoch sees all the data once. With `epochs`, the run ends
after that many epochs (a last partial step is dropped); with `max_steps`, after that many steps (or at
whichever comes first when both are set). The LR schedule spans exactly the steps the run will take.

Validation (data.validation, eval_every): a held-out set, either whole groups of related samples held out of the
index (data/split.py; the training loader then plans from the rest) or a dataset of its own; every `eval_every`
steps and at the run's last step its token-mean loss (train/validation.py) is added to that step's metrics line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

FAULT_NAN = "OTTERFAST_TEST_NAN_AT_STEP"  # tests: make rank 0's loss NaN at this (1-based) optimizer step


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss); the message says why and what was saved."""


def run(cfg, config_source: str | None = None) -> dict:
    """Set up the process group, train, and always destroy the process group (else a rank aborts)."""
    from .deepspeed_setup import device_for, init_distributed, setup_env

    facts = setup_env()
    import torch.distributed as dist

    device = device_for(facts["local_rank"])
    init_distributed(device)
    try:
        return _train(cfg, facts["rank"], facts["world_size"], device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- pieces ---------------------------------------------------------------------------------------------

class LossModel(torch.nn.Module):
    """The engine's module: forward(batch) -> summed token loss (build.batch_loss), so that DeepSpeed's forward
    and backward hooks (ZeRO-3 gathering, gradient reduction) see a plain module call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        from ..models.build import batch_loss

        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "loss_weight" else v
                 for k, v in batch.items()}  # loss multipliers stay fp32 (0.2 is not exact in bf16)
        loss_sum, _ = batch_loss(self.model, batch)
        return loss_sum


def _index_dir(cfg, rank: int, source=None) -> str:
    """The prepared index: data.index as is, or data.yaml prepared once (rank 0; the others wait). An index already
    there is reused only if it was prepared with these options from these very inputs (data/fingerprint.py: the
    YAML, instruction and tokenizer files hashed, the image tables' size and mtime); otherwise refused, naming the
    first changed option or file (it may be another run's: deleting it is the user's call).
    `source`: (yaml, index, tokenizer, default folder name) of another dataset prepared the same way (validation);
    default: data.yaml, data.index, data.tokenizer, "index"."""
    import torch.distributed as dist

    from ..data import fingerprint

    d = cfg.data
    yaml, index, tokenizer, default_name = source or (d.yaml, d.index, d.tokenizer, "index")
    if yaml is None:
        if rank == 0 and d.repack != "never":
            from ..data.repack import needs_repack

            for why in needs_repack(index):  # a given index is the user's: say so, do not rewrite it
                print(f"[train] warning: {why} is read whole for every window of images; `otterfast data repack "
                      f"{index}` rewrites it for random access once", flush=True)
        if source is None and d.cache_pixels == "always":
            if rank == 0:
                _cache_pixels(index, cfg)  # asked for by name: the one thing written into a given index
            dist.barrier()  # every rank's loader looks for the cache once, when it is built
        return index
    out = index or os.path.join(cfg.output_dir, default_name)
    meta = os.path.join(out, "meta.json")
    tok = tokenizer or os.path.join(os.path.dirname(os.path.abspath(yaml)), "tokenizer")
    if rank == 0:
        want = dataclasses.asdict(d.prepare)
        if os.path.exists(meta):
            with open(meta) as f:
                have = json.load(f)
            diff = {k: (have["options"].get(k), v) for k, v in want.items() if have["options"].get(k) != v}
            if diff:
                raise ValueError(f"{out} was prepared with other options ({', '.join(f'{k}: {a!r} there, {b!r} here' for k, (a, b) in diff.items())}); "
                                 "delete it or point data.index elsewhere")
            if "inputs" not in have:
                raise ValueError(f"{out} was prepared without input fingerprints (an older otterfast): whether "
                                 f"{yaml} and its files are still what it was made from cannot be checked; "
                                 "delete it (it is prepared again) or point data.index elsewhere")
            changed = fingerprint.changes(have["inputs"], fingerprint.of_inputs(yaml, tok))
            if changed:
                more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
                raise ValueError(f"{out} was prepared from other inputs: {changed[0]}{more}; delete it (it is "
                                 "prepared again) or point data.index elsewhere")
        else:
            from ..data.prepare import prepare

            t = time.perf_counter()
            prepare(yaml, tok, out, d.prepare)
            print(f"[train] prepared {yaml} -> {out} ({time.perf_counter() - t:.1f}s)", flush=True)
        _repack(out, d.repack)
        if source is None:
            _cache_pixels(out, cfg)
    dist.barrier()
    return out


def _val_index_dir(cfg, rank: int, train_index_dir: str) -> str | None:
    """data.validation.index as is, or data.validation.yaml prepared like data.yaml (same prepare options; the
    training index's tokenizer unless data.tokenizer is set) into data.validation.index or OUTPUT_DIR/val_index.
    None without a dataset of its own."""
    v = cfg.data.validation
    if v.yaml is None and v.index is None:
        return None
    tok = cfg.data.tokenizer or os.path.join(train_index_dir, "tokenizer")
    return _index_dir(cfg, rank, (v.yaml, v.index, tok, "val_index"))


def _repack(index_dir: str, mode: str) -> None:
    """data.repack (rank 0, after prepare or reuse): rewrite image tables stored in huge row groups (data/repack.py)."""
    from ..data.repack import needs_repack, repack

    if mode == "never":
        return
    with open(os.path.join(index_dir, "meta.json")) as f:
        if "repacked" in json.load(f):
            return
    why = needs_repack(index_dir)
    if mode == "auto" and not why:
        return
    t = time.perf_counter()
    print(f"[train] repacking the image tables of {index_dir} for random access"
          + (f": {', '.join(why)}" if why else ""), flush=True)
    s = repack(index_dir, log=lambda m: print(f"[train] {m}", flush=True))
    print(f"[train] repacked {s['images']} images ({time.perf_counter() - t:.1f}s)", flush=True)


def _cache_pixels(index_dir: str, cfg) -> None:
    """data.cache_pixels (rank 0, after prepare and repack): decode every image once into the pixel cache the
    training loader then reads (data/pixel_cache.py). auto: only for a run of 2 or more epochs (the first epoch pays
    what each later one saves) whose cache takes at most a quarter of the free disk; never for Fuyu (no fixed size)."""
    import shutil
    import warnings

    from ..data import pixel_cache
    from ..data.index import PreparedIndex

    mode, lc = cfg.data.cache_pixels, cfg.data.loader
    if mode == "never" or lc.pixel_cache == "never":
        return
    ix = PreparedIndex(index_dir)
    if ix.format == "fuyu":
        if mode == "always":
            print("[train] data.cache_pixels: a Fuyu (OtterHD) index has no fixed-size pixels to cache; not cached",
                  flush=True)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a stale cache is rebuilt below: no need to warn about it
        if pixel_cache.find(ix, lc.image_transform, lc.image_size, lc.jpeg_draft) is not None:
            return
    need = ix.images.num_rows * 3 * lc.image_size ** 2
    if mode == "auto":
        if (cfg.epochs or 0) < 2:
            return
        free = shutil.disk_usage(index_dir).free
        if need > free // 4:
            print(f"[train] not caching pixels: {need / 2**30:.1f} GiB is over a quarter of the "
                  f"{free / 2**30:.1f} GiB free (data.cache_pixels: always to insist)", flush=True)
            return
    print(f"[train] caching the pixels of {ix.images.num_rows} images ({lc.image_transform} {lc.image_size} px, "
          f"{need / 2**20:.0f} MiB) for the epochs after the first", flush=True)
    try:
        s = pixel_cache.build(ix, lc.image_transform, lc.image_size, lc.jpeg_draft, threads=lc.num_threads,
                              if_missing=True)
    except (ValueError, RuntimeError, OSError) as e:  # DataError is a ValueError; e.g. the disk filled up
        if mode == "always":
            raise
        print(f"[train] warning: the pixel cache could not be built ({e}); the images are decoded every epoch",
              flush=True)
        return
    print(f"[train] cached {s['cached']} of {s['images']} images ({s['seconds']}s)"
          + (f"; not cached, decoded as before: {s['failed_by_kind']}" if s["failed"] else ""), flush=True)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: dict, device) -> dict:
    from ..data.loader import as_torch

    t = as_torch(batch)
    if device.type == "cpu":
        return t
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in t.items()}


def _allreduce(values: list[float], device):
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---- set-up ---------------------------------------------------------------------------------------------

@dataclass
class DataPlan:
    """This rank's loader and the run's length: optimizer steps in all, warmup steps, batches per epoch."""

    loader: object  # NativeLoader
    total: int
    warmup: int
    _lengths: dict = field(default_factory=dict)
    val: object = None  # validation.ValidationSet, when data.validation holds a set
    loss_weights: object = None  # per index row, its dataset's loss_weight (data/shards.py); None: all 1.0
    split: object = None  # data/split.Split, when data.validation.fraction held it out of the index

    def epoch_len(self, epoch: int) -> int:
        """This rank's batches in `epoch`, from the loader's plan (token counts only, no pixels)."""
        if epoch not in self._lengths:
            self._lengths[epoch] = len(self.loader.plan(epoch))
        return self._lengths[epoch]


def setup_data(cfg, index, index_dir: str, rank: int, world: int, val_index=None) -> DataPlan:
    """This rank's training loader and the run's length; with data.validation, the held-out set (a fraction of
    `index`, which the training loader then never sees, or `val_index`, a dataset of its own)."""
    from ..data.loader import NativeLoader
    from .optim import warmup_steps

    from ..data.batching import LoaderConfig
    from ..data.split import RestrictedIndex, holdout, shared_with
    from .validation import ValidationSet, validation_loader_config

    # the run's last epoch emits the leftover row that earlier epochs carry forward (batching.EpochPlanner)
    last_epoch = cfg.epochs - 1 if cfg.epochs is not None else -1
    lcfg = LoaderConfig.make(cfg.data.loader, seed=cfg.seed, rank=rank, world_size=world, last_epoch=last_epoch)
    if world > 1 and not lcfg.even_batches:
        # uneven batch counts give the ranks different step counts: the last collective would wait forever
        raise ValueError("data.loader.even_batches: false needs a single rank (with several, every rank must run "
                         "the same number of steps)")
    v = cfg.data.validation
    split, val_view = None, None
    if v.fraction is not None:
        split = holdout(index, v.fraction, v.seed)
        val_view = RestrictedIndex(index, split.val_rows, fixed=True)
        index = RestrictedIndex(index, split.train_rows)  # training plans from the rest only
    elif val_index is not None:
        _check_same_vocabulary(index, val_index)
        shared = shared_with(index, val_index)
        if shared and rank == 0:
            print(f"[train] warning: {shared} of {len(val_index)} samples of the validation index {val_index.path} "
                  f"share an instruction id or an image id with the training data: they are not held out",
                  flush=True)
        val_view = RestrictedIndex(val_index, np.arange(len(val_index)), fixed=True)
    from ..data.shards import sample_loss_weights

    plan = DataPlan(NativeLoader(index, lcfg), 0, 0, split=split, loss_weights=sample_loss_weights(index))
    if val_view is not None:
        plan.val = ValidationSet(NativeLoader(val_view, validation_loader_config(lcfg)), rank, world, v.max_batches,
                                 source=val_view.path)
    ga = cfg.grad_accum
    by_epochs = None
    if cfg.epochs is not None:
        batches = sum(plan.epoch_len(e) for e in range(cfg.epochs))
        by_epochs = batches // ga
        if by_epochs < 1:
            raise ValueError(f"{cfg.epochs} epoch(s) give {batches} batches per rank, fewer than grad_accum {ga}")
    if plan.epoch_len(0) == 0:
        raise ValueError(f"{index_dir}: no batches for {world} rank(s) (too little data for the batch size)")
    plan.total = min(x for x in (cfg.max_steps, by_epochs) if x is not None)
    plan.warmup = warmup_steps(plan.total, cfg.schedule.warmup_steps, cfg.schedule.warmup_ratio)
    return plan


def _check_same_vocabulary(index, val_index) -> None:
    """A validation dataset of its own must be tokenized as the training data (same format and tokenizer)."""
    if val_index.format != index.format or val_index.tok != index.tok:
        what = "format" if val_index.format != index.format else "tokenizer"
        raise ValueError(f"validation index {val_index.path} has another {what} than the training index "
                         f"{index.path}; prepare it with the same options and tokenizer")


def setup_model(cfg, index, precision: str, ds: dict):
    """The model (same initialisation on every rank), activation checkpointing set, and its FLOPs per token as
    (a, b) of a + b * L (None when the model has no estimate).

    At ZeRO stage 3 a model with a local checkpoint is built partitioned under deepspeed.zero.Init, its
    safetensors streamed into each rank's partition (train/zero3_init.py; `deepspeed.zero3_init: off` builds it
    whole as at stages 0-2, and deepspeed.initialize partitions it). Each rank prints its peak RSS once the
    model is ready. `ds`: the run's DeepSpeed config (zero.Init partitions by it)."""
    import torch.distributed as dist

    from ..models.build import (build_model, flops_per_token, load_model_config, set_activation_checkpointing,
                                unloaded)
    from . import zero3_init
    from .metrics import peak_memory_gb

    _seed_all(cfg.seed)
    mcfg = load_model_config(cfg.model.config or cfg.model.inline)
    arch = mcfg.architecture
    if (arch == "otterhd") != (index.format == "fuyu"):
        raise ValueError(f"model architecture {arch} does not fit index format {index.format!r} "
                         "(otterhd needs --format fuyu; otter needs simple/llama2/idefics)")
    parts = unloaded(mcfg, index.tok)
    if zero3_init.wanted(ds, cfg.deepspeed.zero3_init, parts):
        # a copy: zero.Init may fill in the config it is given, and the engine gets `ds` as it is
        model = zero3_init.build_partitioned(parts, copy.deepcopy(ds), getattr(torch, mcfg.dtype))
        counted, how = zero3_init.meta_twin(parts), "built partitioned under zero.Init, checkpoint streamed in"
    else:
        model = build_model(mcfg, index.tok)
        if precision == "fp32":
            model = model.float()
        counted, how = model, "built whole"
    model.train()
    set_activation_checkpointing(model, cfg.model.activation_checkpointing)
    try:  # FLOPs per token are linear in the sequence length: a + b * L; counted on whole parameters
        f0 = float(flops_per_token(counted, 0))
        flops = (f0, float(flops_per_token(counted, 1)) - f0)
    except Exception:  # a model without an estimate: no MFU
        flops = None
    rank = dist.get_rank() if dist.is_initialized() else 0
    print(f"[train] rank {rank}: model {how}; peak RSS {peak_memory_gb(torch.device('cpu')) * 1024:.0f} MiB",
          flush=True)
    return model, arch, flops


def setup_engine(cfg, model, plan: DataPlan, ds: dict, device):
    from .deepspeed_setup import make_engine
    from .optim import make_scheduler, param_groups

    groups, counts = param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_embeddings)
    s = cfg.schedule

    def scheduler_fn(opt):
        return make_scheduler(opt, plan.total, plan.warmup, s.name, s.min_lr_ratio)

    return make_engine(LossModel(model), groups, cfg, ds, scheduler_fn, device), counts


# ---- one optimizer step ---------------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float  # token mean over the step (all micro-batches, all ranks)
    local_loss_sum: float
    labelled: float
    tokens: float  # non-pad tokens, all ranks
    slots: float
    samples: float
    finite: bool


def train_step(engine, micro: list[dict], device, world: int, nan_now: bool) -> StepResult:
    """Forward and backward of the step's micro-batches, each weighted so that every labelled token of the step
    weighs the same (the module docstring); the optimizer step itself is the caller's (after the NaN check)."""
    local = [0.0, 0.0, 0.0, 0.0]  # labelled tokens, non-pad tokens, token slots, samples
    for b in micro:
        local[0] += float((b["labels"][:, 1:] != -100).sum())
        local[1] += float(b["attention_mask"].sum())
        local[2] += float(b["attention_mask"].size)
        local[3] += float(len(b["sample_index"]))
    n_lab, n_tok, n_slots, n_samples = _allreduce(local, device)
    scale = world / max(n_lab, 1.0)
    loss_local = torch.zeros((), dtype=torch.float64, device=device)
    for i, b in enumerate(micro):
        loss_sum = engine(_to_device(b, device))
        if nan_now and i == 0:
            loss_sum = loss_sum * float("nan")
        loss_local += loss_sum.detach().double()
        engine.backward(loss_sum * scale, scale_wrt_gas=False)
        if i < len(micro) - 1:
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
    local_sum = float(loss_local)
    loss_total, bad = _allreduce([local_sum, 0.0 if math.isfinite(local_sum) else 1.0], device)
    loss = loss_total / max(n_lab, 1.0)
    return StepResult(loss, local_sum, n_lab, n_tok, n_slots, n_samples, not bad and math.isfinite(loss))


# ---- the run --------------------------------------------------------------------------------------------

def plan_fingerprint(cfg, plan: DataPlan, world: int) -> dict:
    """Every setting that decides which micro-batches make which optimizer step, by config key: a checkpoint's data
    position (epoch, batches) means the same batches only under the same values. The prepared index counts by its
    digest (inputs, prepare options, token counts: data/index.py). Not in it, on purpose: max_steps, epochs and
    the schedule (the run's length; the plan's batches stay the same: the last epoch's leftover row is an extra
    batch after all others, batching.EpochPlanner), image_size/transform, on_error, threads, eval_every and a
    validation dataset of its own (data.validation.yaml/index: the training plan does not depend on them)."""
    loader, split = plan.loader, plan.split
    lc = loader.cfg
    return {"seed": cfg.seed, "world_size": world, "grad_accum": cfg.grad_accum,
            "data.loader.batch_size": lc.batch_size, "data.loader.pack": lc.pack,
            "data.loader.capacity": loader.capacity, "data.loader.window": lc.window,
            "data.loader.shuffle_batches": lc.shuffle_batches, "data.loader.even_batches": lc.even_batches,
            "data.loader.carry_last_row": lc.carry_last_row, "data.loader.last_epoch": lc.last_epoch,
            "data": loader.index.fingerprint(),
            # the fraction split decides which samples the training loader sees (a separate dataset does not); a
            # checkpoint saved without these keys reads them as None, the values of a run without the split
            "data.validation.fraction": split.fraction if split else None,
            "data.validation.seed": split.seed if split else None,
            "data.validation.held_out": f"{len(split.val_rows)} rows {split.digest()}" if split else None}


class Run:
    """What the loop carries from step to step, and the checkpoint it saves."""

    def __init__(self, cfg, engine, plan: DataPlan, rank: int, world: int, precision: str, config_yaml: str, say):
        self.cfg, self.engine, self.plan, self.rank, self.world = cfg, engine, plan, rank, world
        self.precision = precision
        self.config_yaml, self.say = config_yaml, say
        self.step, self.tokens_seen, self.last_saved = 0, 0, None
        self.quick_eval = None  # step -> eval_* metrics (train/quick_eval.py), when eval_run is configured
        self.plan_key = plan_fingerprint(cfg, plan, world)

    def resume(self, path: str) -> None:
        from . import checkpoint as ck

        trainer, mine = ck.load(self.engine, path, self.rank, self.world, self.plan_key)
        self.plan.loader.load_state_dict(mine["loader"])
        ck.set_rng_state(mine["rng"])
        self.step, self.tokens_seen, self.last_saved = trainer["step"], trainer["tokens_seen"], trainer["step"]
        self.say(f"resumed from {path}: step {self.step}, loader {mine['loader']}")

    def save(self, at_step: int, loader_state: dict, rng: dict) -> str:
        from . import checkpoint as ck

        trainer = {"step": at_step, "world_size": self.world, "tokens_seen": self.tokens_seen,
                   "total_steps": self.plan.total, "loader": loader_state, "plan": self.plan_key, "time": time.time()}
        path = ck.save(self.engine, self.cfg.output_dir, at_step, self.rank, {"loader": loader_state, "rng": rng},
                       trainer, self.config_yaml, self.cfg.keep_last)
        self.last_saved = at_step
        self.say(f"checkpoint {path}")
        return path

    def batches(self):
        """Micro-batches across epoch boundaries, until the configured epochs end."""
        loader = self.plan.loader
        while True:
            yield from loader
            if self.cfg.epochs is not None and loader.epoch >= self.cfg.epochs:
                return


def _train(cfg, rank: int, world: int, device) -> dict:
    from ..data.index import PreparedIndex
    from . import checkpoint as ck
    from .config import dump
    from .deepspeed_setup import ds_config, resolve_precision

    def say(msg):
        if rank == 0:
            print(f"[train] {msg}", flush=True)

    out = cfg.output_dir
    precision = resolve_precision(cfg.precision, device)
    if precision == "bf16" and device.type == "cpu":
        raise ValueError("precision bf16 needs a GPU here (fp32 on the CPU: gloo, no fast bf16 matmuls)")
    resume_from = ck.find_resume(cfg.resume, out)
    if cfg.resume == "off" and ck.complete_checkpoints(out):
        raise ValueError(f"{out} already holds checkpoints and resume is off: use resume: auto, a checkpoint "
                         "path, or a new output_dir (a second run would mix its checkpoints with these)")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    index_dir = _index_dir(cfg, rank)
    index = PreparedIndex(index_dir)
    val_dir = _val_index_dir(cfg, rank, index_dir)
    ds = ds_config(cfg, precision, cfg.data.loader.batch_size, world)  # one config: zero.Init and the engine
    model, arch, flops = setup_model(cfg, index, precision, ds)
    plan = setup_data(cfg, index, index_dir, rank, world, PreparedIndex(val_dir) if val_dir else None)
    quick = None
    if cfg.eval_run.config:  # checked now, not at the first checkpoint
        from .quick_eval import QuickEval

        quick = QuickEval(cfg.eval_run, arch, out, str(device))
    engine, counts = setup_engine(cfg, model, plan, ds, device)
    say(f"model {arch}: {counts['trainable'] / 1e6:.2f}M trainable ({counts['decay'] / 1e6:.2f}M with weight decay), "
        f"{counts['frozen'] / 1e6:.2f}M frozen; precision {precision}; ZeRO {cfg.deepspeed.zero_stage}; "
        f"activation checkpointing {cfg.model.activation_checkpointing}; {world} rank(s) on {device.type}")
    run = Run(cfg, engine, plan, rank, world, precision, dump(cfg), say)
    lc = plan.loader.cfg
    export_meta = {"format": index.format, "image_transform": lc.image_transform, "image_size": lc.image_size}
    if quick is not None:
        run.quick_eval = lambda step: quick.run(engine, model, step, index_dir, rank, export_meta)
    if resume_from:
        run.resume(resume_from)
    else:
        _seed_all(cfg.seed + 1 + rank)
    if rank == 0:
        with open(os.path.join(out, "config.yaml"), "w") as f:
            f.write(run.config_yaml)
    say(f"{plan.total} optimizer steps ({cfg.grad_accum} micro-batch(es) of {lc.batch_size} row(s) x {world} rank(s) "
        f"each; {plan.epoch_len(0)} batches per rank in epoch 0); warmup {plan.warmup}; schedule {cfg.schedule.name}; "
        f"output {out}")
    if plan.val is not None:
        vs, sp = plan.val, plan.split
        held = (f"{len(sp.val_rows)} of {len(index)} samples held out of the training data ({sp.val_groups} of "
                f"{sp.groups} groups of related samples, split seed {sp.seed})") if sp else f"{vs.source}"
        say(f"validation: {held}; {vs.samples} samples in {len(vs.batches)} batch(es) per pass"
            + (f", every {cfg.eval_every} steps and" if cfg.eval_every else "") + " at the last step")
    if quick is not None:
        names = ", ".join(d.get("name") or d["task"] for d in quick.doc["datasets"])
        when = f"every checkpoint (save_every {cfg.save_every}) and " if cfg.save_every else ""
        say(f"quick eval: {cfg.eval_run.config} ({names}; limit {cfg.eval_run.limit}) at {when}the last step; "
            f"results in {os.path.join(out, 'evals')}")
    summary = _loop(run, device, flops)
    if summary["finished"] and cfg.export:
        from .export import export

        path = export(engine, model, out, index_dir, rank, meta=export_meta)
        say(f"export (transformers, safetensors) {path}")
        summary["export"] = os.path.join(out, "export")
    say(f"done: step {run.step}/{plan.total}" + ("" if run.step >= plan.total else " (stopped early: stop_at_step)"))
    return summary


def _loop(run: Run, device, flops) -> dict:
    """Optimizer steps until the end (or stop_at_step), one metrics line each, checkpoints as configured."""
    from . import checkpoint as ck
    from .config import to_dict
    from .metrics import Metrics, StepTimer, peak_tflops

    cfg, engine, plan, loader = run.cfg, run.engine, run.plan, run.plan.loader
    # DeepSpeed reports no grad norm at stage 0 in fp32: computed here before the step
    manual_gn = engine.zero_optimization_stage() == 0 and run.precision == "fp32"
    peak = peak_tflops(device, cfg.logging.peak_tflops)
    metrics = Metrics(cfg.output_dir, cfg, run.rank, plan.total, run.step, to_dict(cfg))
    stop_at = min(plan.total, cfg.stop_at_step) if cfg.stop_at_step else plan.total
    fault_nan = int(os.environ.get(FAULT_NAN, "0") or 0)
    batches, timer = run.batches(), StepTimer()
    summary = {"losses": [], "output_dir": cfg.output_dir}
    try:
        while run.step < stop_at:
            start_loader, start_rng = loader.state_dict(), ck.rng_state()
            micro = [b for _, b in zip(range(cfg.grad_accum), batches)]  # range first: no batch taken beyond
            if len(micro) < cfg.grad_accum:  # the last epoch ended inside a step: dropped (the schedule did not count it)
                break
            if plan.loss_weights is not None:  # per-source loss multipliers (pretraining shards' loss_weight)
                from ..data.shards import token_loss_weights

                for b in micro:
                    b["loss_weight"] = token_loss_weights(b, plan.loss_weights)
            nan_now = bool(fault_nan) and run.step + 1 == fault_nan and run.rank == 0
            r = train_step(engine, micro, device, run.world, nan_now)
            if not r.finite:
                _stop_on_nan(cfg, run.rank, run.step, micro, r.local_loss_sum, cfg.output_dir, run.save,
                             run.last_saved, start_loader, start_rng, run.say)
            gn_manual = _local_grad_norm(engine) if manual_gn else None
            lr = float(engine.get_lr()[0])
            engine.step()
            gn = engine.get_global_grad_norm()
            gn = gn_manual if gn is None else float(gn)
            run.step += 1
            run.tokens_seen += int(r.tokens)
            rec = _record(run, r, gn, lr, timer.lap(), loader.state_dict(), flops, peak, device)
            if plan.val is not None and (run.step == plan.total or (cfg.eval_every and run.step % cfg.eval_every == 0)):
                rec.update(_validate(engine, plan.val, device))
            at_checkpoint = run.step == stop_at or (cfg.save_every and run.step % cfg.save_every == 0)
            if run.quick_eval is not None and at_checkpoint:
                rec.update(run.quick_eval(run.step))
            metrics.log(rec)
            summary["losses"].append(r.loss)
            if gn is not None and not math.isfinite(gn):
                raise TrainingStopped(
                    f"gradient norm is {gn} at step {run.step} (loss {r.loss:.4f} was finite): the update is applied "
                    f"and the weights are no longer trustworthy; resume from the last checkpoint "
                    f"({'step_' + str(run.last_saved) if run.last_saved else 'none'}) with a lower lr or more clipping")
            if cfg.save_every and run.step % cfg.save_every == 0 and run.step < stop_at:
                run.save(run.step, loader.state_dict(), ck.rng_state())
            timer.lap()  # saving and validation are not training time
        if run.last_saved != run.step and run.step > 0:
            run.save(run.step, loader.state_dict(), ck.rng_state())
        summary.update(step=run.step, total_steps=plan.total, finished=run.step >= plan.total)
    finally:
        metrics.close()
    return summary


def _validate(engine, vset, device) -> dict:
    """A validation pass (train/validation.py) in eval mode, then back to training. The RNG states are put back
    as they were, so a run's training is the same with or without validation (and resumes as exactly)."""
    from . import checkpoint as ck
    from .validation import validation_loss

    rng = ck.rng_state()
    engine.eval()
    try:
        return validation_loss(engine, vset, device, lambda b: _to_device(b, device))
    finally:
        engine.train()
        ck.set_rng_state(rng)


def _local_grad_norm(engine):
    from .deepspeed_setup import local_grad_norm

    return local_grad_norm(engine.module)


def _record(run: Run, r: StepResult, gn, lr: float, dt: float, st: dict, flops, peak, device) -> dict:
    """One metrics line."""
    from .metrics import peak_memory_gb

    n_ep = run.plan.epoch_len(st["epoch"])
    rec = {"step": run.step, "epoch": st["epoch"] + (st["batches"] / n_ep if n_ep else 0.0), "loss": r.loss,
           "grad_norm": gn, "lr": lr, "tokens_per_s": r.tokens / dt, "samples_per_s": r.samples / dt,
           "padding": 1.0 - r.tokens / max(r.slots, 1.0), "labelled_tokens": int(r.labelled), "tokens": int(r.tokens),
           "tokens_seen": run.tokens_seen, "step_s": dt, "peak_mem_gb": peak_memory_gb(device), "mfu": None}
    if flops is not None and peak and r.samples:
        mean_len = r.tokens / r.samples
        rec["mfu"] = (flops[0] + flops[1] * mean_len) * (r.tokens / dt / run.world) / (peak * 1e12)
    return rec


def _stop_on_nan(cfg, rank, step, micro, local_loss, out, save, last_saved, start_loader, start_rng, say):
    """Save the pre-step state (weights untouched: the optimizer step was not taken) and stop with a report."""
    import torch.distributed as dist

    ids = [list(b.get("sample_id", [])) for b in micro]
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, {"rank": rank, "loss_sum": local_loss, "sample_ids": ids})
    path = None
    if last_saved != step and step > 0:
        path = save(step, start_loader, start_rng)
    elif last_saved == step and step > 0:
        path = os.path.join(out, "checkpoints", f"step_{step}")
    if rank == 0:
        with open(os.path.join(out, "nan_report.json"), "w") as f:
            json.dump({"step": step + 1, "ranks": reports}, f, indent=1)
    bad = [r["rank"] for r in reports if not math.isfinite(r["loss_sum"])]
    msg = (f"loss is not finite at optimizer step {step + 1} (rank(s) {bad}); stopped before applying the update. "
           + (f"Weights and data position after step {step} saved at {path}. " if path else "Nothing to save (step 0). ")
           + f"The step's sample ids are in {os.path.join(out, 'nan_report.json')}.")
    say(msg)
    raise TrainingStopped(msg)
