"""Multiple-choice tasks scored by log-likelihood, in maxllm's generic JSONL format.

One example per line: {"query": str, "choices": [str, ...], "gold": int}. A file
may hold a few-shot pool in a second file (same format) passed as `fewshot`.

    prompt     = few-shot examples ("query choice" joined by blank lines) + query
    scored     = " " + choice, for each choice (the harness's target delimiter)
    acc        = 1 if the highest log-likelihood choice is the gold one
    acc_norm   = the same with each log-likelihood divided by the choice's length
                 in characters (lm-evaluation-harness and LightEval's acc_norm)

Tokenization as the harness: the context alone, and the continuation as the
tokens the whole text has past the context's tokens. Few-shot examples are drawn
deterministically from `seed`, never the example itself.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from maxllm.data.sources import iter_jsonl
from maxllm.eval.perplexity import EvalDataError
from maxllm.eval.scoring import LanguageModel


@dataclasses.dataclass(frozen=True)
class Choice:
    query: str
    choices: tuple[str, ...]
    gold: int


def read_choice_file(path: str | Path, limit: int | None = None) -> list[Choice]:
    """Examples of a generic multiple-choice file; a bad line names file and line."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: not found")
    out = []
    for line_no, record in iter_jsonl(path):
        where = f"{path}:{line_no}"
        if not isinstance(record, dict):
            raise EvalDataError(f"{where}: expected an object with query, choices, gold")
        query, choices, gold = record.get("query"), record.get("choices"), record.get("gold")
        if not isinstance(query, str):
            raise EvalDataError(f"{where}: 'query' must be a string")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise EvalDataError(f"{where}: 'choices' must be a list of at least two strings")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise EvalDataError(f"{where}: 'gold'={gold!r} is not among the {len(choices)} choices")
        out.append(Choice(query, tuple(choices), gold))
        if limit is not None and len(out) >= limit:
            break
    return out


def fewshot_prefix(pool: list[Choice], k: int, rng: random.Random, exclude: Choice | None = None) -> str:
    if k == 0:
        return ""
    candidates = [ex for ex in pool if ex != exclude]
    if len(candidates) < k:
        raise EvalDataError(f"{k}-shot needs {k} few-shot examples; the pool has {len(candidates)}")
    shots = rng.sample(candidates, k)
    return "".join(f"{ex.query} {ex.choices[ex.gold]}\n\n" for ex in shots)


def score_choices(lm: LanguageModel, examples: list[Choice], num_fewshot: int = 0,
                  pool: list[Choice] | None = None, seed: int = 1234) -> dict:
    """{acc, acc_norm, n, loglikelihoods}: per example the log-likelihood of each choice."""
    if lm.tokenizer is None:
        raise EvalDataError("multiple-choice scoring needs the model's tokenizer")
    rng = random.Random(seed)
    requests, spans = [], []
    for ex in examples:
        context = fewshot_prefix(pool if pool is not None else examples, num_fewshot, rng, ex) + ex.query
        context_ids = lm.tokenizer.encode(context)
        start = len(requests)
        for choice in ex.choices:
            continuation_ids = lm.tokenizer.encode(context + " " + choice)[len(context_ids):]
            if not continuation_ids:
                raise EvalDataError(f"choice {choice!r} of query {ex.query[:40]!r} encodes to no tokens")
            requests.append((context_ids, continuation_ids))
        spans.append((start, len(ex.choices)))
    results = lm.loglikelihood(requests)
    acc = acc_norm = 0
    per_example = []
    for ex, (start, n) in zip(examples, spans):
        lls = [results[start + i][0] for i in range(n)]
        per_example.append(lls)
        acc += int(max(range(n), key=lambda i: lls[i]) == ex.gold)
        acc_norm += int(max(range(n), key=lambda i: lls[i] / len(" " + ex.choices[i])) == ex.gold)
    n = max(len(examples), 1)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": len(examples), "loglikelihoods": per_example}
