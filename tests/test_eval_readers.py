"""Readers of released benchmark files: the (context, continuation) pairs they make
equal lm-evaluation-harness's for the same examples (its own task definitions,
pointed at local copies of the files), few-shot pools, and clear errors. The
example texts are written for these tests."""

import csv
import json
from pathlib import Path

import pytest

from maxllm.eval import EvalDataError, load_tasks

HELLASWAG = [
    {"ind": 4, "activity_label": "Making tea", "ctx_a": "A man fills a kettle with water and sets it on the stove.",
     "ctx_b": "he", "ctx": "...", "split": "val", "split_type": "indomain", "source_id": "x",
     "endings": ["waits for the water to boil [title] Pour it over the leaves.", "throws the kettle out of the window.",
                 "reads a newspaper  about trains.", "[header] paints the stove blue."], "label": 0},
    {"ind": 7, "activity_label": "Tying shoes", "ctx_a": "A girl sits on the stairs.", "ctx_b": "she",
     "ctx": "...", "split": "val", "split_type": "zeroshot", "source_id": "y",
     "endings": ["ties a knot with the laces.", "eats the laces.", "sings to the stairs.", "flies away."], "label": "0"},
]
ARC = [
    {"id": "q1", "question": {"stem": "Which tool measures temperature?",
                              "choices": [{"text": "a thermometer", "label": "A"}, {"text": "a ruler", "label": "B"},
                                          {"text": "a scale", "label": "C"}]}, "answerKey": "A"},
    {"id": "q2", "question": {"stem": "What does a plant need to make food?",
                              "choices": [{"text": "sand", "label": "1"}, {"text": "sunlight", "label": "2"},
                                          {"text": "noise", "label": "3"}, {"text": "plastic", "label": "4"}]},
     "answerKey": "2"},
]
PIQA = [
    ({"goal": "Keep bread fresh for longer.", "sol1": "Store it in a sealed bag.", "sol2": "Leave it in the rain."}, 0),
    ({"goal": "Cool a hot drink quickly.", "sol1": "Put it in the oven.", "sol2": "Add an ice cube to it."}, 1),
]
WINOGRANDE = [
    {"qID": "a", "sentence": "The cup fell off the table because _ was too close to the edge.",
     "option1": "the cup", "option2": "the table", "answer": "1"},
    {"qID": "b", "sentence": "Maria lent Anna her bike because _ needed one for the weekend.",
     "option1": "Maria", "option2": "Anna", "answer": "2"},
]
MMLU = {
    "test": [["What is 2 + 3?", "4", "5", "6", "7", "B"], ["Which number is prime?", "4", "6", "7", "9", "C"],
             ["  What is 10 / 2?  ", "2", "5", "10", "20", "B"]],
    "dev": [["What is 1 + 1?", "1", "2", "3", "4", "B"], ["What is 3 * 3?", "6", "8", "9", "12", "C"]],
}


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _mmlu(root: Path, subject: str = "elementary_math") -> Path:
    for split, rows in MMLU.items():
        (root / "data" / split).mkdir(parents=True, exist_ok=True)
        with open(root / "data" / split / f"{subject}_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return root / "data"


def _pairs(task) -> list[list[tuple[str, str]]]:
    return [ex.requests("") for ex in task.examples]


def _harness_pairs(tmp_path: Path, name: str, harness_yaml: str, rows: list[dict], split: str,
                   extra: str = "") -> list[list[tuple[str, str]]]:
    """The harness's own task `harness_yaml` over a local copy of `rows`."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: "
                                                    "pip install 'maxllm[harness]'")
    from lm_eval.tasks import TaskManager, get_task_dict

    folder = tmp_path / f"harness_{name}"
    folder.mkdir()
    data = _jsonl(folder / "data.jsonl", rows)
    harness = Path(lm_eval.__file__).parent / "tasks" / harness_yaml
    (folder / "task.yaml").write_text(
        f"include: {harness}\ntask: local_{name}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs: {{data_files: {{{split}: '{data}'}}}}\ntraining_split: null\nvalidation_split: null\n"
        f"test_split: null\nfewshot_split: null\n{split}_split: {split}\n{extra}")
    task = get_task_dict([f"local_{name}"], TaskManager(include_path=str(folder)))[f"local_{name}"]
    task.build_all_requests(rank=0, world_size=1)
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst.args)
    return [by_doc[i] for i in sorted(by_doc)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def test_hellaswag_prompts_equal_the_harness(tmp_path):
    path = _jsonl(tmp_path / "hellaswag_val.jsonl", HELLASWAG)
    [task] = load_tasks(f"hellaswag={path}")
    assert task.examples[0].query == "Making tea: A man fills a kettle with water and sets it on the stove. He"
    assert task.examples[0].choices[0] == "waits for the water to boil. Pour it over the leaves."
    assert [ex.gold for ex in task.examples] == [0, 0]
    assert task.pool is None  # no hellaswag_train.jsonl beside it
    rows = [{**r, "label": str(r["label"])} for r in HELLASWAG]  # the Hub copy's labels are strings
    assert _pairs(task) == _harness_pairs(tmp_path, "hellaswag", "hellaswag/hellaswag.yaml", rows, "validation")


def test_arc_prompts_equal_the_harness(tmp_path):
    path = _jsonl(tmp_path / "ARC-Easy-Test.jsonl", ARC)
    _jsonl(tmp_path / "ARC-Easy-Train.jsonl", ARC[:1])
    [task] = load_tasks(f"arc_easy={path}")
    assert task.examples[0].query == "Question: Which tool measures temperature?\nAnswer:"
    assert [ex.gold for ex in task.examples] == [0, 1] and len(task.pool) == 1
    hub = [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
            "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                        "label": [c["label"] for c in r["question"]["choices"]]}} for r in ARC]
    assert _pairs(task) == _harness_pairs(tmp_path, "arc", "arc/arc_easy.yaml", hub, "test")


def test_piqa_prompts_equal_the_harness(tmp_path):
    path = _jsonl(tmp_path / "valid.jsonl", [r for r, _ in PIQA])
    (tmp_path / "valid-labels.lst").write_text("".join(f"{label}\n" for _, label in PIQA))
    [task] = load_tasks(f"piqa={path}")
    assert [ex.gold for ex in task.examples] == [0, 1]
    hub = [{**r, "label": label} for r, label in PIQA]
    assert _pairs(task) == _harness_pairs(tmp_path, "piqa", "piqa/piqa.yaml", hub, "validation")


def test_winogrande_prompts_equal_the_harness(tmp_path):
    path = _jsonl(tmp_path / "dev.jsonl", WINOGRANDE)
    [task] = load_tasks(f"winogrande={path}")
    assert _pairs(task)[0] == [("The cup fell off the table because the cup", " was too close to the edge."),
                               ("The cup fell off the table because the table", " was too close to the edge.")]
    assert [ex.gold for ex in task.examples] == [0, 1]
    assert _pairs(task) == _harness_pairs(tmp_path, "winogrande", "winogrande/default.yaml", WINOGRANDE,
                                          "validation")


def test_mmlu_prompts_equal_the_harness_and_shots_come_from_dev_in_order(tmp_path):
    from maxllm.eval.tasks import _prompts

    data = _mmlu(tmp_path)
    for spec in (f"mmlu={data}", f"mmlu={data / 'test'}", f"mmlu={data / 'test' / 'elementary_math_test.csv'}"):
        [task] = load_tasks(spec)
        assert task.name == "mmlu_elementary_math" and task.group == "mmlu" and len(task.pool) == 2
    assert task.examples[2].query == "What is 10 / 2?\nA. 2\nB. 5\nC. 10\nD. 20\nAnswer:"
    assert [ex.gold for ex in task.examples] == [1, 2, 1]
    hub = [{"question": q, "subject": "elementary_math", "choices": [a, b, c, d], "answer": "ABCD".index(k)}
           for q, a, b, c, d, k in MMLU["test"]]
    assert _pairs(task) == _harness_pairs(tmp_path, "mmlu", "mmlu/default/_default_template_yaml", hub, "test")
    prefix = _prompts(task, 2, seed=0)[0]
    assert prefix == ("The following are multiple choice questions (with answers) about elementary math.\n\n"
                      "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                      "What is 3 * 3?\nA. 6\nB. 8\nC. 9\nD. 12\nAnswer: C\n\n")


def test_few_shot_draws_are_deterministic_and_never_the_example(tmp_path):
    from maxllm.eval.tasks import _prompts

    path = _jsonl(tmp_path / "mc.jsonl", [{"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(6)])
    [task] = load_tasks(str(path))
    first, again, other = (_prompts(task, 3, seed) for seed in (1, 1, 2))
    assert first == again and first != other
    for ex, prefix in zip(task.examples, first):
        assert prefix.count("\n\n") == 3 and f"{ex.query} " not in prefix
    # lines marked "fewshot" are the pool and are not scored
    rows = [{"query": "shot", "choices": ["a", "b"], "gold": 1, "fewshot": True},
            {"query": "scored", "choices": ["a", "b"], "gold": 0}]
    [task] = load_tasks(str(_jsonl(tmp_path / "pool.jsonl", rows)))
    assert [ex.query for ex in task.examples] == ["scored"]
    assert _prompts(task, 1, 0) == ["shot b\n\n"]


@pytest.mark.parametrize("reader, file, rows, message", [
    ("hellaswag", "hellaswag_test.jsonl", [{**HELLASWAG[0], "label": ""}], r"hellaswag_test.jsonl:1: no label"),
    ("hellaswag", "hellaswag_val.jsonl", [HELLASWAG[0], {**HELLASWAG[1], "label": 4}],
     r"hellaswag_val.jsonl:2: label 4 is not among the 4 choices"),
    ("arc_easy", "ARC-Easy-Test.jsonl", [{**ARC[0], "answerKey": "E"}],
     r"ARC-Easy-Test.jsonl:1: answerKey 'E' is not among the choice labels"),
    ("winogrande", "dev.jsonl", [{**WINOGRANDE[0], "sentence": "no blank here"}],
     r"dev.jsonl:1: the sentence should have one '_' blank"),
    ("winogrande", "test.jsonl", [{**WINOGRANDE[0], "answer": ""}], r"test.jsonl:1: no answer"),
    ("piqa", "valid.jsonl", [PIQA[0][0]], r"valid-labels.lst beside it, which is missing"),
])
def test_released_files_with_errors_name_file_and_line(tmp_path, reader, file, rows, message):
    path = _jsonl(tmp_path / file, rows)
    with pytest.raises(EvalDataError, match=message):
        load_tasks(f"{reader}={path}")


def test_mmlu_and_task_name_errors(tmp_path):
    data = _mmlu(tmp_path)
    bad = data / "test" / "elementary_math_test.csv"
    bad.write_text(bad.read_text() + "Which is even?,1,2,3,5,Z\n")
    with pytest.raises(EvalDataError, match=r"elementary_math_test.csv:4: answer 'Z' is not one of A, B, C, D"):
        load_tasks(f"mmlu={data}")
    with pytest.raises(EvalDataError, match="unknown reader 'squad'"):
        load_tasks("squad=/x.jsonl")
    with pytest.raises(EvalDataError, match=r"not a sample task \(docs_mc, docs_qa\)"):
        load_tasks("docs_nothing")
    gen = _jsonl(tmp_path / "gen.jsonl", [{"query": "q", "answer": "a"}, {"query": "q", "answer": ["a", 3]}])
    with pytest.raises(EvalDataError, match=r"gen.jsonl:2: 'answer' must be a non-empty string or a list of them"):
        load_tasks(str(gen))


def test_the_sample_tasks_read():
    [mc] = load_tasks("docs_mc")
    [qa] = load_tasks("docs_qa")
    assert mc.kind == "multiple_choice" and len(mc.examples) == 32 and len(mc.pool) == 4
    assert qa.kind == "generate" and len(qa.examples) == 16 and len(qa.pool) == 3
    assert len({ex.gold for ex in mc.examples}) == 4  # the answers are not all in one position
