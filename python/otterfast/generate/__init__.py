"""Generation from a trained or published model folder.

    generator.py   the Generator: loads an Otter or OtterHD folder once; replies, streaming, option log-likelihoods
    templates.py   inference prompt templates by name (data/prompts.py's TEMPLATES)
    cli.py         `otterfast generate`

`Generator` and `load_eval_model` are imported on first use, so that `otterfast --help` does not import torch.
"""

__all__ = ["Generator", "load_eval_model"]


def __getattr__(name):
    if name in __all__:
        from . import generator

        return getattr(generator, name)
    raise AttributeError(name)
