"""Generation from a trained or published model folder: templates.py (prompts by name), generator.py (the model)."""

from .generator import Generator, load_eval_model

__all__ = ["Generator", "load_eval_model"]
