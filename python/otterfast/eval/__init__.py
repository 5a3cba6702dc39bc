"""Benchmark evaluation: local parquet data, prompts, parsers, metrics, an LLM judge and a runner.

    runner.py       `eval run`: every model x dataset of a YAML config, generate (or replay) then score, resumable
    score.py        `eval score`: re-score saved replies without a model
    model_api.py    the protocol a model implements; a config's model entry -> a model (otterfast.generate)
    templates.py    prompts for models without their own (data/prompts.py's TEMPLATES)
    data.py         a benchmark's parquet file through the column layout it was published in
    images.py       image cells -> RGB PIL images
    tasks/          one module per benchmark (MME, POPE, MMBench, SEED-Bench, ScienceQA, MathVista, MM-Vet,
                    MagnifierBench) and the TASKS registry
    parsing.py      reply parsers shared by the tasks
    judge.py        an LLM judge on an OpenAI-compatible endpoint, cached
    predictions.py, report.py, progress.py, synth.py   replies file, result files, progress bar, tiny test files
    cli.py          `otterfast eval run|score`

Importing this package is cheap (no torch): the CLI registers `otterfast eval` from here.
"""
