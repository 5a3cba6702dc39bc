"""Benchmark evaluation: local parquet data, prompts, parsers, metrics, an LLM judge and a runner.

Importing this package is cheap (no torch): the CLI registers `otterfast eval` from here.
"""
