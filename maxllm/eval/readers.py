"""Readers for the released files of public multiple-choice benchmarks, with the
prompts lm-evaluation-harness uses, so scores compare with published ones. The
user brings the files (nothing is downloaded); `--tasks READER=PATH`:

    hellaswag      hellaswag_val.jsonl (rowanz/hellaswag); shots from hellaswag_train.jsonl beside it
    arc_easy,      ARC-Easy-Test.jsonl / ARC-Challenge-Test.jsonl (or -Dev) from ARC-V1-Feb2018;
    arc_challenge  shots from the -Train file beside it
    piqa           valid.jsonl with valid-labels.lst beside it (ybisk/piqa); shots from train.jsonl
    winogrande     dev.jsonl (allenai/winogrande); shots from train_xl.jsonl beside it
    mmlu           the data/ folder of hendrycks/test (test/*.csv, dev/*.csv), a split
                   folder, or one subject's CSV; shots are the subject's dev questions in order

Without the file of shots beside it, shots come from the evaluated file itself
(never the example being scored). A line that does not parse names its file and
line; an example whose answer is not among its choices is an error.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Callable

from maxllm.data.sources import iter_jsonl
from maxllm.eval.perplexity import EvalDataError
from maxllm.eval.tasks import Choice, Task


def _records(path: Path, limit: int | None = None):
    if not path.is_file():
        raise EvalDataError(f"{path}: not found")
    count = 0
    for line_no, record in iter_jsonl(path):
        if not isinstance(record, dict):
            raise EvalDataError(f"{path}:{line_no}: expected a JSON object")
        yield f"{path}:{line_no}", record
        count += 1
        if limit is not None and count >= limit:
            return


def _field(record: dict, key: str, where: str, kind: type = str):
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise EvalDataError(f"{where}: no field {key!r}")
        value = value[part]
    if not isinstance(value, kind):
        raise EvalDataError(f"{where}: field {key!r} should be a {kind.__name__}, got {value!r}")
    return value


def _with_pool(name: str, path: Path, limit, parse, pool_path: Path | None) -> list[Task]:
    examples = [parse(where, r) for where, r in _records(path, limit)]
    pool = [parse(where, r) for where, r in _records(pool_path)] if pool_path and pool_path.is_file() else None
    return [Task(name, "multiple_choice", str(path), examples, pool)]


# --------------------------------------------------------------------- HellaSwag


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(where: str, r: dict) -> Choice:
    context = _field(r, "ctx_a", where) + " " + _field(r, "ctx_b", where).capitalize()
    endings = _field(r, "endings", where, list)
    label = r.get("label")
    if label in (None, ""):
        raise EvalDataError(f"{where}: no label (the released test split has none; use hellaswag_val.jsonl)")
    gold = _index(label, len(endings), where)
    return Choice(_hellaswag_text(_field(r, "activity_label", where) + ": " + context),
                  tuple(_hellaswag_text(e) for e in endings), gold)


def read_hellaswag(name: str, path: Path, limit: int | None = None) -> list[Task]:
    return _with_pool(name, path, limit, _hellaswag, path.with_name("hellaswag_train.jsonl"))


# --------------------------------------------------------------------------- ARC


def _arc(where: str, r: dict) -> Choice:
    stem = _field(r, "question.stem", where)
    choices = _field(r, "question.choices", where, list)
    if not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in choices):
        raise EvalDataError(f"{where}: 'question.choices' should be a list of {{text, label}}")
    labels = [str(c.get("label")) for c in choices]
    key = str(_field(r, "answerKey", where))
    if key not in labels:
        raise EvalDataError(f"{where}: answerKey {key!r} is not among the choice labels {labels}")
    return Choice(f"Question: {stem}\nAnswer:", tuple(c["text"] for c in choices), labels.index(key))


def read_arc(name: str, path: Path, limit: int | None = None) -> list[Task]:
    train = re.sub(r"-(Test|Dev)(\.jsonl)$", r"-Train\2", path.name)
    return _with_pool(name, path, limit, _arc, path.with_name(train) if train != path.name else None)


# -------------------------------------------------------------------------- PIQA


def _piqa_examples(path: Path, limit: int | None) -> list[Choice]:
    labels_path = path.with_name(path.name.split(".")[0] + "-labels.lst")
    if not labels_path.is_file():
        raise EvalDataError(f"{path}: PIQA's answers are in {labels_path.name} beside it, which is missing")
    labels = labels_path.read_text().split()
    examples = []
    for i, (where, r) in enumerate(_records(path, limit)):
        if i >= len(labels):
            raise EvalDataError(f"{where}: no answer for this line in {labels_path} ({len(labels)} lines)")
        solutions = (_field(r, "sol1", where), _field(r, "sol2", where))
        gold = _index(labels[i], 2, f"{labels_path}:{i + 1}")
        examples.append(Choice(f"Question: {_field(r, 'goal', where)}\nAnswer:", solutions, gold))
    return examples


def read_piqa(name: str, path: Path, limit: int | None = None) -> list[Task]:
    train = path.with_name("train.jsonl")
    pool = _piqa_examples(train, None) if train.is_file() and train != path else None
    return [Task(name, "multiple_choice", str(path), _piqa_examples(path, limit), pool)]


# -------------------------------------------------------------------- WinoGrande


def _winogrande(where: str, r: dict) -> Choice:
    sentence = _field(r, "sentence", where)
    if sentence.count("_") != 1:
        raise EvalDataError(f"{where}: the sentence should have one '_' blank")
    answer = r.get("answer")
    if answer in (None, ""):
        raise EvalDataError(f"{where}: no answer (the released test split has none; use dev.jsonl)")
    blank = sentence.index("_")
    options = (_field(r, "option1", where), _field(r, "option2", where))
    return Choice("", tuple(sentence[:blank] + o for o in options), _index(answer, 2, where, first=1),
                  continuation=sentence[blank + 1 :].strip())


def read_winogrande(name: str, path: Path, limit: int | None = None) -> list[Task]:
    return _with_pool(name, path, limit, _winogrande, path.with_name("train_xl.jsonl"))


# -------------------------------------------------------------------------- MMLU


def _mmlu_file(path: Path, limit: int | None = None) -> list[Choice]:
    examples = []
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            where = f"{path}:{line_no}"
            if len(row) != 6:
                raise EvalDataError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
            question, *options, answer = row
            if answer not in "ABCD" or len(answer) != 1:
                raise EvalDataError(f"{where}: answer {answer!r} is not one of A, B, C, D")
            text = question.strip() + "".join(f"\n{letter}. {o}" for letter, o in zip("ABCD", options)) + "\nAnswer:"
            examples.append(Choice(text, ("A", "B", "C", "D"), "ABCD".index(answer)))
            if limit is not None and len(examples) >= limit:
                break
    return examples


def read_mmlu(name: str, path: Path, limit: int | None = None) -> list[Task]:
    if path.is_dir() and (path / "test").is_dir():
        path = path / "test"
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise EvalDataError(f"{path}: no MMLU CSV files (expected data/test/<subject>_test.csv)")
    tasks = []
    for file in files:
        subject = re.sub(r"_(test|val|dev)$", "", file.stem)
        dev = file.parent.parent / "dev" / f"{subject}_dev.csv"
        pool = _mmlu_file(dev) if dev.is_file() and dev != file else None
        description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        tasks.append(Task(f"{name}_{subject}", "multiple_choice", str(file), _mmlu_file(file, limit), pool,
                          description, "first", group=name))
    return tasks


def _index(label, count: int, where: str, first: int = 0) -> int:
    """A label ("2", 2) as a choice index; `first` is the label of choice 0."""
    try:
        index = int(label) - first
    except (TypeError, ValueError):
        raise EvalDataError(f"{where}: label {label!r} is not a number") from None
    if not 0 <= index < count:
        raise EvalDataError(f"{where}: label {label!r} is not among the {count} choices")
    return index


READERS: dict[str, Callable[[str, Path, int | None], list[Task]]] = {
    "hellaswag": read_hellaswag,
    "arc_easy": read_arc,
    "arc_challenge": read_arc,
    "piqa": read_piqa,
    "winogrande": read_winogrande,
    "mmlu": read_mmlu,
}
