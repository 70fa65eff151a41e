"""Evaluate a model (a run directory or a Hugging Face folder) on tasks.

    python -m maxllm.eval --model runs/quickstart --tasks docs_mc,docs_qa \\
        --num-fewshot 2 --limit 100 --batch-size 16 --out results.json

Tasks: a sample task's name (docs_mc, docs_qa), a generic JSONL file, a .txt file
(perplexity), or READER=PATH for released benchmark files (hellaswag, arc_easy,
arc_challenge, piqa, winogrande, mmlu, perplexity). See docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from maxllm.cli import log_to_stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maxllm.eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", required=True, help="a run directory (newest checkpoint) or an HF folder")
    parser.add_argument("--tasks", required=True, help="comma-separated task names or files")
    parser.add_argument("--num-fewshot", type=int, default=0, help="solved examples before each query")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N examples of each task")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draw")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--details", action="store_true",
                        help="also write per-example log-likelihoods and generations to --out")
    args = parser.parse_args(argv)
    log_to_stderr("maxllm")

    from maxllm.config import ConfigError
    from maxllm.eval import EvalDataError, LanguageModel, evaluate, load_tasks
    from maxllm.hf import HFError

    start = time.perf_counter()
    try:
        if args.num_fewshot < 0 or (args.limit is not None and args.limit < 1) or args.batch_size < 1:
            raise EvalDataError("--num-fewshot must be >= 0, --limit and --batch-size >= 1")
        specs = [s for s in args.tasks.split(",") if s.strip()]
        for spec in specs:  # a bad task name or file fails before the model loads
            load_tasks(spec, 1)
        lm = LanguageModel.load(args.model, dtype=args.dtype, batch_size=args.batch_size)
        results = evaluate(lm, specs, args.num_fewshot, args.limit, args.seed, details=args.details)
    except (EvalDataError, ConfigError, HFError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {
        "model": str(args.model),
        "config": {"tasks": specs, "num_fewshot": args.num_fewshot, "limit": args.limit,
                   "batch_size": args.batch_size, "seed": args.seed, "dtype": args.dtype},
        "results": results,
        "seconds": time.perf_counter() - start,
    }
    print(format_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def format_table(results: dict[str, dict]) -> str:
    """A Markdown table: one row per task and metric, with its standard error."""
    from maxllm.eval.tasks import METRICS

    lines = ["| task | n | metric | value | stderr |", "| --- | ---: | --- | ---: | ---: |"]
    for task, out in results.items():
        for metric in METRICS:
            if metric in out:
                stderr = out.get(f"{metric}_stderr")
                lines.append(f"| {task} | {out.get('n', out.get('documents', ''))} | {metric} | {out[metric]:.4f} | "
                             f"{'' if stderr is None else f'{stderr:.4f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
