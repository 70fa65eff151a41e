"""Evaluation against transformers on the same exported model: continuation
log-likelihoods, greedy flags, and bits-per-byte of a text file."""

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
        for start in range(0, len(ids), lm.max_len):  # disjoint windows, each after the token before it
            window = shifted[start : min(start + lm.max_len, len(ids)) + 1]
            nll -= float(_their_logprobs(hf, window)[0].sum())
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
        acc_norm += int(np.argmax([t / len(" " + c) for t, c in zip(theirs, ex.choices)]) == ex.gold)
    assert (ours["acc"], ours["acc_norm"]) == (acc / len(MC), acc_norm / len(MC))


def test_a_task_whose_answer_is_not_among_the_choices_is_reported(tmp_path):
    from maxllm.eval import read_choice_file

    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps(MC[0]) + "\n" + json.dumps({**MC[1], "gold": 2}) + "\n")
    with pytest.raises(EvalDataError, match=r"mc.jsonl:2: 'gold'=2 is not among the 2 choices"):
        read_choice_file(path)
