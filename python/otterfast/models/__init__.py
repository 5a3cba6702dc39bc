"""Models, readable top to bottom; parallelism and training wiring live outside them. They take a loader batch
as a dict of torch tensors and import nothing of data or train.

    build.py       the one door: model YAML -> model (one table from kind to its functions), packed batch ->
                   loss, FLOPs per token, activation checkpointing
    otter.py       Otter: CLIP -> Perceiver -> gated cross-attention inserted into a transformers causal LM
                   (LLaMA, MPT, ...), Otter's config and checkpoint keys, trainable selection, cached generate
    otter_build.py Otter from a model YAML (a local checkpoint, or pretrained parts + random init); its FLOPs
    flamingo.py    the Flamingo parts: Perceiver resampler, gated cross-attention block, text_time for packed
                   rows; the Triton kernels (kernels/) when they can run
    otterhd.py     OtterHD: transformers' Fuyu on packed batches; its YAML config, builder, FLOPs per token
    attention.py   self-attention over packed rows (flash-attn varlen, SDPA per group of samples) and which
                   implementation a model gets
    packing.py     packed rows: PackedLayout (segments, groups), block-diagonal causal masks (the reference)
    lora.py        LoRA in place (peft), folded back for export
    model_yaml.py  a model YAML's dataclass from a dict, unknown keys named
"""
