"""Models, readable top to bottom; parallelism and training wiring live outside them.

    build.py     the one door: model YAML -> model, packed batch -> loss, FLOPs per token
    otter.py     Otter: CLIP -> Perceiver -> gated cross-attention inserted into a transformers causal LM
                 (LLaMA, MPT, ...), Otter's config and checkpoint keys, trainable selection, LoRA, cached generate
    flamingo.py  the Flamingo parts: Perceiver resampler, gated cross-attention block, text_time for packed rows
    otterhd.py   OtterHD: transformers' Fuyu on packed batches; its YAML config, builder, FLOPs per token
    packing.py   block-diagonal causal masks for packed rows
"""
