"""The consolidated transformers export: OUTPUT_DIR/export/ (config.json, model*.safetensors, tokenizer files)
that `from_pretrained` loads, and beside it `trainable.safetensors`, the trainable parameters only (Otter's
final_weights.pt selection and key names, LoRA folded in), which `init_from: {format: otter}` loads on top of
the base LM and CLIP (models/weights_io.py).

Under ZeRO-3 every rank holds a shard of each parameter: `engine._zero3_consolidated_16bit_state_dict()`
gathers them (a collective, layer by layer) into a full state dict on rank 0; handing the partitioned module to
`save_pretrained` without it is the pattern that writes empty tensors (Otter's bug, reference 8.2). Stages 0-2
keep full parameters in the module. The weights are the ones the engine trains: bf16 under bf16 (the fp32
master copy is in the checkpoints), fp32 on the CPU. Written to export.tmp, fsynced and renamed in when complete
(durable.publish): a previous export is renamed aside and deleted only once the new one is durable, so a power
loss at any point leaves one complete export (an aside copy left by a crash is put back by the next export).
"""

from __future__ import annotations

import os
import shutil

from . import durable


def export(engine, model, output_dir: str, index_dir: str, rank: int, prefix: str = "model.",
           meta: dict | None = None) -> str | None:
    """Collective. `model` is the transformers model inside the engine's module, under attribute `prefix`.

    LoRA adapters are folded into the weights (the export has the base model's keys and loads without peft), and
    `otterfast.json` records `meta` (the data's prompt format, the loader's image transform), which
    `otterfast generate` uses as its defaults.
    """
    import json

    import torch.distributed as dist

    from ..models.lora import merged_state_dict
    from ..models.weights_io import save_trainable

    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict() if rank == 0 else None
    out = os.path.join(output_dir, "export")
    if rank == 0:
        durable.recover(out)  # an export replaced and cut short by a crash: its previous copy back (or removed)
        sd = {k[len(prefix):]: v.detach().cpu() for k, v in sd.items() if k.startswith(prefix)}
        lora = any(".lora_A." in k for k in sd)
        if lora:
            sd = merged_state_dict(sd, model)
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        saved_lora = getattr(model.config, "lora_config", None)
        if lora and saved_lora is not None:
            model.config.lora_config = None  # the export's weights are merged: loading must not add adapters
        save_trainable(model, sd, tmp, lora)  # the trainable-only delta beside the full weights (weights_io.py)
        try:
            model.save_pretrained(tmp, state_dict=sd)
        finally:
            if saved_lora is not None:
                model.config.lora_config = saved_lora
        meta = dict(meta or {})
        with open(os.path.join(tmp, "otterfast.json"), "w") as f:
            json.dump({"format": meta.pop("format", None), "lora_merged": lora, **meta}, f)
        tok = os.path.join(index_dir, "tokenizer")
        if os.path.isdir(tok):
            for name in os.listdir(tok):
                shutil.copy2(os.path.join(tok, name), os.path.join(tmp, name))
        durable.publish(tmp, out)  # fsynced, renamed in; the previous export kept until the new one is durable
    dist.barrier()
    return out if rank == 0 else None
