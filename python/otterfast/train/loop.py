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
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time

import numpy as np

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

def _loss_module(model):
    """The engine's module: forward(batch) -> summed token loss (build.batch_loss), so that DeepSpeed's forward
    and backward hooks (ZeRO-3 gathering, gradient reduction) see a plain module call."""
    import torch

    from ..models.build import batch_loss

    class LossModel(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, batch):
            dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
            batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
            loss_sum, _ = batch_loss(self.model, batch)
            return loss_sum

    return LossModel(model)


def _index_dir(cfg, rank: int) -> str:
    """The prepared index: data.index as is, or data.yaml prepared once (rank 0; the others wait)."""
    import dataclasses

    import torch.distributed as dist

    d = cfg.data
    if d.yaml is None:
        return d.index
    out = d.index or os.path.join(cfg.output_dir, "index")
    meta = os.path.join(out, "meta.json")
    if rank == 0:
        want = dataclasses.asdict(d.prepare)
        if os.path.exists(meta):
            with open(meta) as f:
                have = json.load(f)["options"]
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            if diff:
                raise ValueError(f"{out} was prepared with other options ({', '.join(f'{k}: {a!r} there, {b!r} here' for k, (a, b) in diff.items())}); "
                                 "delete it or point data.index elsewhere")
        else:
            from ..data.prepare import prepare

            tok = d.tokenizer or os.path.join(os.path.dirname(os.path.abspath(d.yaml)), "tokenizer")
            t = time.perf_counter()
            prepare(d.yaml, tok, out, d.prepare)
            print(f"[train] prepared {d.yaml} -> {out} ({time.perf_counter() - t:.1f}s)", flush=True)
    dist.barrier()
    return out


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: dict, device) -> dict:
    from ..data.reference import as_torch

    t = as_torch(batch)
    if device.type == "cpu":
        return t
    return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in t.items()}


def _allreduce(values: list[float], device):
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _epoch_lengths(loader_cls, index, lcfg):
    """epoch -> number of this rank's batches, from the plan (token counts only, no pixels)."""
    counter = loader_cls(index, lcfg)
    cache: dict[int, int] = {}

    def n(epoch: int) -> int:
        if epoch not in cache:
            counter.epoch = epoch
            cache[epoch] = len(counter.plan())
        return cache[epoch]

    return n


# ---- the run --------------------------------------------------------------------------------------------

def _train(cfg, rank: int, world: int, device) -> dict:
    import dataclasses

    import torch
    import torch.distributed as dist

    from ..data.batching import LoaderConfig
    from ..data.index import PreparedIndex
    from ..data.loader import NativeLoader
    from ..models.build import build_model, flops_per_token, load_model_config
    from . import checkpoint as ck
    from .config import dump, to_dict
    from .deepspeed_setup import ds_config, local_grad_norm, make_engine, resolve_precision
    from .export import export
    from .metrics import Metrics, StepTimer, peak_memory_gb, peak_tflops
    from .optim import make_scheduler, param_groups, warmup_steps

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

    # Model: identical initialisation on every rank (same seed), then a per-rank stream for dropout etc.
    _seed_all(cfg.seed)
    mcfg = load_model_config(cfg.model.config or cfg.model.inline)
    arch = getattr(mcfg, "architecture", "?")
    if (arch == "otterhd") != (index.format == "fuyu"):
        raise ValueError(f"model architecture {arch} does not fit index format {index.format!r} "
                         "(otterhd needs --format fuyu; otter needs simple/llama2/idefics)")
    model = build_model(mcfg, index.tok)
    if precision == "fp32":
        model = model.float()
    model.train()
    try:  # FLOPs per token are linear in the sequence length: a + b * L; measured once, before partitioning
        f0 = float(flops_per_token(model, 0))
        f1 = float(flops_per_token(model, 1)) - f0
    except Exception:  # a model without an estimate: no MFU
        f0 = f1 = None
    module = _loss_module(model)
    groups, prep = param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_embeddings)
    say(f"model {arch}: {prep['trainable'] / 1e6:.2f}M trainable ({prep['decay'] / 1e6:.2f}M with weight decay), "
        f"{prep['frozen'] / 1e6:.2f}M frozen; precision {precision}; ZeRO {cfg.deepspeed.zero_stage}; "
        f"{world} rank(s) on {device.type}")

    # Data and the schedule's length.
    lfields = {f.name: getattr(cfg.data.loader, f.name) for f in dataclasses.fields(LoaderConfig)}
    lcfg = LoaderConfig.make(None, **dict(lfields, seed=cfg.seed, rank=rank, world_size=world))
    if world > 1 and not lcfg.even_batches:
        # uneven batch counts give the ranks different step counts: the last collective would wait forever
        raise ValueError("data.loader.even_batches: false needs a single rank (with several, every rank must run "
                         "the same number of steps)")
    loader = NativeLoader(index, lcfg)
    epoch_len = _epoch_lengths(NativeLoader, index, lcfg)
    ga = cfg.grad_accum
    by_epochs = None
    if cfg.epochs is not None:
        by_epochs = sum(epoch_len(e) for e in range(cfg.epochs)) // ga
        if by_epochs < 1:
            raise ValueError(f"{cfg.epochs} epoch(s) give {sum(epoch_len(e) for e in range(cfg.epochs))} batches "
                             f"per rank, fewer than grad_accum {ga}")
    total = min(x for x in (cfg.max_steps, by_epochs) if x is not None)
    if epoch_len(0) == 0:
        raise ValueError(f"{index_dir}: no batches for {world} rank(s) (too little data for the batch size)")
    warm = warmup_steps(total, cfg.schedule.warmup_steps, cfg.schedule.warmup_ratio)
    s = cfg.schedule

    def scheduler_fn(opt):
        return make_scheduler(opt, total, warm, s.name, s.min_lr_ratio)

    ds = ds_config(cfg, precision, lcfg.batch_size, world)
    engine = make_engine(module, groups, cfg, ds, scheduler_fn, device)
    stage = engine.zero_optimization_stage()

    # Resume or start.
    step, tokens_seen, last_saved = 0, 0, None
    if resume_from:
        trainer, mine = ck.load(engine, resume_from, rank, world)
        loader.load_state_dict(mine["loader"])
        ck.set_rng_state(mine["rng"])
        step, tokens_seen, last_saved = trainer["step"], trainer["tokens_seen"], trainer["step"]
        say(f"resumed from {resume_from}: step {step}, loader {mine['loader']}")
    else:
        _seed_all(cfg.seed + 1 + rank)
    config_yaml = dump(cfg)
    if rank == 0:
        with open(os.path.join(out, "config.yaml"), "w") as f:
            f.write(config_yaml)
    say(f"{total} optimizer steps ({ga} micro-batch(es) of {lcfg.batch_size} row(s) x {world} rank(s) each; "
        f"{epoch_len(0)} batches per rank in epoch 0); warmup {warm}; schedule {s.name}; output {out}")

    peak = peak_tflops(device, cfg.logging.peak_tflops)
    metrics = Metrics(out, cfg, rank, total, step, to_dict(cfg))
    stop_at = min(total, cfg.stop_at_step) if cfg.stop_at_step else total

    def stream():
        while True:
            for b in loader:
                yield b
            if cfg.epochs is not None and loader.epoch >= cfg.epochs:
                return

    batches = stream()

    def save(at_step, loader_state, rng):
        nonlocal last_saved
        trainer = {"step": at_step, "world_size": world, "tokens_seen": tokens_seen, "total_steps": total,
                   "loader": loader_state, "time": time.time()}
        path = ck.save(engine, out, at_step, rank, {"loader": loader_state, "rng": rng}, trainer, config_yaml,
                       cfg.keep_last)
        last_saved = at_step
        say(f"checkpoint {path}")
        return path

    fault_nan = int(os.environ.get(FAULT_NAN, "0") or 0)
    timer = StepTimer()
    summary = {"losses": [], "output_dir": out}
    try:
        while step < stop_at:
            start_loader, start_rng = loader.state_dict(), ck.rng_state()
            micro = []
            for _ in range(ga):
                b = next(batches, None)
                if b is None:
                    break
                micro.append(b)
            if len(micro) < ga:  # the last epoch ended inside a step: dropped (the schedule did not count it)
                break
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
                if fault_nan and step + 1 == fault_nan and rank == 0 and i == 0:
                    loss_sum = loss_sum * float("nan")
                loss_local += loss_sum.detach().double()
                engine.backward(loss_sum * scale, scale_wrt_gas=False)
                if i < ga - 1:
                    engine.step()  # not a boundary: DeepSpeed only counts the micro-step
            loss_total, bad = _allreduce([float(loss_local), 0.0 if math.isfinite(float(loss_local)) else 1.0],
                                         device)
            loss = loss_total / max(n_lab, 1.0)
            if bad or not math.isfinite(loss):
                _stop_on_nan(cfg, rank, step, micro, float(loss_local), out, save, last_saved, start_loader,
                             start_rng, say)
            manual_gn = local_grad_norm(engine.module) if stage == 0 and precision == "fp32" else None
            lr = float(engine.get_lr()[0])
            engine.step()
            gn = engine.get_global_grad_norm()
            gn = manual_gn if gn is None else float(gn)
            step += 1
            tokens_seen += int(n_tok)
            dt = timer.lap()
            st = loader.state_dict()
            n_ep = epoch_len(st["epoch"])
            rec = {"step": step, "epoch": st["epoch"] + (st["batches"] / n_ep if n_ep else 0.0), "loss": loss,
                   "grad_norm": gn, "lr": lr, "tokens_per_s": n_tok / dt, "samples_per_s": n_samples / dt,
                   "padding": 1.0 - n_tok / max(n_slots, 1.0), "labelled_tokens": int(n_lab), "tokens": int(n_tok),
                   "tokens_seen": tokens_seen, "step_s": dt, "peak_mem_gb": peak_memory_gb(device), "mfu": None}
            if f0 is not None and peak and n_samples:
                mean_len = n_tok / n_samples
                rec["mfu"] = (f0 + f1 * mean_len) * (n_tok / dt / world) / (peak * 1e12)
            metrics.log(rec)
            summary["losses"].append(loss)
            if gn is not None and not math.isfinite(gn):
                raise TrainingStopped(
                    f"gradient norm is {gn} at step {step} (loss {loss:.4f} was finite): the update is applied and "
                    f"the weights are no longer trustworthy; resume from the last checkpoint "
                    f"({'step_' + str(last_saved) if last_saved else 'none'}) with a lower lr or more clipping")
            if cfg.save_every and step % cfg.save_every == 0 and step < stop_at:
                save(step, loader.state_dict(), ck.rng_state())
            timer.lap()  # saving is not training time
        if last_saved != step and step > 0:
            save(step, loader.state_dict(), ck.rng_state())
        summary.update(step=step, total_steps=total, finished=step >= total)
        if step >= total and cfg.export:
            path = export(engine, model, out, index_dir, rank,
                          meta={"format": index.format, "image_transform": lcfg.image_transform,
                                "image_size": lcfg.image_size})
            say(f"export (transformers, safetensors) {path}")
            summary["export"] = os.path.join(out, "export")
    finally:
        metrics.close()
    say(f"done: step {step}/{total}" + ("" if step >= total else " (stopped early: stop_at_step)"))
    return summary


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
