"""Evaluation: log-likelihood scoring, perplexity and bits-per-byte (docs/eval.md)."""

from maxllm.eval.perplexity import EvalDataError, perplexity, read_documents
from maxllm.eval.scoring import LanguageModel

__all__ = ["EvalDataError", "LanguageModel", "perplexity", "read_documents"]
