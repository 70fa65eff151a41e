"""Evaluation against transformers on the same exported model: continuation
log-likelihoods, greedy flags, bits-per-byte of a text file, multiple-choice
scores and greedy generation; the `python -m maxllm.eval` command."""

import gzip
import json
import math

import numpy as np
import pytest

from maxllm.eval import EvalDataError, LanguageModel, perplexity

from conftest import QUICKSTART, train_on_quickstart

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model trained a few steps on the quickstart shards, as an HF folder."""
    from maxllm.hf import export_run

    out = tmp_path_factory.mktemp("eval")
    train_on_quickstart(out / "run", "train.steps=6", "train.lr=3e-3", "model.max_seq_len=64", "model.init_std=0.1")
    return export_run(out / "run", out / "hf", dtype="float32")


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _their_logprobs(hf, ids):
    """log P(ids[1:] | prefix) with transformers, one sequence."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids[:-1]])).logits.float()
    logprobs = torch.log_softmax(logits, -1)[0]
    targets = torch.tensor(ids[1:])
    return logprobs[torch.arange(len(targets)), targets].numpy(), (logits[0].argmax(-1) == targets).numpy()


def test_continuation_loglikelihoods_equal_transformers(exported):
    lm = LanguageModel.load(exported, batch_size=4)
    hf = _hf(exported)
    tok = lm.tokenizer
    context = tok.encode("To create a table in PostgreSQL, use the")
    choices = [" CREATE TABLE command.", " function", " Django model, which is a class", " x"]
    requests = [(context, tok.encode(c)) for c in choices] + [([5, 9], [7])]
    ours = lm.loglikelihood(requests)
    for (ctx, cont), (logprob, greedy) in zip(requests, ours):
        theirs, their_greedy = _their_logprobs(hf, [*ctx, *cont])
        assert logprob == pytest.approx(float(theirs[-len(cont):].sum()), abs=1e-4)
        assert greedy == bool(their_greedy[-len(cont):].all())
    # the argmax continuation is reported greedy
    first = hf(torch.tensor([context])).logits[0, -1].argmax().item()
    assert lm.loglikelihood([(context, [first])])[0][1] is True


def test_shared_contexts_score_as_separate_sequences(exported):
    """Choices of one question run their context once (its cache reused); the
    log-likelihoods and greedy flags equal scoring each pair on its own, also for
    pairs longer than the model (cut from the left, never shared)."""
    lm = LanguageModel.load(exported, batch_size=4)
    tok = lm.tokenizer
    contexts = [tok.encode(t) for t in ("To create a table in PostgreSQL, use the", "The function returns",
                                        "In Django, a model " * 8, "x")]
    continuations = [tok.encode(t) for t in (" CREATE TABLE command.", " a value", " x", " Django model class",
                                             " SELECT * FROM table WHERE id = 1;")]
    requests = [(c, k) for c in contexts for k in continuations] + [(contexts[2] * 2, continuations[0])]
    assert lm.share_contexts
    shared = lm.loglikelihood(requests)
    lm.share_contexts = False
    separate = lm.loglikelihood(requests)
    np.testing.assert_allclose([s[0] for s in shared], [s[0] for s in separate], atol=1e-4)
    assert [s[1] for s in shared] == [s[1] for s in separate]


def test_bits_per_byte_equals_transformers_over_long_documents(exported, tmp_path):
    docs = [json.loads(line)["text"] for line in gzip.open(QUICKSTART / "valid.jsonl.gz", "rt")][:3]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d[:1500]}) + "\n" for d in docs))
    lm = LanguageModel.load(exported, batch_size=8)
    result = perplexity(lm, path)
    assert result["tokens"] > 3 * lm.max_len  # several windows per document

    hf = _hf(exported)
    nll, nbytes = 0.0, 0
    for d in docs:
        text = d[:1500]
        ids = lm.tokenizer.encode(text)
        prefix = lm.tokenizer.bos_id if lm.tokenizer.bos_id is not None else lm.tokenizer.eos_id
        shifted = [prefix, *ids]
        for start in range(0, len(ids), lm.max_len):  # disjoint windows, each after the token before it;
            end = min(start + lm.max_len, len(ids))   # a short last one with the full length of context
            window = shifted[max(0, end - lm.max_len) : end + 1]
            nll -= float(_their_logprobs(hf, window)[0][-(end - start):].sum())
        nbytes += len(text.encode())
    expected = nll / math.log(2) / nbytes
    print(f"\nbits per byte: maxllm {result['bits_per_byte']:.6f}, transformers {expected:.6f}")
    assert result["bits_per_byte"] == pytest.approx(expected, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(nll / result["tokens"]), rel=1e-4)


def test_a_malformed_document_file_names_its_line(exported, tmp_path):
    lm = LanguageModel.load(exported)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(EvalDataError, match=r"bad.jsonl:2: not valid JSON"):
        perplexity(lm, bad)
    bad.write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(EvalDataError, match=r"bad.jsonl:2: no string field 'text'"):
        perplexity(lm, bad)


MC = [
    {"query": "To create a table in PostgreSQL, use the", "choices": ["CREATE TABLE command.", "print function.",
                                                                       "Django admin."], "gold": 0},
    {"query": "In Python, a function returns", "choices": ["a value.", "a table of rows in the database"], "gold": 0},
    {"query": "The Django ORM maps models to", "choices": ["database tables.", "colors.", "music", "x"], "gold": 0},
    {"query": "SELECT reads rows from", "choices": ["a table.", "the moon."], "gold": 1},
]


@pytest.mark.parametrize("shots", [0, 2])
def test_multiple_choice_scores_equal_transformers(exported, tmp_path, shots):
    from maxllm.eval import read_choice_file, score_choices
    from maxllm.eval.tasks import fewshot_prefix
    import random

    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MC))
    examples = read_choice_file(path)
    lm = LanguageModel.load(exported, batch_size=4)
    ours = score_choices(lm, examples, num_fewshot=shots, seed=7)

    hf = _hf(exported)
    rng = random.Random(7)
    acc = acc_norm = 0
    for ex, lls in zip(examples, ours["loglikelihoods"]):
        context = fewshot_prefix(examples, shots, rng, ex) + ex.query
        ctx = lm.tokenizer.encode(context)
        theirs = []
        for choice in ex.choices:
            cont = lm.tokenizer.encode(context + " " + choice)[len(ctx):]
            theirs.append(float(_their_logprobs(hf, [*ctx, *cont])[0][-len(cont):].sum()))
        np.testing.assert_allclose(lls, theirs, atol=1e-4)
        acc += int(np.argmax(theirs) == ex.gold)
        acc_norm += int(np.argmax([t / len(c) for t, c in zip(theirs, ex.choices)]) == ex.gold)
    assert (ours["acc"], ours["acc_norm"]) == (acc / len(MC), acc_norm / len(MC))


def test_a_task_whose_answer_is_not_among_the_choices_is_reported(tmp_path):
    from maxllm.eval import read_choice_file

    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps(MC[0]) + "\n" + json.dumps({**MC[1], "gold": 2}) + "\n")
    with pytest.raises(EvalDataError, match=r"mc.jsonl:2: 'gold'=2 is not among the 2 choices"):
        read_choice_file(path)


def test_generation_equals_transformers_greedy_decoding(exported):
    lm = LanguageModel.load(exported, batch_size=4)
    hf = _hf(exported)
    contexts = ["To create a table in PostgreSQL,", "The function returns", "In Django, a model",
                "SELECT * FROM", "Python"]
    stops = [(), (".",), ("\n", " the"), (), ("e",)]
    ours = lm.generate_until([(c, s, 12) for c, s in zip(contexts, stops)])
    for context, stop, text in zip(contexts, stops, ours):
        ids = lm.tokenizer.encode(context)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                              eos_token_id=lm.tokenizer.eos_id, pad_token_id=lm.tokenizer.eos_id)
        new = out[0, len(ids):].tolist()
        new = new[: new.index(lm.tokenizer.eos_id)] if lm.tokenizer.eos_id in new else new
        theirs = lm.tokenizer.decode(new)
        cuts = [theirs.find(s) for s in stop if s in theirs]
        expected = theirs[: min(cuts)] if cuts else theirs
        assert text == expected, (context, text, theirs)
    assert any(s and s[0] in t for s, t in zip(stops, [lm.generate_until([(c, (), 12)])[0] for c in contexts]))


def test_generative_task_scores_exact_match(exported, tmp_path):
    from maxllm.eval import read_generic, run_task

    lm = LanguageModel.load(exported, batch_size=4)
    queries = ["The function returns", "To create a table in PostgreSQL,", "In Django, a model", "SELECT", "def"]
    produced = lm.generate_until([(q, (), 20) for q in queries])
    queries, produced = zip(*[(q, p) for q, p in zip(queries, produced) if p.strip()][:3])
    assert len(produced) == 3, produced
    path = tmp_path / "gen.jsonl"
    answers = [produced[0].strip(), "certainly not this", [" nor this", produced[2]]]
    path.write_text("".join(json.dumps({"query": q, "answer": a, "stop": [], "max_new_tokens": 20}) + "\n"
                            for q, a in zip(queries, answers)))
    task = read_generic(path)
    assert task.kind == "generate"
    out = run_task(lm, task)
    assert out["outputs"] == list(produced)
    assert out["exact_match"] == pytest.approx(2 / 3)


def test_eval_command_writes_results(exported, tmp_path, capsys):
    from maxllm.eval.__main__ import main

    docs = tmp_path / "docs.txt"
    docs.write_text(gzip.open(QUICKSTART / "valid.jsonl.gz", "rt").readline()[:3000])
    out = tmp_path / "results.json"
    code = main(["--model", str(exported), "--tasks", f"docs_mc,docs_qa,{docs}", "--num-fewshot", "2",
                 "--limit", "6", "--batch-size", "8", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    results = report["results"]
    assert results["docs_mc"]["n"] == 6 and 0 <= results["docs_mc"]["acc"] <= 1
    assert results["docs_qa"]["n"] == 6 and "exact_match" in results["docs_qa"]
    assert results["docs"]["documents"] == 1 and results["docs"]["bits_per_byte"] > 0
    assert report["config"]["num_fewshot"] == 2
    printed = capsys.readouterr().out
    assert "| docs_mc | 6 | acc |" in printed

    # the same scores through the library, and a bad task file fails before the model loads
    from maxllm.eval import evaluate
    again = evaluate(LanguageModel.load(exported, batch_size=8), ["docs_mc"], num_fewshot=2, limit=6)
    assert again["docs_mc"]["acc"] == results["docs_mc"]["acc"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(MC[0]) + "\n" + '{"query": "x", "choices": ["a"], "gold": 0}\n')
    assert main(["--model", str(tmp_path / "missing"), "--tasks", str(bad)]) == 2
    assert "bad.jsonl:2: 'choices' must be a list of at least two strings" in capsys.readouterr().err


HARNESS_TASKS = {
    "mc": """
output_type: multiple_choice
doc_to_text: "{{query}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
metric_list: [{metric: acc}, {metric: acc_norm}]
""",
    "gen": """
output_type: generate_until
doc_to_text: "{{query}}"
doc_to_target: "{{answer}}"
generation_kwargs: {until: [".", "\\n\\n"], max_gen_toks: 12, do_sample: false}
metric_list: [{metric: exact_match}]
""",
    "ppl": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list: [{metric: word_perplexity}, {metric: byte_perplexity}, {metric: bits_per_byte}]
""",
}


def test_harness_hf_and_maxllm_models_agree(exported, tmp_path, monkeypatch):
    """lm-evaluation-harness's `hf` model and our `maxllm` model on the same three
    tasks (multiple choice, generation, rolling perplexity) over the same files."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: "
                                                    "pip install 'maxllm[harness]'")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    from lm_eval.tasks import TaskManager

    import maxllm.eval.harness  # noqa: F401  (registers the model type)

    files = {
        "mc": [{k: v for k, v in r.items()} for r in MC],
        "gen": [{"query": q, "answer": "CREATE TABLE"} for q in
                ("To create a table in PostgreSQL,", "The function returns", "In Django, a model")],
        "ppl": [{"text": json.loads(line)["text"][:700]} for line in
                gzip.open(QUICKSTART / "valid.jsonl.gz", "rt").readlines()[:3]],
    }
    for name, records in files.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        (tmp_path / f"{name}.yaml").write_text(
            f"task: maxllm_test_{name}\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: '{data}'}}}}\n"
            f"test_split: test\n{HARNESS_TASKS[name]}")
    tasks = [f"maxllm_test_{name}" for name in files]

    def run(model, args):
        return lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, batch_size=4, log_samples=True,
                                       task_manager=TaskManager(include_path=str(tmp_path)))

    theirs = run("hf", f"pretrained={exported},dtype=float32,device=cpu")
    ours = run("maxllm", f"path={exported}")
    for task in tasks:
        mine, ref = ours["results"][task], theirs["results"][task]
        for metric in ("acc,none", "acc_norm,none", "exact_match,none"):
            if metric in ref:
                assert mine[metric] == ref[metric], (task, metric)
        for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
            if metric in ref:
                assert mine[metric] == pytest.approx(ref[metric], rel=1e-4), (task, metric)
        for a, b in zip(ours["samples"][task], theirs["samples"][task]):
            for x, y in zip(a["resps"], b["resps"]):
                if isinstance(y[0], str):
                    assert x[0] == y[0]
                else:
                    np.testing.assert_allclose(np.ravel(x[0]), np.ravel(y[0])[: np.size(x[0])], atol=1e-4)
    assert any(s["resps"][0][0].strip() for s in ours["samples"]["maxllm_test_gen"])  # text to compare
    print("\nharness hf vs maxllm:", {t: {m: (round(ours["results"][t][m], 6), round(theirs["results"][t][m], 6))
                                          for m in ours["results"][t] if m.endswith(",none") and "stderr" not in m}
                                      for t in tasks})


def test_evaluation_during_training_equals_evaluating_the_checkpoints(tmp_path):
    """eval.every_steps on 8 devices (fsdp): the tasks' metrics in metrics.jsonl
    equal those of `python -m maxllm.eval`'s code path on the saved checkpoints."""
    from maxllm.eval import evaluate
    from maxllm.hf import load_params

    docs = tmp_path / "docs.txt"
    docs.write_text(gzip.open(QUICKSTART / "valid.jsonl.gz", "rt").readline()[:2000])
    tasks = ["docs_mc", "docs_qa", str(docs)]
    run = tmp_path / "run"
    train_on_quickstart(run, "train.steps=6", "train.lr=3e-3", "model.max_seq_len=64", "checkpoint.every_steps=3",
                        "checkpoint.max_to_keep=null", "logging.every_steps=5", "eval.every_steps=3",
                        f"eval.tasks={json.dumps(tasks)}", "eval.limit=6", "eval.num_fewshot=1", "eval.batch_size=4",
                        f"data.eval_path={QUICKSTART / 'tokens' / 'valid'}")
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [3, 5, 6]  # logged every 5 steps, and at each evaluation
    assert "eval/docs_mc/acc" not in rows[5]
    lm = LanguageModel.load(run, batch_size=3)
    for step in (3, 6):
        lm.params = load_params(run / "checkpoints" / str(step), lm.config.model)
        expected = evaluate(lm, tasks, num_fewshot=1, limit=6)
        row = rows[step]
        assert row["eval/docs_mc/acc"] == expected["docs_mc"]["acc"]
        assert row["eval/docs_mc/acc_norm"] == expected["docs_mc"]["acc_norm"]
        assert row["eval/docs_qa/exact_match"] == expected["docs_qa"]["exact_match"]
        assert row["eval/docs/bits_per_byte"] == pytest.approx(expected["docs"]["bits_per_byte"], rel=1e-5)
        assert row["eval_loss"] > 0 and row["eval_perplexity"] == pytest.approx(math.exp(row["eval_loss"]))
    assert rows[6]["eval/docs/bits_per_byte"] < rows[3]["eval/docs/bits_per_byte"]  # it learns


def test_a_bad_eval_task_stops_training_before_the_first_step(tmp_path):
    with pytest.raises(EvalDataError, match="not a sample task"):
        train_on_quickstart(tmp_path / "run", "eval.tasks=[no_such_task]")
    assert not (tmp_path / "run" / "checkpoints").exists()
