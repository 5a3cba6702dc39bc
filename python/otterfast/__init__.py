"""otterfast: a fast, correct trainer for Otter-style multimodal models (Otter, OtterHD) on MIMIC-IT data.

Layout, top to bottom (imports only point down; docs/architecture.md has the layers, one batch's path from the
YAML to the loss, and where each kind of change goes):
    otterfast.cli          the `otterfast` command, thin; demo_run.py is `otterfast demo`
    otterfast.eval         benchmarks: local parquet files, tasks, LLM judge, runner, scoring
    otterfast.train        training config, DeepSpeed, the loop, checkpoints, metrics, export, plot
    otterfast.generate     replies from an Otter / OtterHD model folder
    otterfast.models       Otter, OtterHD, packed attention, LoRA, FLOPs per token
    otterfast.data         MIMIC-IT reading, prompts, prepare/index, batch planning, reference and native loaders
    otterfast._native      the Rust extension (rust/): image headers, the native loader's engine
    otterfast.config       config loading for every command; gpu_specs.py and source_tree.py: small shared facts
"""

__version__ = "0.1.0"
