"""Generation from a trained or published model folder: templates.py (prompts by name), generator.py (the model).

`Generator` and `load_eval_model` are imported on first use, so that `otterfast --help` does not import torch.
"""

__all__ = ["Generator", "load_eval_model"]


def __getattr__(name):
    if name in __all__:
        from . import generator

        return getattr(generator, name)
    raise AttributeError(name)
