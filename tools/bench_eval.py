"""Multiple-choice scoring speed: maxllm vs lm-evaluation-harness's `hf` model,
same model, same examples, in one process.

    python tools/bench_eval.py [--preset quickstart|smollm-135m] [--run RUN_DIR]
        [--examples 200] [--shots 0] [--batch-size 16]

Exports one model (a random one of the preset's shape, or --run) to a Hugging
Face folder in float32 and writes a 4-choice task from the quickstart's held-out
documents (the query: ~40 words of a document; the gold choice: the next 8 words;
the others: 8 words from other documents). Then scores every example with:

  hf        the harness's `hf` model (transformers + PyTorch, threads = cores)
  maxllm/h  our `maxllm` model type inside the harness (same requests and metrics)
  maxllm    `maxllm.eval` directly (what `python -m maxllm.eval` runs)

The two harness models score the same request objects (built once by the
harness from the task) through their `loglikelihood`; `maxllm` runs the whole
path from the task file (prompts, tokenization, scoring, metrics). Each is timed
with the model already loaded, twice: the first pass includes maxllm's
compilation of each length bucket, the second is warm. Prints examples/s and the
ratios to `hf`, and checks that all three give the same accuracy.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def make_task(out: Path, n: int, seed: int = 0) -> Path:
    docs = [json.loads(line)["text"].split() for line in gzip.open(ROOT / "data/quickstart/valid.jsonl.gz", "rt")]
    docs = [d for d in docs if len(d) > 60]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i = rng.randrange(len(docs))
        start = rng.randrange(len(docs[i]) - 48)
        query = " ".join(docs[i][start : start + 40])
        choices = [" ".join(docs[i][start + 40 : start + 48])]
        while len(choices) < 4:
            j = rng.randrange(len(docs))
            if j != i:
                k = rng.randrange(len(docs[j]) - 8)
                choices.append(" ".join(docs[j][k : k + 8]))
        gold = rng.randrange(4)
        choices[0], choices[gold] = choices[gold], choices[0]
        rows.append({"query": query, "choices": choices, "gold": gold})
    path = out / "bench_mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "bench_mc.yaml").write_text(
        f"task: maxllm_bench_mc\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: '{path}'}}}}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{query}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\nmetric_list: [{metric: acc}, {metric: acc_norm}]\n")
    return path


def harness_requests(folder: Path, shots: int):
    """The harness's loglikelihood requests for the task (built once, shared)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict(["maxllm_bench_mc"], TaskManager(include_path=str(folder)))["maxllm_bench_mc"]
    task.set_config(key="num_fewshot", value=shots)
    task.build_all_requests(rank=0, world_size=1)
    return task.instances


def harness_pass(lm, requests, golds: list[int]) -> tuple[float, float]:
    """Seconds to score the requests with `lm.loglikelihood`, and the accuracy."""
    start = time.perf_counter()
    results = lm.loglikelihood(requests)
    seconds = time.perf_counter() - start
    by_doc: dict[int, list[float]] = {}
    for inst, (ll, _) in zip(requests, results):
        by_doc.setdefault(inst.doc_id, []).append(ll)
    correct = [max(range(4), key=lambda c: by_doc[d][c]) == gold for d, gold in enumerate(golds)]
    return seconds, sum(correct) / len(correct)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="smollm-135m", help="a random model of this shape (bench_decode's presets)")
    parser.add_argument("--run", help="a trained run directory instead of a random model")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--shots", type=int, default=0, help="few-shot examples (the harness draws them)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    import lm_eval.models  # noqa: F401
    from lm_eval.models.huggingface import HFLM

    import maxllm.eval.harness as harness
    from bench_decode import export_random
    from maxllm.eval import evaluate
    from maxllm.hf import export_run

    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp / "datasets"))
    hf_dir = export_run(args.run, tmp / "hf", dtype="float32") if args.run else export_random(args.preset, tmp / "hf")
    task = make_task(tmp, args.examples)
    n = args.examples
    print(f"model {args.run or args.preset} ({hf_dir}), {n} examples x 4 choices, {args.shots}-shot, "
          f"batch {args.batch_size}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}")

    requests = harness_requests(tmp, args.shots)
    golds = [json.loads(line)["gold"] for line in task.read_text().splitlines()]
    rows = {}
    hf = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=args.batch_size)
    rows["hf (harness)"] = [harness_pass(hf, requests, golds) for _ in range(2)]
    del hf
    ours = harness.MaxLLMHarnessModel(path=str(hf_dir), batch_size=args.batch_size)
    rows["maxllm (harness model type)"] = [harness_pass(ours, requests, golds) for _ in range(2)]
    native = []
    for _ in range(2):
        start = time.perf_counter()
        result = evaluate(ours.model, [str(task)], num_fewshot=args.shots)
        native.append((time.perf_counter() - start, result["bench_mc"]["acc"]))
    rows["maxllm (python -m maxllm.eval)"] = native

    base = [n / t for t, _ in rows["hf (harness)"]]
    print("\n| scorer | acc | first pass ex/s | warm ex/s | warm ratio to hf |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, passes in rows.items():
        rates = [n / t for t, _ in passes]
        print(f"| {name} | {passes[-1][1]:.3f} | {rates[0]:,.1f} | {rates[1]:,.1f} | {rates[1] / base[1]:.2f}x |")
    accs = {round(p[-1][1], 6) for p in rows.values()}
    print("same accuracy from all three" if len(accs) == 1 else f"ACCURACIES DIFFER: {accs}")
    return 0 if len(accs) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
