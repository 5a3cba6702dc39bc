"""Weights in and out of an Otter model, in OpenFlamingo's and Otter's layouts.

In: `init_from: {format, path}` in an Otter model YAML loads a file on top of the model the YAML builds (its base
LM and CLIP, or an Otter checkpoint folder), before the vocabulary is fitted to the tokenizer and before LoRA:
- `openflamingo`: OpenFlamingo's `checkpoint.pt` (the released file, or a training `checkpoint_N.pt` with
  `model_state_dict` and DDP's `module.` prefix). Its keys become Otter's as Otter's converter does
  (`flamingo_pt2otter_hf.py`, otter-reference 3.6): `perceiver.layers.N.0.*` -> `perceiver.layers.N.*`,
  `perceiver.layers.N.1.*` -> `...N.feed_forward.*`, the cross-attention block's `ff.*` -> `feed_forward.*`
  (only there: Otter's converter replaces every `ff` in `lang_encoder.*`, which would also rename MPT's
  `ffn`), and the duplicate views `lang_encoder.gated_cross_attn_layers.N.*` (v1) and
  `lang_encoder.old_decoder_blocks.N.*` (v2) are dropped when they equal the layer's own keys (an error when
  they differ). OpenFlamingo has no `<answer>`: its embedding table is loaded as it is and then grown to the
  tokenizer's size, as Otter's conversion adds `<answer>` and resizes (MPT's table, padded to 50432, is not
  grown: `<answer>` takes a padding row, as in Otter).
- `otter`: Otter's key names: its trainer's `final_weights.pt` / `checkpoint_*.pt` (trainable parameters only,
  optionally under `model_state_dict`), or otterfast's `export/trainable.safetensors` (below).
Strict both ways: every key the file holds must land in the model (same shape; only the embedding tables may
have another row count), and the file must hold every weight no other source gives: always the Perceiver and
every gated cross-attention block, the LM too when the YAML names no pretrained LM (`lang_encoder:` /
`checkpoint:`), CLIP too when it names no pretrained CLIP. Anything else is an error naming the keys.

Out: `trainable_state_dict` picks the parameters that train (Otter's `final_weights.pt` selection, by
`requires_grad`) from a full state dict; LoRA adapters are already folded into their base weights there, so the
file loads onto the base LM without peft. `save_trainable` writes it as `trainable.safetensors` (no pickle, so
loading it runs no code; the key names are Otter's, so `torch.save(load_file(p), "final_weights.pt")` gives a
file Otter's `--trained_ckpt` reads).
"""

from __future__ import annotations

import os
import re

import torch

FORMATS = ("openflamingo", "otter")
TRAINABLE_FILE = "trainable.safetensors"
_SPEC_KEYS = ("format", "path")


# ------------------------------------------------------------------------------------------------ the YAML key
def check_init_from(spec, where: str) -> None:
    """`init_from: {format: openflamingo | otter, path: FILE}`; anything else is an error naming the valid keys."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: init_from must be a mapping {{format, path}}, got {type(spec).__name__}")
    bad = sorted(set(spec) - set(_SPEC_KEYS))
    if bad:
        raise ValueError(f"{where}: unknown init_from key(s) {bad}; valid: {list(_SPEC_KEYS)}")
    if spec.get("format") not in FORMATS:
        raise ValueError(f"{where}: init_from.format must be one of {', '.join(FORMATS)}, got {spec.get('format')!r}")
    if not isinstance(spec.get("path"), str) or not spec["path"]:
        raise ValueError(f"{where}: init_from.path must be a file path")


# ------------------------------------------------------------------------------------------------ reading files
def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A `.safetensors` file or a torch `.pt` (read with weights_only: no code runs); a `model_state_dict`
    wrapper is unwrapped and a DDP `module.` prefix stripped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init_from: {path}: file not found (a local copy is needed)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # the legacy (non-zip) format cannot be memory-mapped
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"init_from: {path}: not a state dict (name -> tensor), nor one under 'model_state_dict'")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def openflamingo_to_otter(state: dict[str, torch.Tensor], layers_path: str, where: str) -> dict[str, torch.Tensor]:
    """OpenFlamingo's key names -> Otter's (module docstring). `layers_path`: the LM's decoder-layer list, e.g.
    `model.layers` or `transformer.blocks`."""
    out: dict[str, torch.Tensor] = {}
    duplicates: dict[str, torch.Tensor] = {}
    layers = f"lang_encoder.{layers_path}"
    for key, value in state.items():
        k = re.sub(r"^perceiver\.layers\.(\d+)\.0\.", r"perceiver.layers.\1.", key)
        k = re.sub(r"^perceiver\.layers\.(\d+)\.1\.", r"perceiver.layers.\1.feed_forward.", k)
        dup = re.match(r"^lang_encoder\.(gated_cross_attn_layers|old_decoder_blocks)\.(\d+)\.(.*)$", k)
        if dup:
            part = "gated_cross_attn_layer" if dup.group(1) == "gated_cross_attn_layers" else "decoder_layer"
            k = f"{layers}.{dup.group(2)}.{part}.{dup.group(3)}"
        k = k.replace(".gated_cross_attn_layer.ff.", ".gated_cross_attn_layer.feed_forward.")
        (duplicates if dup else out)[k] = value
    for k, value in duplicates.items():
        if k not in out:
            out[k] = value
        elif out[k].shape != value.shape or not torch.equal(out[k], value):
            raise ValueError(f"{where}: {k} and its duplicate view in the file differ")
    return out


# ------------------------------------------------------------------------------------------------ loading
def load_init_weights(model, spec: dict, tok: dict, has_lm: bool, has_clip: bool) -> int:
    """Load `spec`'s file into `model` (module docstring); returns the number of tensors loaded.

    The embedding tables take the file's row count (grown back to the tokenizer's by the caller afterwards, as
    Otter resizes after loading). `tok`: the prepared index's tokenizer facts, to check that `<image>`,
    `<|endofchunk|>` and `<answer>` have the ids the file's table was trained with.
    """
    path, fmt = spec["path"], spec["format"]
    state = read_state_dict(path)
    if fmt == "openflamingo":
        state = openflamingo_to_otter(state, model.decoder_layers_path, path)
    own = model.state_dict()
    prefix = "vision_encoder.vision_model."  # Otter's CLIP keys; transformers 5 names the encoder one level up
    state = {("vision_encoder." + k[len(prefix):] if k.startswith(prefix) and k not in own else k): v
             for k, v in state.items()}

    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        hint = ""
        if any(k.startswith("vision_encoder.") for k in unexpected):
            hint = (" (vision_encoder.* keys must be transformers CLIP's; OpenFlamingo's open_clip encoder does not"
                    " convert: give `vision_encoder:` a local CLIP folder and leave those keys out)")
        raise ValueError(f"init_from {path}: {len(unexpected)} key(s) the model does not have: "
                         f"{_some(unexpected)}{hint}")

    aliases = _alias_groups(model)
    missing = sorted(k for k in own if _required(k, has_lm, has_clip) and not any(a in state for a in aliases[k]))
    if missing:
        raise ValueError(f"init_from {path}: {len(missing)} key(s) missing from the file (no other source gives "
                         f"them): {_some(missing)}")

    lm = model.lang_encoder
    tables = _table_keys(model)
    rows = {k: state[k].shape[0] for k in tables if k in state}
    if rows:
        counts = set(rows.values())
        if len(counts) != 1:
            raise ValueError(f"init_from {path}: the embedding tables have different row counts: {rows}")
        n = counts.pop()
        _check_special_ids(tok, n, fmt, path)
        if n != lm.get_input_embeddings().weight.shape[0]:
            lm.resize_token_embeddings(n)  # the file's table is the table; new rows come after the load
            own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"init_from {path}: {len(wrong)} shape mismatch(es): {_some(wrong)}")
    model.load_state_dict(state, strict=False)
    if getattr(lm.config, "tie_word_embeddings", False):
        lm.tie_weights()
    return len(state)


def _required(key: str, has_lm: bool, has_clip: bool) -> bool:
    if key.startswith("perceiver.") or ".gated_cross_attn_layer." in key:
        return True
    if key.startswith("lang_encoder."):
        return not has_lm
    if key.startswith("vision_encoder."):
        return not has_clip
    return True


def _alias_groups(model) -> dict[str, set[str]]:
    """Each state-dict key -> every key naming the same tensor (tied embeddings: either name fills both)."""
    by_id: dict[int, set[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(n)
    groups = {n: names for names in by_id.values() for n in names}
    return {k: groups.get(k, {k}) for k in model.state_dict()}


def _table_keys(model) -> set[str]:
    """The keys of the LM's input and output embedding tables (every name of each)."""
    lm = model.lang_encoder
    tables = [lm.get_input_embeddings().weight]
    out = lm.get_output_embeddings()
    if out is not None:
        tables.append(out.weight)
    return {n for n, p in model.named_parameters(remove_duplicate=False) if any(p is t for t in tables)}


def _check_special_ids(tok: dict, rows: int, fmt: str, path: str) -> None:
    """The file's table was trained with `<image>` and `<|endofchunk|>` (and Otter's also `<answer>`) inside it;
    OpenFlamingo's has no `<answer>`: when the tokenizer is longer than the table (an unpadded table, e.g.
    LLaMA's), `<answer>` must be one of the rows added after it, else the tokenizer's ids are not the file's."""
    for name, key in (("<image>", "media_id"), ("<|endofchunk|>", "eoc_id")) + (
            (("<answer>", "answer_id"),) if fmt == "otter" else ()):
        i = tok.get(key)
        if i is not None and i >= rows:
            raise ValueError(f"init_from {path}: {name} has id {i}, outside the file's {rows} embedding rows: "
                             "prepare the data with the checkpoint's own tokenizer")
    answer = tok.get("answer_id")
    if fmt == "openflamingo" and answer is not None and tok.get("vocab_size", 0) > rows and answer < rows:
        raise ValueError(f"init_from {path}: <answer> has id {answer}, a row OpenFlamingo trained for another token "
                         f"(its table has {rows} rows): prepare the data with OpenFlamingo's tokenizer (which has "
                         "<|endofchunk|>, <image> and <PAD>), so that <answer> is added after them, as Otter does")


def _some(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


# ------------------------------------------------------------------------------------------------ trainable out
def trainable_keys(model) -> list[str]:
    """The state-dict keys of the parameters that train; a LoRA adapter stands for its base weight (`X.weight`),
    which is what a merged state dict holds."""
    keys: list[str] = []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_A." in n or ".lora_B." in n:
            n = n.split(".lora_", 1)[0] + ".weight"
        if n not in keys:
            keys.append(n)
    return keys


def trainable_state_dict(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """From `state` (the model's full state dict, LoRA folded in), the tensors of `trainable_keys(model)`."""
    keys = trainable_keys(model)
    absent = [k for k in keys if k not in state]
    if absent:
        raise ValueError(f"trainable export: {len(absent)} trainable key(s) not in the state dict: {_some(absent)}")
    return {k: state[k].detach().cpu().contiguous() for k in keys}


def save_trainable(model, state: dict[str, torch.Tensor], folder: str, lora_merged: bool = False) -> str | None:
    """`folder/trainable.safetensors`: the trainable tensors of `state` (see trainable_state_dict); its path.

    Otter models only (`init_from` reads Otter), and not when every parameter trains (`train_full_model`): then
    the full export is the delta, and a second copy would only double the disk. Reads `state` only
    (transformers' save_pretrained pops from the dict it is given: call this first)."""
    from safetensors.torch import save_file

    from .otter import OtterForConditionalGeneration

    if not isinstance(model, OtterForConditionalGeneration) or all(p.requires_grad for p in model.parameters()):
        return None
    tensors = trainable_state_dict(model, state)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, TRAINABLE_FILE)
    save_file(tensors, path,
              metadata={"format": "pt", "otterfast": "trainable", "lora_merged": str(bool(lora_merged)).lower()})
    return path
