"""LoRA on a transformers model, in place (peft's `inject_adapter_in_model`), and folding it back for export.

In place rather than `get_peft_model`, so that every other parameter keeps its checkpoint key (Otter's names);
an adapted linear layer's weight moves to `<name>.base_layer.weight` until `merge_lora_` folds the adapter in.
"""

from __future__ import annotations

from torch import nn

# Otter's targets per LM family (otter-reference 3.2), and Fuyu's (reference 4.3)
FAMILIES = (["q_proj", "v_proj"], ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], ["Wqkv"])


def default_targets(model: nn.Module) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for family in FAMILIES:
        if set(family) <= names:
            return family
    raise ValueError(f"no known LoRA target in {type(model).__name__}: give target_modules")


def inject_lora(model: nn.Module, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05,
                target_modules: list[str] | None = None, **extra) -> None:
    """Add LoRA adapters to `model`'s target linear layers (the caller then sets requires_grad)."""
    from peft import LoraConfig, inject_adapter_in_model

    conf = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=target_modules or default_targets(model), **extra)
    inject_adapter_in_model(conf, model)


def merge_lora_(model: nn.Module) -> None:
    """Replace every LoRA layer in `model` by its base layer with the adapter folded in."""
    from peft.tuners.lora import LoraLayer

    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            mod.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, mod.get_base_layer())


def merged_state_dict(state: dict, model: nn.Module) -> dict:
    """A state dict of `model` (with LoRA layers) -> the same weights with every adapter folded in, plain keys.

    Works on a gathered (e.g. ZeRO-3 consolidated) state dict, without touching the live model:
    `X.base_layer.weight + scaling * X.lora_B.<a>.weight @ X.lora_A.<a>.weight` -> `X.weight`.
    """
    from peft.tuners.lora import LoraLayer

    out = dict(state)
    prefix_of = {id(m): n for n, m in model.named_modules()}
    for mod in model.modules():
        if not isinstance(mod, LoraLayer):
            continue
        name = prefix_of[id(mod)]
        base = f"{name}.base_layer.weight"
        w = out.pop(base).float()
        for adapter, scale in mod.scaling.items():
            a = out.pop(f"{name}.lora_A.{adapter}.weight").float()
            b = out.pop(f"{name}.lora_B.{adapter}.weight").float()
            w = w + scale * (b @ a)
        out[f"{name}.weight"] = w.to(state[base].dtype)
        bias = out.pop(f"{name}.base_layer.bias", None)
        if bias is not None:
            out[f"{name}.bias"] = bias
    return out
