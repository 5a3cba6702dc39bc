"""Otter's MIMIC-IT data, read as it is on disk, prepared once into an index, and loaded as model-ready batches.

    mimicit.py      dataset YAML, instruction JSON, train configs, resampling
    sources.py      image tables (parquet file / dask directory / legacy JSON), lazy by reference
    prompts.py      the prompt layouts (TEMPLATES: training formats and inference templates), cleaning, label spans
    tokenizer.py    loading a tokenizer folder and adding the special tokens a format needs; labels from offsets
    prepare.py      `data prepare` / `data validate`: validate, render, tokenize, write the index
    index.py        the prepared index (memory-mapped Arrow) and per-epoch, per-rank sample order
    batching.py     LoaderConfig and batch planning from token counts (the twin of rust/pack.rs)
    loader.py       NativeLoader: the Rust loader's Python face, batches as numpy arrays
    reference.py    ReferenceLoader: the same batches in plain Python, the native loader's oracle
    images.py       decode + the Otter / CLIP / Fuyu pixel transforms (PIL + numpy reference)
    otter_style.py  Otter's own data path, faithfully, as the benchmarks' baseline
    demo.py         the demo dataset built from photos shipped in PyPI packages
    defects.py      defect kinds, the report, DataError
    cli.py          `otterfast data demo|validate|prepare|inspect`
"""
