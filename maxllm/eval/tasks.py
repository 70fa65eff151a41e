"""Tasks: multiple choice scored by log-likelihood, generation scored by exact
match, and perplexity over a text file; how a task is named on the command line;
and running tasks on a model.

Generic JSONL format (docs/eval.md), one example per line:

    multiple choice  {"query": str, "choices": [str, ...], "gold": int}
    generation       {"query": str, "answer": str | [str, ...], "stop": [str, ...]?, "max_new_tokens": int?}

Either kind may mark lines `"fewshot": true`: they form the few-shot pool and are
not scored. Without a pool, shots come from the other scored examples.

    prompt    = description + shots ("query answer" blocks, each ending in a blank
                line) + query
    scored    = " " + choice after the prompt, for each choice
    acc       = 1 if the highest log-likelihood choice is the gold one
    acc_norm  = the same with each log-likelihood divided by the choice's length in
                characters (lm-evaluation-harness's acc_norm)
    exact_match = 1 if the greedy continuation, stripped, equals an answer stripped

Shots are drawn deterministically from `seed` (or the pool's first k, for tasks
whose released few-shot split is meant to be read in order, as MMLU's dev set),
never the example itself.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any, Literal

from maxllm.data.sources import iter_jsonl
from maxllm.eval.perplexity import EvalDataError, perplexity
from maxllm.eval.scoring import LanguageModel

SAMPLE_TASKS = Path(__file__).parent / "sample_tasks"
METRICS = ("acc", "acc_norm", "exact_match", "perplexity", "bits_per_byte")  # what a task reports


@dataclasses.dataclass(frozen=True)
class Choice:
    """A multiple-choice example. With `continuation` set (WinoGrande's partial
    scoring), each choice completes the query and `continuation` is scored after
    each; otherwise each choice is scored after the query."""

    query: str
    choices: tuple[str, ...]
    gold: int
    continuation: str | None = None

    def requests(self, prefix: str) -> list[tuple[str, str]]:
        if self.continuation is not None:
            return [(prefix + self.query + c, " " + self.continuation) for c in self.choices]
        return [(prefix + self.query, " " + c) for c in self.choices]

    def shot(self) -> str:
        context, continuation = self.requests("")[self.gold]
        return context + continuation


@dataclasses.dataclass(frozen=True)
class Generation:
    """A generation example: the greedy continuation of `query`, up to a stop
    string, should equal one of `answers`."""

    query: str
    answers: tuple[str, ...]
    stop: tuple[str, ...] = ("\n\n",)
    max_new_tokens: int = 256

    def shot(self) -> str:
        return f"{self.query} {self.answers[0]}"


@dataclasses.dataclass
class Task:
    name: str
    kind: Literal["multiple_choice", "generate", "perplexity"]
    path: str
    examples: list = dataclasses.field(default_factory=list)
    pool: list | None = None  # the few-shot pool; None: the other examples
    description: str = ""  # put before the shots (MMLU's subject line)
    fewshot_order: Literal["random", "first"] = "random"
    group: str | None = None  # reported also as an average over its group (MMLU's subjects)


# ---------------------------------------------------------------------------------
# The generic format


def read_choice_file(path: str | Path, limit: int | None = None) -> list[Choice]:
    """The scored examples of a generic multiple-choice file."""
    task = read_generic(path, limit)
    if task.kind != "multiple_choice":
        raise EvalDataError(f"{path}: not a multiple-choice file (its first line has no 'choices')")
    return task.examples


def read_generic(path: str | Path, limit: int | None = None, name: str | None = None) -> Task:
    """A generic JSONL task file; its kind comes from its first line (`choices`:
    multiple choice, `answer`: generation). A bad line names file and line."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: not found")
    kind = None
    examples, pool = [], []
    for line_no, record in iter_jsonl(path):
        where = f"{path}:{line_no}"
        if not isinstance(record, dict):
            raise EvalDataError(f"{where}: expected an object with query and choices/gold or answer")
        if kind is None:
            kind = "multiple_choice" if "choices" in record else "generate" if "answer" in record else None
            if kind is None:
                raise EvalDataError(f"{where}: neither 'choices' (multiple choice) nor 'answer' (generation)")
        example = _choice(record, where) if kind == "multiple_choice" else _generation(record, where)
        fewshot = record.get("fewshot", False)
        if not isinstance(fewshot, bool):
            raise EvalDataError(f"{where}: 'fewshot' must be true or false")
        if fewshot:
            pool.append(example)
        elif limit is None or len(examples) < limit:
            examples.append(example)
    if kind is None:
        raise EvalDataError(f"{path}: no examples")
    return Task(name or path.name.split(".")[0], kind, str(path), examples, pool or None)


def _choice(record: dict, where: str) -> Choice:
    query, choices, gold = record.get("query"), record.get("choices"), record.get("gold")
    if not isinstance(query, str):
        raise EvalDataError(f"{where}: 'query' must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise EvalDataError(f"{where}: 'choices' must be a list of at least two strings")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise EvalDataError(f"{where}: 'gold'={gold!r} is not among the {len(choices)} choices")
    return Choice(query, tuple(choices), gold)


def _generation(record: dict, where: str) -> Generation:
    query, answer = record.get("query"), record.get("answer")
    stop, max_new = record.get("stop", ["\n\n"]), record.get("max_new_tokens", 256)
    if not isinstance(query, str):
        raise EvalDataError(f"{where}: 'query' must be a string")
    answers = [answer] if isinstance(answer, str) else answer
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise EvalDataError(f"{where}: 'answer' must be a non-empty string or a list of them")
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise EvalDataError(f"{where}: 'stop' must be a list of non-empty strings")
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise EvalDataError(f"{where}: 'max_new_tokens' must be a positive integer")
    return Generation(query, tuple(answers), tuple(stop), max_new)


# ---------------------------------------------------------------------------------
# Naming tasks: "docs_mc" (a sample task), "path/to/file.jsonl", "hellaswag=path"


def load_tasks(spec: str, limit: int | None = None) -> list[Task]:
    """The tasks a `--tasks` entry names:

        NAME            a sample task shipped with maxllm (maxllm/eval/sample_tasks/NAME.jsonl)
        PATH            a generic JSONL task file (.jsonl), or a text file for perplexity (.txt)
        READER=PATH     a released benchmark file read by READER (hellaswag, arc_easy,
                        arc_challenge, piqa, winogrande, mmlu), or `perplexity=PATH` for a
                        .txt/.jsonl file of documents
    """
    from maxllm.eval import readers

    spec = spec.strip()
    if "=" in spec:
        reader, path = (s.strip() for s in spec.split("=", 1))
        if reader == "perplexity":
            return [Task(Path(path).name.split(".")[0], "perplexity", path)]
        if reader not in readers.READERS:
            raise EvalDataError(f"task {spec!r}: unknown reader {reader!r}; known: "
                                f"{', '.join(['perplexity', *readers.READERS])}")
        return readers.READERS[reader](reader, Path(path), limit)
    sample = SAMPLE_TASKS / f"{spec}.jsonl"
    if "/" not in spec and not spec.endswith((".jsonl", ".txt", ".gz")):
        if not sample.is_file():
            known = sorted(p.name.split(".")[0] for p in SAMPLE_TASKS.glob("*.jsonl"))
            raise EvalDataError(f"task {spec!r}: not a sample task ({', '.join(known)}), a file path, "
                                f"or READER=PATH")
        return [read_generic(sample, limit)]
    if spec.endswith(".txt"):
        return [Task(Path(spec).stem, "perplexity", spec)]
    return [read_generic(spec, limit)]


# ---------------------------------------------------------------------------------
# Running


def fewshot_prefix(pool: list, k: int, rng: random.Random, exclude: Any = None, order: str = "random") -> str:
    """k solved examples from `pool` (never `exclude`), each followed by a blank line."""
    if k == 0:
        return ""
    candidates = [ex for ex in pool if ex != exclude]
    if len(candidates) < k:
        raise EvalDataError(f"{k}-shot needs {k} few-shot examples; the pool has {len(candidates)}")
    shots = candidates[:k] if order == "first" else rng.sample(candidates, k)
    return "".join(f"{ex.shot()}\n\n" for ex in shots)


def _prompts(task: Task, num_fewshot: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pool = task.pool if task.pool is not None else task.examples
    return [task.description + fewshot_prefix(pool, num_fewshot, rng, ex, task.fewshot_order)
            for ex in task.examples]


def score_choices(lm: LanguageModel, examples: list[Choice], num_fewshot: int = 0, pool: list | None = None,
                  seed: int = 1234, description: str = "", fewshot_order: str = "random") -> dict:
    """{acc, acc_norm, n, loglikelihoods}: per example the log-likelihood of each choice."""
    task = Task("", "multiple_choice", "", examples, pool, description, fewshot_order)  # type: ignore[arg-type]
    return _run_choices(lm, task, num_fewshot, seed)


def _run_choices(lm: LanguageModel, task: Task, num_fewshot: int, seed: int) -> dict:
    requests, spans = [], []
    for ex, prefix in zip(task.examples, _prompts(task, num_fewshot, seed)):
        start = len(requests)
        for context, continuation in ex.requests(prefix):
            context_ids, continuation_ids = lm.encode_pair(context, continuation)
            if not continuation_ids:
                raise EvalDataError(f"{task.path}: {continuation!r} after {context[-40:]!r} encodes to no tokens")
            requests.append((context_ids, continuation_ids))
        spans.append((start, len(ex.choices)))
    results = lm.loglikelihood(requests)
    correct, correct_norm, per_example = [], [], []
    for ex, (start, n) in zip(task.examples, spans):
        lls = [results[start + i][0] for i in range(n)]
        per_example.append(lls)
        correct.append(float(_argmax(lls) == ex.gold))
        correct_norm.append(float(_argmax([ll / len(c) for ll, c in zip(lls, ex.choices)]) == ex.gold))
    return {**_mean("acc", correct), **_mean("acc_norm", correct_norm), "n": len(task.examples),
            "loglikelihoods": per_example}


def _run_generation(lm: LanguageModel, task: Task, num_fewshot: int, seed: int) -> dict:
    requests = [(prefix + ex.query, ex.stop, ex.max_new_tokens)
                for ex, prefix in zip(task.examples, _prompts(task, num_fewshot, seed))]
    outputs = lm.generate_until(requests)
    correct = [float(out.strip() in {a.strip() for a in ex.answers}) for ex, out in zip(task.examples, outputs)]
    return {**_mean("exact_match", correct), "n": len(task.examples), "outputs": outputs}


def run_task(lm: LanguageModel, task: Task, num_fewshot: int = 0, seed: int = 1234, limit: int | None = None) -> dict:
    """The task's metrics on `lm` (with per-example detail under `loglikelihoods`
    or `outputs`), and its wall time."""
    start = time.perf_counter()
    if task.kind == "perplexity":
        out = perplexity(lm, task.path, limit=limit)
    elif not task.examples:
        raise EvalDataError(f"{task.path}: no examples to score")
    elif task.kind == "multiple_choice":
        out = _run_choices(lm, task, num_fewshot, seed)
    else:
        out = _run_generation(lm, task, num_fewshot, seed)
    return {**out, "seconds": time.perf_counter() - start}


def evaluate(lm: LanguageModel, specs: list[str], num_fewshot: int = 0, limit: int | None = None,
             seed: int = 1234, details: bool = False) -> dict[str, dict]:
    """{task name: metrics} for every task the specs name (see `evaluate_tasks`)."""
    tasks = [task for spec in specs for task in load_tasks(spec, limit)]
    return evaluate_tasks(lm, tasks, num_fewshot, limit, seed, details)


def evaluate_tasks(lm: LanguageModel, tasks: list[Task], num_fewshot: int = 0, limit: int | None = None,
                   seed: int = 1234, details: bool = False) -> dict[str, dict]:
    """{task name: metrics}; a group (MMLU's subjects) also gets its
    example-weighted average under the group's name, as the harness reports it."""
    results: dict[str, dict] = {}
    groups: dict[str, list[dict]] = {}
    for task in tasks:
        out = run_task(lm, task, num_fewshot, seed, limit)
        if not details:
            out = {k: v for k, v in out.items() if k not in ("loglikelihoods", "outputs")}
        results[task.name] = out
        if task.group:
            groups.setdefault(task.group, []).append(out)
    for group, outs in groups.items():
        n = sum(o["n"] for o in outs)
        agg = {"n": n, "seconds": sum(o["seconds"] for o in outs)}
        for metric in ("acc", "acc_norm"):
            agg[metric] = sum(o[metric] * o["n"] for o in outs) / max(n, 1)
        results[group] = agg
    return results


def _argmax(values: list[float]) -> int:
    """The first index of the largest value (numpy's tie rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _mean(name: str, values: list[float]) -> dict[str, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n)),
    as the harness reports them."""
    n = len(values)
    mean = sum(values) / max(n, 1)
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {name: mean, f"{name}_stderr": math.sqrt(var / n) if n else 0.0}
