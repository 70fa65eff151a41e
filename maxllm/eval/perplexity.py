"""Perplexity and bits-per-byte of a model over a text file.

    documents: a .txt file is one document; a .jsonl (or .jsonl.gz) file has one
               per line, in `text_field`.
    perplexity    = exp(total negative log-likelihood / tokens)
    bits_per_byte = total negative log-likelihood / ln 2 / UTF-8 bytes

Every token of every document is scored (`LanguageModel.loglikelihood_rolling`:
windows of the model's length for long documents). Bits per byte does not depend
on the tokenizer, so it compares models with different vocabularies.
"""

from __future__ import annotations

import math
from pathlib import Path

from maxllm.data.sources import DataError, read_jsonl_texts
from maxllm.eval.scoring import LanguageModel


# Evaluation reads its files with the data pipeline's readers, and their errors.
EvalDataError = DataError


def read_documents(path: str | Path, text_field: str = "text", limit: int | None = None) -> list[str]:
    """A .txt file's text (one document) or a .jsonl[.gz] file's `text_field`s."""
    return read_jsonl_texts(str(path), text_field)[:limit]


def perplexity(lm: LanguageModel, path: str | Path, text_field: str = "text", limit: int | None = None) -> dict:
    """{perplexity, bits_per_byte, tokens, bytes, documents} over the file."""
    if lm.tokenizer is None:
        raise EvalDataError(f"{path}: the model has no tokenizer to encode the text with")
    docs = read_documents(path, text_field, limit)
    ids = [lm.tokenizer.encode(d) for d in docs]
    nll = -sum(lm.loglikelihood_rolling_many(ids))
    tokens = sum(len(i) for i in ids)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    return {
        "perplexity": math.exp(nll / max(tokens, 1)),
        "bits_per_byte": nll / math.log(2) / max(nbytes, 1),
        "tokens": tokens,
        "bytes": nbytes,
        "documents": len(docs),
    }
