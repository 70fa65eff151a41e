"""Evaluation: log-likelihood scoring, perplexity and bits-per-byte, multiple-choice
and generative tasks, the `python -m maxllm.eval` command (docs/eval.md)."""

from maxllm.eval.perplexity import EvalDataError, perplexity, read_documents
from maxllm.eval.scoring import LanguageModel
from maxllm.eval.tasks import Choice, Generation, Task, evaluate, evaluate_tasks, load_tasks, read_choice_file, \
    read_generic, run_task, score_choices

__all__ = ["Choice", "EvalDataError", "Generation", "LanguageModel", "Task", "evaluate", "evaluate_tasks", "load_tasks", "perplexity",
           "read_choice_file", "read_documents", "read_generic", "run_task", "score_choices"]
