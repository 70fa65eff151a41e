"""Evaluation: log-likelihood scoring, perplexity and bits-per-byte (docs/eval.md)."""

from maxllm.eval.perplexity import EvalDataError, perplexity, read_documents
from maxllm.eval.scoring import LanguageModel
from maxllm.eval.tasks import Choice, read_choice_file, score_choices

__all__ = ["Choice", "EvalDataError", "LanguageModel", "perplexity", "read_choice_file", "read_documents",
           "score_choices"]
