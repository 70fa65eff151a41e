"""The end-to-end recipe (examples/end_to_end/run.py) in its reduced form, from a
clean directory to the served answer: every stage runs, is timed, and the answer
the server gives through the OpenAI client is the exported model's own greedy
reply as transformers computes it."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_recipe_runs_from_raw_documents_to_a_served_answer(tmp_path):
    out = tmp_path / "e2e"
    done = subprocess.run([sys.executable, "examples/end_to_end/run.py", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    print("\n" + (out / "timings.md").read_text() + f"answer: {summary['answer']!r}")
    assert list(summary["timings_s"]) == ["data", "pretrain", "eval", "sft", "export", "serve"]
    assert all(seconds > 0 for seconds in summary["timings_s"].values())

    stats = json.loads((out / "data" / "stats.json").read_text())
    assert 0 < stats["kept"] < stats["documents_read"] == 1636  # the filters and dedup removed junk
    assert {"docs_mc", "docs_qa", "valid"} <= set(summary["eval"])
    assert (out / "sft" / "checkpoints" / "10").is_dir()

    # The served answer is the SFT model's: transformers, on the exported folder
    # with its chat template, greedily produces the same text.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": summary["question"]}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=48, do_sample=False)
    reply = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert summary["answer"] == reply
