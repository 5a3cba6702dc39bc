"""ZeRO-3 construction: the model built partitioned under `deepspeed.zero.Init`, its checkpoint streamed in.

Today's path (`build_model`, then `deepspeed.initialize` partitions) holds the whole model on every rank first:
`from_pretrained` maps the safetensors, and every page becomes resident in each rank when DeepSpeed partitions
the model (at load already when the dtype changes); for OtterHD-8B in bf16, ~17 GB of host memory per rank.
Here, for a model with a local checkpoint at ZeRO stage 3 (`deepspeed.zero3_init: auto`):

1. The model's modules are built from the checkpoint's config under `deepspeed.zero.Init` (the run's DeepSpeed
   config: dtype, parameter offload), with transformers' `no_init_weights` (no random init of tensors that are
   overwritten) and `prevent_arange_dtype_change` (rotary `inv_freq` buffers keep their dtype). zero.Init
   partitions each module's parameters as soon as its `__init__` returns: a rank never holds more than one
   module's parameters whole, and untouched `torch.empty` pages are never resident.
2. Each checkpoint tensor is read on its own, and only the range of its flattened elements that this rank
   holds, in chunks of 16 MiB with pread (`SafetensorsFile`; not safe_open, which maps the file: the pages
   read would stay in the process's RSS until it closes), straight into `param.ds_tensor`: ZeRO-3's layout,
   partition size ceil(numel / world), rank r holding elements [r * size, (r + 1) * size), the last partition
   zero-padded.
3. Keys are renamed as `from_pretrained` renames them (transformers' conversion mapping for the model, e.g.
   Fuyu's `language_model.model.*` -> `model.language_model.*`). A parameter shared by several names (tied
   weights: MPT's lm_head and wte) is loaded once. A checkpoint key that names nothing, or a parameter no key
   fills, is an error naming them. Buffers come from the construction (persistent ones in the checkpoint are
   copied). A vocabulary grown to the tokenizer's gets the mean of the checkpoint's rows in its new rows
   (transformers' resize samples from N(mean, 1e-9 cov): the same to ~1e-5 of the rows' spread).
4. Then the builder's remaining steps (`Unloaded.finish`: LoRA adapters, trainable flags, token ids) run outside
   zero.Init from the RNG state they have in `build_model`: new parameters (adapters) are initialised whole,
   as today, cast to the run's dtype, and partitioned by deepspeed.initialize.

The weights equal today's path bit for bit (same checkpoint values, same casts: checkpoint dtype -> the model
YAML's dtype -> the engine's), so are the losses (tests/test_zero3_init.py).
"""

from __future__ import annotations

import json
import math
import os
import re

import torch

CONVERTER_ERROR = ("{key}: the checkpoint needs a multi-tensor conversion ({pattern}) that streaming does not do; "
                   "set deepspeed.zero3_init: off")


def wanted(ds_config: dict, mode: str, unloaded) -> bool:
    """Whether the model is built under zero.Init: ZeRO stage 3 in the run's DeepSpeed config,
    `deepspeed.zero3_init: auto` (`mode`), and a model that loads a local checkpoint (`unloaded`; random-init
    models are built whole and partitioned by deepspeed.initialize, as at stages 0-2)."""
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    return stage == 3 and mode == "auto" and unloaded is not None


def build_partitioned(unloaded, ds_config: dict, model_dtype: torch.dtype) -> torch.nn.Module:
    """The model of `unloaded`, partitioned across the ranks as it is built, its checkpoint streamed in.

    `model_dtype`: the model YAML's dtype (today's path loads the checkpoint in it before the engine casts to
    its own: the same two casts are made here)."""
    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    rng = torch.random.get_rng_state()
    # mem_efficient_linear=False: zero.Init would otherwise replace torch.nn.functional.linear for the whole
    # process (DeepSpeed's memory-saving linear: other rounding than today's path, which never enters zero.Init)
    init = _init_class(deepspeed.zero.Init)(config_dict_or_path=ds_config, mem_efficient_linear=False)
    with prevent_arange_dtype_change(), init:
        with no_init_weights():
            model = unloaded.construct()
        model.tie_weights()  # no_init_weights also skips post_init's tying: tie as from_pretrained does
    init.skip_broadcast = False  # parameters DeepSpeed converts later (LoRA's) are broadcast as usual
    # outside the context: zero.Init's wrappers would turn the reader's tensors into its dtype
    load_checkpoint(model, unloaded.checkpoint, model_dtype)
    # The builder's after-load steps run outside zero.Init: the parameters they add (LoRA adapters) are
    # initialised whole (under zero.Init, an init that runs after a module's __init__, like peft's zeros for
    # lora_B, would write into an empty partition), from the RNG state build_model gives them (from_pretrained
    # draws no random numbers), in the run's dtype; deepspeed.initialize partitions them.
    torch.random.set_rng_state(rng)
    unloaded.finish(model)
    for p in model.parameters():
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != init.dtype:
            p.data = p.data.to(init.dtype)
    return model


def _init_class(base):
    class StreamingInit(base):
        """zero.Init without its broadcast of every new parameter from rank 0 (which makes random inits agree
        across ranks): here every value is overwritten by the checkpoint, and the broadcast would write each
        tensor whole on every other rank (a transient of the largest tensor: 2 GiB for Fuyu-8B's embedding)
        and send the whole model. Without `_zero_init_param` (another DeepSpeed), the broadcast comes back:
        more memory and traffic, the same weights."""

        skip_broadcast = True

        def _zero_init_param(self, param):
            if not self.skip_broadcast:
                return super()._zero_init_param(param)
            self._convert_to_deepspeed_param(param)
            param.partition()

    return StreamingInit


def meta_twin(unloaded) -> torch.nn.Module:
    """The same model on the meta device (no memory): what counts parameters (FLOPs per token) reads, since a
    partitioned parameter's numel() is 0."""
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():
        model = unloaded.construct()
        model.tie_weights()
        unloaded.finish(model)
    return model


# ---- the checkpoint -----------------------------------------------------------------------------------------

def checkpoint_files(folder: str) -> dict[str, str]:
    """{tensor key: safetensors file} of a transformers folder (sharded with model.safetensors.index.json, or
    single files)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors (ZeRO-3 streaming reads safetensors only; "
                                "set deepspeed.zero3_init: off for other formats)")
    paths = [os.path.join(folder, name) for name in files]
    return {k: path for path in paths for k in SafetensorsFile(path).tensors}


class SafetensorsFile:
    """A safetensors file read by ranges with pread: an 8-byte header length, a JSON header ({key: {dtype, shape,
    data_offsets}}), then the data. Not memory-mapped (safe_open maps the file: every page read stays in the
    process's RSS until the file is closed, and a slice is a copy of whole rows), so what a rank reads costs it
    one chunk of memory at a time."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.tensors = header

    def shape(self, key: str) -> tuple:
        return tuple(self.tensors[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self.tensors[key]["dtype"]
        if name not in self.DTYPES:
            raise NotImplementedError(f"{self.path}: {key} has dtype {name}, which streaming does not read")
        return self.DTYPES[name]

    def chunks(self, key: str, a: int, b: int, chunk_bytes: int = 16 << 20):
        """Elements [a, b) of the flattened tensor `key`, as (offset from a, 1-D tensor) pieces of at most
        `chunk_bytes`."""
        dtype = self.dtype(key)
        size = dtype.itemsize
        base = self.data_start + self.tensors[key]["data_offsets"][0]
        step = max(1, chunk_bytes // size)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i in range(a, b, step):
                n = min(step, b - i)
                buf = bytearray(n * size)
                got = os.preadv(fd, [buf], base + i * size)
                if got != len(buf):
                    raise OSError(f"{self.path}: short read of {key} ({got} of {len(buf)} bytes)")
                yield i - a, torch.frombuffer(buf, dtype=dtype)
        finally:
            os.close(fd)


def key_mapping(model, keys) -> dict[str, str]:
    """{checkpoint key: the model's state-dict name}, renamed as from_pretrained renames (transformers'
    conversion mapping for this model class and its sub-models, and the base-model prefix)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    names = dict.fromkeys(model.state_dict().keys(), True)
    prefix = getattr(model, "base_model_prefix", None) or None
    out = {}
    for key in keys:
        name, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if pattern is not None:
            raise NotImplementedError(CONVERTER_ERROR.format(key=key, pattern=pattern))
        if name not in names and key in names:  # as from_pretrained: the key itself when renaming misses
            name = key
        out[key] = name
    return out


def load_checkpoint(model, folder: str, model_dtype: torch.dtype) -> dict:
    """Stream `folder`'s safetensors into `model`'s partitioned parameters (and its persistent buffers); returns
    {"tensors": n, "bytes_read": b} for this rank. Errors name unknown keys and parameters left unfilled."""
    files = checkpoint_files(folder)
    mapping = key_mapping(model, files)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    unexpected = sorted(k for k, n in mapping.items() if n not in params and n not in buffers)
    ignore = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []  # as from_pretrained
    skipped = {k for k in unexpected if any(re.search(pattern, k) for pattern in ignore)}
    unexpected = [k for k in unexpected if k not in skipped]
    files = {k: v for k, v in files.items() if k not in skipped}
    if unexpected:
        more = " ..." if len(unexpected) > 10 else ""
        raise ValueError(f"{folder}: {len(unexpected)} checkpoint key(s) name no parameter of "
                         f"{type(model).__name__}: {', '.join(unexpected[:10])}{more}")
    for p in {id(p): p for p in params.values()}.values():
        _check_streamable(p)
    loaded: set[int] = set()
    stats = {"tensors": 0, "bytes_read": 0}
    readers = {path: SafetensorsFile(path) for path in sorted(set(files.values()))}
    # file by file, in each file's order: sequential reads
    for key in sorted(files, key=lambda k: (files[k], readers[files[k]].tensors[k]["data_offsets"][0])):
        name, f = mapping[key], readers[files[key]]
        if name in buffers:
            buf = buffers[name]
            if f.shape(key) != tuple(buf.shape):
                raise ValueError(f"{key}: shape {list(f.shape(key))} in the checkpoint, {list(buf.shape)} in the model")
            with torch.no_grad():
                flat = buf.view(-1)
                for off, t in f.chunks(key, 0, buf.numel()):
                    flat[off:off + t.numel()].copy_(t.to(buf.dtype))
            stats["bytes_read"] += buf.numel() * f.dtype(key).itemsize
            continue
        p = params[name]
        if id(p) in loaded:  # a tied weight saved under both names: loaded once
            continue
        stats["bytes_read"] += _stream_param(p, f, key, model_dtype)
        stats["tensors"] += 1
        loaded.add(id(p))
    missing = [n for n, p in params.items() if id(p) not in loaded]  # by identity: a tied name is filled
    if missing:
        raise ValueError(f"{folder}: {len(missing)} parameter(s) of {type(model).__name__} not in the checkpoint: "
                         f"{', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    return stats


def _check_streamable(p) -> None:
    if not hasattr(p, "ds_tensor") or p.ds_tensor is None:
        raise RuntimeError(f"parameter of shape {tuple(p.shape)} was not partitioned by zero.Init")
    if getattr(p, "ds_secondary_tensor", None) is not None or hasattr(p.ds_tensor, "ds_quant_scale"):
        raise NotImplementedError("ZeRO++ (hpZ secondary partitions or quantized weights) with streamed "
                                  "checkpoints: set deepspeed.zero3_init: off")
    if str(getattr(p.ds_tensor, "final_location", None) or "").endswith("nvme"):
        raise NotImplementedError("NVMe parameter offload with streamed checkpoints: set deepspeed.zero3_init: off")


def _stream_param(p, f: SafetensorsFile, key: str, model_dtype: torch.dtype) -> int:
    """Copy this rank's partition of checkpoint tensor `key` into `p.ds_tensor`; returns the bytes read."""
    import torch.distributed as dist

    shape = tuple(p.ds_shape)
    numel = int(p.ds_numel)
    part = p.ds_tensor
    size = part.numel()  # ceil(numel / world): the same on every rank of the partition group
    start = dist.get_rank(group=p.ds_process_group) * size
    end = min(start + size, numel)
    ck_shape = f.shape(key)
    grown = len(ck_shape) == len(shape) >= 1 and ck_shape[1:] == shape[1:] and ck_shape[0] < shape[0]
    if ck_shape != shape and not grown:
        raise ValueError(f"{key}: shape {list(ck_shape)} in the checkpoint, {list(shape)} in the model")
    ck_numel = math.prod(ck_shape)
    read = 0
    with torch.no_grad():
        a, b = start, min(end, ck_numel)  # the part that comes from the checkpoint
        for off, t in f.chunks(key, a, b) if a < b else ():
            part[off:off + t.numel()].copy_(t.to(model_dtype).to(part.dtype))
            read += t.numel() * t.element_size()
        if end > max(start, ck_numel):  # new vocabulary rows: the mean of the checkpoint's rows
            lo, row = max(start, ck_numel), math.prod(shape[1:])
            mean = _row_mean(f, key, ck_shape[0], row).to(model_dtype).to(part.dtype)
            i = lo
            while i < end:  # row by row: the grown rows are few
                r0 = (i - ck_numel) % row
                n = min(row - r0, end - i)
                part[i - start:i - start + n].copy_(mean[r0:r0 + n])
                i += n
        if end - start < size:
            part[max(end - start, 0):].zero_()  # the padding of the last partition(s)
    return read


def _row_mean(f: SafetensorsFile, key: str, rows: int, row: int) -> torch.Tensor:
    """The mean row of a checkpoint tensor (fp32), read in chunks."""
    acc = torch.zeros(row, dtype=torch.float64)
    n_rows = 0
    pending = None
    for _, t in f.chunks(key, 0, rows * row):
        t = t.double() if pending is None else torch.cat([pending, t.double()])
        whole = t.numel() // row * row
        acc += t[:whole].view(-1, row).sum(0)
        n_rows += whole // row
        pending = t[whole:] if whole < t.numel() else None
    assert n_rows == rows
    return (acc / rows).float()
