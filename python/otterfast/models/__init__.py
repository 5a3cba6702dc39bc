"""Models, readable top to bottom; parallelism and training wiring live outside them.

    otterhd.py   OtterHD: transformers' Fuyu on packed batches; its YAML config, builder, FLOPs per token
    packing.py   block-diagonal causal masks for packed rows
The Otter (OpenFlamingo) model is not written yet.
"""
