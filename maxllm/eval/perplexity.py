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

import gzip
import json
import math
from pathlib import Path

from maxllm.eval.scoring import LanguageModel


class EvalDataError(ValueError):
    """A file that cannot be read as documents or tasks; names the file and line."""


def read_documents(path: str | Path, text_field: str = "text", limit: int | None = None) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: not found")
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    opener = gzip.open if path.name.endswith(".gz") else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise EvalDataError(f"{path}:{line_no}: no string field {text_field!r}")
            docs.append(record[text_field])
            if limit is not None and len(docs) >= limit:
                break
    return docs


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
