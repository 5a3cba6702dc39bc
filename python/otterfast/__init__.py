"""otterfast: a fast, correct trainer for Otter-style multimodal models.

Layout (see README "Architecture"):
    otterfast.data     MIMIC-IT formats, prompts, prepare/index, reference loader, demo data
    otterfast._native  the Rust extension (image headers now; the streaming loader next)
    otterfast.cli      the `otterfast` command
"""

__version__ = "0.1.0"
