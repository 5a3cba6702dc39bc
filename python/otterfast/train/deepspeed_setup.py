"""DeepSpeed: process environment, the DeepSpeed config (from our YAML or a user JSON), the engine.

One process without a launcher gets RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR=127.0.0.1 and a free
MASTER_PORT; `torchrun` and the `deepspeed` launcher set them for every rank (the latter also passes
`--local_rank`, which the CLI accepts and ignores: LOCAL_RANK wins). Without CUDA, DS_ACCELERATOR=cpu and
the gloo backend; with CUDA, one GPU per LOCAL_RANK and NCCL.

Precision: bf16 on a GPU (DeepSpeed casts the model to bf16 and keeps fp32 master weights in the optimizer),
fp32 on the CPU (gloo has no bf16 all-reduce fast path and CPU bf16 matmuls are slower here).

The optimizer is torch's AdamW handed to DeepSpeed as the client optimizer (fused=True on CUDA), unless the
optimizer state is offloaded to the CPU: DeepSpeed then needs its own DeepSpeedCPUAdam (configured through the
"optimizer" section), which JIT-compiles a C++ op (~70 s the first time, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys


def setup_env() -> dict:
    """Launcher variables (defaults for a single process) and the accelerator; returns rank facts."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed JIT-builds its shared-memory CPU all-reduce with ninja, looked up on PATH; a virtualenv that is
    # not activated (`.venv/bin/otterfast ...`) has it next to the interpreter only.
    here = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and os.path.exists(os.path.join(here, "ninja")):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    return {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]),
            "local_rank": int(os.environ["LOCAL_RANK"])}


def device_for(local_rank: int):
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device) -> None:
    import deepspeed

    if shutil.which("ninja") is None:
        # No compiler driver: skip DeepSpeed's optional shared-memory all-reduce op (plain gloo is used).
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def resolve_precision(precision: str, device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def uses_client_optimizer(cfg) -> bool:
    z = cfg.deepspeed
    if z.optimizer == "torch":
        return True
    if z.optimizer == "deepspeed":
        return False
    return not z.offload_optimizer


def ds_config(cfg, precision: str, micro_batch_rows: int, world_size: int) -> dict:
    """The DeepSpeed config dict: a user JSON (its "auto" values filled) or built from our YAML."""
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch_rows,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch_rows * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.deepspeed.grad_clip,
        "steps_per_print": 10**12,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    z = cfg.deepspeed
    if z.config:
        with open(z.config) as f:
            user = json.load(f)
        if "scheduler" in user:
            raise ValueError(f"{z.config}: has a 'scheduler' section; the schedule is set by schedule.* "
                             "(counted in optimizer steps), remove it")
        for k, v in ours.items():
            if user.get(k, "auto") == "auto":
                user[k] = v
            elif k in ("gradient_accumulation_steps", "train_micro_batch_size_per_gpu") and user[k] != v:
                # Otter's zero2 YAML says GA 4 while its scripts pass 2 (reference 5.4): refuse the ambiguity.
                raise ValueError(f"{z.config}: {k} is {user[k]} but the training config gives {v}; "
                                 f"set it to \"auto\" or make them agree")
        zo = user.get("zero_optimization", {})
        if zo.get("stage") == "auto":
            zo["stage"] = z.zero_stage
        user["train_batch_size"] = (user["train_micro_batch_size_per_gpu"] * user["gradient_accumulation_steps"]
                                    * world_size)
        for p in ("bf16", "fp16"):
            if user.get(p, {}).get("enabled") == "auto":
                user[p]["enabled"] = precision == p
        if "optimizer" in user:
            for k, v in user["optimizer"].get("params", {}).items():
                if v == "auto":
                    user["optimizer"]["params"][k] = _optimizer_params(cfg)[k]
        return user
    zero: dict = {"stage": z.zero_stage}
    if z.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if z.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # for the consolidated export
    out = dict(ours, zero_optimization=zero)
    if precision == "bf16":
        out["bf16"] = {"enabled": True}
    if not uses_client_optimizer(cfg):
        out["optimizer"] = {"type": "AdamW", "params": _optimizer_params(cfg)}
        out["zero_force_ds_cpu_optimizer"] = bool(z.offload_optimizer)
    else:
        out["zero_allow_untested_optimizer"] = True  # torch AdamW under ZeRO: used by HF Trainer alike
    return out


def _optimizer_params(cfg) -> dict:
    o = cfg.optim
    return {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}


def make_engine(module, groups, cfg, ds_cfg: dict, scheduler_fn, device):
    """deepspeed.initialize with our param groups, optimizer (or DeepSpeed's) and the LR schedule."""
    import deepspeed
    import torch

    optimizer = None
    if "optimizer" not in ds_cfg:
        o = cfg.optim
        kw = {"fused": True} if device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **kw)
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=groups, optimizer=optimizer,
                                           lr_scheduler=scheduler_fn, config=ds_cfg)
    return engine


def local_grad_norm(module) -> float | None:
    """Global norm of the gradients held in `module` (call at the boundary, before engine.step()).

    DeepSpeed keeps the norm it clips with under ZeRO and bf16 (`engine.get_global_grad_norm()` after the step);
    plain fp32 at stage 0 clips without keeping it, and there the module's gradients are already all-reduced
    (full, identical on every rank) when the boundary backward returns.
    """
    import torch

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
