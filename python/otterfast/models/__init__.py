"""Models, readable top to bottom; parallelism and training wiring live outside them.

    otterhd.py   OtterHD: transformers' Fuyu on packed batches; its YAML config, builder, FLOPs per token
    packing.py   block-diagonal causal masks for packed rows
    flamingo.py  Perceiver resampler, gated cross-attention block, text_time for packed rows (Otter's key names)
The Otter model itself (CLIP + perceiver + xattn inserted into a transformers LM) is not assembled yet.
"""
