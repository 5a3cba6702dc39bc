"""The training config: one YAML, typed sections, `--set a.b=c` overrides, validated on load.

    cfg = load_config("configs/train/demo-otterhd.yaml", overrides=["optim.lr=3e-4", "max_steps=20"])

Every key has a type (the dataclass annotations below, plus the loader's `LoaderConfig` and prepare's
`PrepareOptions`, reused as sections so that their options cannot drift from the data code). An unknown or
mistyped key is an error naming its full path and listing the valid keys of its section; a value of the wrong
type names the key and the expected type. Relative paths are relative to the directory `otterfast train` runs
in (the repository root for the shipped configs), as in litgpt and axolotl.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import yaml

from ..config import ConfigError, Rules, build, load_document, parse_overrides
from ..data.batching import LoaderConfig
from ..data.prepare import PrepareOptions

__all__ = ["ConfigError", "TrainConfig", "dump", "load_config", "parse_overrides", "to_dict", "validate"]


@dataclass
class ModelSection:
    config: str | None = None  # a model YAML (configs/models/*.yaml), or ...
    inline: dict | None = None  # ... the same keys inline (exactly one of the two)
    # none | decoder (each decoder layer, with Otter's cross-attention block, recomputed in backward) | all (also
    # Otter's perceiver blocks, and CLIP's layers when they train): less activation memory for ~1/3 more compute
    activation_checkpointing: str = "none"


@dataclass
class ValidationSection:
    """The held-out set `eval_every` (and the run's end) computes the validation loss on (docs/train.md).
    Either a fraction of the training index (whole groups of related samples, data/split.py) or a dataset of its
    own (`yaml` prepared like data.yaml, or a prepared `index`)."""

    fraction: float | None = None  # hold out this fraction of the training samples (e.g. 0.02)
    seed: int = 0  # the fraction split's seed; not the run's `seed`, so runs with other seeds hold out the same set
    yaml: str | None = None  # or a dataset YAML, prepared once by rank 0 into `index` (default OUTPUT_DIR/val_index)
    index: str | None = None  # or a prepared index (with `yaml`: where to prepare it)
    max_batches: int | None = None  # each pass: only the first N batches of the fixed validation plan (all ranks)


@dataclass
class EvalRunSection:
    """A quick `otterfast eval run` on the model at each checkpoint (train/quick_eval.py, docs/train.md)."""

    config: str | None = None  # an `otterfast eval run` YAML; its `models` and `output` are replaced by the run's
    limit: int | None = 50  # rows per dataset (null: the YAML's own limit, or every row)
    decode: dict | None = None  # decode settings for the run's model (max_new_tokens, num_beams, ...)
    dtype: str | None = None  # the evaluated model's dtype (default: as exported)
    keep_export: bool = False  # keep OUTPUT_DIR/evals/step_N/export (the model's full size each time)


@dataclass
class DataSection:
    index: str | None = None  # a prepared index dir (`otterfast data prepare`); with `yaml`: where to prepare it
    yaml: str | None = None  # or a dataset YAML (MIMIC-IT), prepared once by rank 0 into `index`
    tokenizer: str | None = None  # with `yaml`: the tokenizer folder (default: the YAML's folder/tokenizer)
    prepare: PrepareOptions = field(default_factory=PrepareOptions)  # `otterfast data prepare` options
    # The loader's options (docs/loader.md); seed, rank, world_size and last_epoch are the trainer's: not settable.
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    # Rewrite the index's parquet image tables for random access (`otterfast data repack`) after preparing or
    # reusing it: auto (when a table has a row group over 64 MiB: pandas' defaults, Otter's layout), always, never
    repack: str = "auto"
    # Decode every image once into the pixel cache the loader then reads (`otterfast data cache-pixels`,
    # data/pixel_cache.py; bit-identical batches), after preparing and repacking: auto (an index prepared or reused from data.yaml,
    # a run of 2 or more `epochs`, the cache at most a quarter of the free disk; a failure warned about), always
    # (also into a given data.index; a failure an error), never
    cache_pixels: str = "auto"
    validation: ValidationSection = field(default_factory=ValidationSection)  # held-out data (eval_every)


@dataclass
class OptimSection:
    lr: float = 1e-4  # peak learning rate (after warmup)
    weight_decay: float = 0.1  # on Linear/Conv weight matrices only (optim.py)
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # Otter's (torch defaults)
    eps: float = 1e-8
    decay_embeddings: bool = False  # also decay token/patch embedding tables and learned queries


@dataclass
class ScheduleSection:
    name: str = "cosine"  # cosine | linear | constant (after warmup), counted in optimizer steps
    warmup_steps: int = 0
    warmup_ratio: float | None = None  # if set: warmup = round(ratio * total optimizer steps)
    min_lr_ratio: float = 0.0  # cosine/linear decay to lr * min_lr_ratio at the last step


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0  # 0 (DDP-like), 1, 2, 3
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU (DeepSpeedCPUAdam)
    offload_params: bool = False  # ZeRO-3 only: parameters on the CPU too
    grad_clip: float = 1.0  # global grad-norm clipping (0: off)
    config: str | None = None  # a DeepSpeed JSON used as is; its "auto" values are filled from this file
    optimizer: str = "auto"  # auto | torch | deepspeed: auto = torch AdamW unless offload_optimizer
    # auto: at stage 3, a model with a local checkpoint is built partitioned under deepspeed.zero.Init and its
    # safetensors streamed into each rank's partition (train/zero3_init.py); off: built whole on every rank first
    zero3_init: str = "auto"


@dataclass
class LoggingSection:
    progress: bool = True  # a progress bar under the per-step lines (rank 0)
    tensorboard: bool = True  # OUTPUT_DIR/tensorboard
    wandb_project: str | None = None  # wandb when set and `wandb` is importable
    wandb_entity: str | None = None
    wandb_name: str | None = None
    peak_tflops: float | None = None  # per-device peak for MFU; default: metrics.PEAK_TFLOPS by GPU name


@dataclass
class TrainConfig:
    seed: int = 0  # model init, data order (the loader's seed), dropout; each rank's RNG after init: seed + 1 + rank
    output_dir: str = "runs/train"
    max_steps: int | None = None  # optimizer steps; if unset, `epochs` decides
    epochs: int | None = None  # full passes over the data (each in a new order); with max_steps: whichever ends first
    grad_accum: int = 1  # micro-batches (loader batches) per optimizer step, per rank
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    save_every: int = 0  # checkpoint every N optimizer steps (0: only at the end)
    # a validation pass every N optimizer steps (and at the run's last step) when data.validation holds a set;
    # 0 / null: only at the last step
    eval_every: int | None = None
    # a quick `otterfast eval run` at each checkpoint (save_every) and at the run's last step
    eval_run: EvalRunSection = field(default_factory=EvalRunSection)
    keep_last: int = 2  # complete checkpoints kept (older ones deleted after a newer one is complete); 0: all
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir, if any) | off | a checkpoint path
    stop_at_step: int | None = None  # end this process after that step (checkpoint saved), schedule unchanged
    export: bool = True  # consolidated transformers export (safetensors + tokenizer) in OUTPUT_DIR/export
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


# Loader options owned by the trainer, not the config.
_TRAINER_LOADER_KEYS = {"seed": "the top-level `seed`", "rank": "the launcher (RANK)",
                        "world_size": "the launcher (WORLD_SIZE)", "last_epoch": "the top-level `epochs`"}


# ---- loading: the typed loader of otterfast/config.py, with this schema's exceptions ------------------------

def _adjust(cls, key: str, value: Any) -> Any:
    if ((cls is TrainConfig and key == "resume") or (cls is DeepSpeedSection and key == "zero3_init")) \
            and isinstance(value, bool):
        return "auto" if value else "off"  # YAML 1.1 reads a bare `off` / `on` as a boolean
    return value


_RULES = Rules(owned={LoaderConfig: _TRAINER_LOADER_KEYS}, make={LoaderConfig: partial(LoaderConfig.make, None)},
               adjust=_adjust)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load_config(src: str | dict | None, overrides: list[str] | None = None) -> TrainConfig:
    """A YAML path (or a dict) plus `key.path=value` overrides -> a validated TrainConfig."""
    doc, where = load_document(src, overrides)
    try:
        cfg = build(TrainConfig, doc, "", _RULES)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Cross-key checks that types alone do not catch."""
    def bad(msg):
        raise ConfigError(msg)

    if cfg.max_steps is None and cfg.epochs is None:
        bad("set max_steps or epochs")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        bad("max_steps must be >= 1")
    if cfg.epochs is not None and cfg.epochs < 1:
        bad("epochs must be >= 1")
    if cfg.grad_accum < 1:
        bad("grad_accum must be >= 1")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        bad(f"precision: expected auto, bf16 or fp32, got {cfg.precision!r}")
    if cfg.save_every < 0 or cfg.keep_last < 0:
        bad("save_every and keep_last must be >= 0")
    if not cfg.resume:
        bad("resume: expected auto, off or a checkpoint path")
    if cfg.stop_at_step is not None and cfg.stop_at_step < 1:
        bad("stop_at_step must be >= 1")
    m = cfg.model
    if (m.config is None) == (m.inline is None):
        bad("model: set exactly one of model.config (a model YAML) and model.inline")
    if m.activation_checkpointing not in ("none", "decoder", "all"):
        bad(f"model.activation_checkpointing: expected none, decoder or all, got {m.activation_checkpointing!r}")
    d = cfg.data
    if d.index is None and d.yaml is None:
        bad("data: set data.index (a prepared index) or data.yaml (a dataset YAML to prepare)")
    if d.repack not in ("auto", "always", "never"):
        bad(f"data.repack: expected auto, always or never, got {d.repack!r}")
    if d.cache_pixels not in ("auto", "always", "never"):
        bad(f"data.cache_pixels: expected auto, always or never, got {d.cache_pixels!r}")
    v = d.validation
    if v.fraction is not None and not 0 < v.fraction < 1:
        bad(f"data.validation.fraction must be in (0, 1), got {v.fraction}")
    if v.fraction is not None and (v.yaml is not None or v.index is not None):
        bad("data.validation: set fraction (held out of the training data) or yaml/index (a dataset of its own), "
            "not both")
    if v.max_batches is not None and v.max_batches < 1:
        bad("data.validation.max_batches must be >= 1")
    if cfg.eval_run.limit is not None and cfg.eval_run.limit < 1:
        bad("eval_run.limit must be >= 1 (or null: every row)")
    if cfg.eval_run.config is None and (cfg.eval_run.decode or cfg.eval_run.dtype or cfg.eval_run.keep_export):
        bad("eval_run: set eval_run.config (an `otterfast eval run` YAML) for its other keys to mean anything")
    if cfg.eval_run.decode:
        from ..eval.runner import DECODE_KEYS

        unknown = sorted(set(cfg.eval_run.decode) - set(DECODE_KEYS))
        if unknown:
            bad(f"eval_run.decode: unknown key(s) {unknown}; valid: {list(DECODE_KEYS)}")
    if cfg.eval_every is not None and cfg.eval_every < 0:
        bad("eval_every must be >= 0")
    if cfg.eval_every and v.fraction is None and v.yaml is None and v.index is None:
        bad("eval_every needs a validation set: data.validation.fraction, data.validation.yaml or "
            "data.validation.index")
    o = cfg.optim
    if o.lr <= 0 or o.weight_decay < 0 or o.eps <= 0:
        bad("optim: lr and eps must be > 0, weight_decay >= 0")
    if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas):
        bad(f"optim.betas: expected two numbers in [0, 1), got {o.betas!r}")
    s = cfg.schedule
    if s.name not in ("cosine", "linear", "constant"):
        bad(f"schedule.name: expected cosine, linear or constant, got {s.name!r}")
    if s.warmup_steps < 0 or not 0 <= s.min_lr_ratio <= 1:
        bad("schedule: warmup_steps >= 0 and min_lr_ratio in [0, 1]")
    if s.warmup_ratio is not None and not 0 <= s.warmup_ratio < 1:
        bad("schedule.warmup_ratio must be in [0, 1)")
    z = cfg.deepspeed
    if z.zero_stage not in (0, 1, 2, 3):
        bad(f"deepspeed.zero_stage: expected 0, 1, 2 or 3, got {z.zero_stage}")
    if z.offload_params and z.zero_stage != 3:
        bad("deepspeed.offload_params needs zero_stage 3 (DeepSpeed ignores it otherwise)")
    if z.zero3_init not in ("auto", "off"):
        bad(f"deepspeed.zero3_init: expected auto or off, got {z.zero3_init!r}")
    if z.offload_optimizer and z.zero_stage == 0:
        bad("deepspeed.offload_optimizer needs zero_stage >= 1")
    if z.optimizer not in ("auto", "torch", "deepspeed"):
        bad(f"deepspeed.optimizer: expected auto, torch or deepspeed, got {z.optimizer!r}")
    if z.grad_clip < 0:
        bad("deepspeed.grad_clip must be >= 0")


def dump(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
