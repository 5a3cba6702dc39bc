"""Otter's MIMIC-IT data, read as it is on disk, and the plain Python reference pipeline over it.

    mimicit.py    dataset YAML, instruction JSON, train configs, resampling
    sources.py    image tables (parquet file / dask directory / legacy JSON), lazy by reference
    prompts.py    the four prompt formats, text cleaning, label spans
    tokenizer.py  loading a tokenizer folder and adding the special tokens a format needs
    prepare.py    `data prepare` / `data validate`: validate, render, tokenize, write the index
    index.py      the prepared index (memory-mapped Arrow) and per-epoch sample order
    images.py     decode + the Otter / CLIP / Fuyu pixel transforms (PIL + numpy reference)
    reference.py  the reference loader: model-ready pad-to-longest batches
    demo.py       the demo dataset built from photos shipped in PyPI packages
    defects.py    defect kinds, the report, DataError
"""
