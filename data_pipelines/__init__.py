"""Corpus preparation for maxllm: readers, filters, dedup, tokenization, writers.

The pipeline lands with its own issue; until then this package holds only its name,
so that `pip install -e .` ships both packages from day one.
"""
