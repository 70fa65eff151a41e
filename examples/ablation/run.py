"""Data-quality ablation, the way FineWeb's filters were chosen: prepare the web
sample twice (filtered.yml: the FineWeb-style recipe; unfiltered.yml: tokenize
only, with the same tokenizer), train the quickstart model on each for the same
number of tokens from the same seeds, evaluate both on the quickstart's held-out
text, and write a side-by-side table and a plot.

    python examples/ablation/run.py                      # ~7 min on 2 CPU cores -> runs/ablation/
    python examples/ablation/run.py --steps 20 --seeds 0 --eval-limit 4 --out /tmp/ablation   # a smoke run

Under --out: <arm>/data/ (the pipeline's kept/, rejected/, stats.json, tokens/),
<arm>/seed<k>/ (a run directory: metrics.jsonl, checkpoints/, eval.json, log.txt),
heldout/ (the held-out text split into what the filtered recipe keeps and drops),
results.json, results.md (the tables) and ablation.png (the curves). Each stage's
folder is replaced, never resumed. Run it from anywhere; the commands it starts run
in the repository root.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from statistics import mean

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ARMS = ("filtered", "unfiltered")  # A, B: the table's difference is B - A
LABELS = ROOT / "data" / "web" / "web.labels.jsonl.gz"
KINDS = ("clean", "boilerplate", "exact_dup", "near_dup", "mixed_lang")
EVAL_TEXT = "data/quickstart/valid.jsonl.gz"  # the quickstart's held-out split: no arm trains on it


# ---------------------------------------------------------------------------------
# Stages: each one a subprocess in the repository root, its output in a log file


def run_stage(name: str, cmd: list[str], log: Path, timings: dict[str, float]) -> None:
    """Runs `cmd`, writes its stdout and stderr to `log`, records and prints its
    wall time; on failure prints the log's tail and exits."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    timings[name] = time.perf_counter() - start
    print(f"[ablation] {name:<28} {timings[name]:6.1f} s", flush=True)
    if code != 0:
        tail = log.read_text().splitlines()[-30:]
        sys.exit(f"[ablation] {name} failed (exit {code}); the end of {log}:\n" + "\n".join(tail))


def prepare(arm: str, out: Path, timings: dict[str, float]) -> Path:
    """Runs the arm's pipeline config into <out>/<arm>/data; returns that folder."""
    data = out / arm / "data"
    shutil.rmtree(data, ignore_errors=True)  # a fresh run, so the timing is the whole pipeline's
    cmd = [sys.executable, "-m", "data_pipelines.run", "--config", str(HERE / f"{arm}.yml"), f"output_dir={data}"]
    run_stage(f"prepare {arm}", cmd, out / arm / "prepare.log", timings)
    return data


def split_heldout(args: argparse.Namespace, timings: dict[str, float]) -> dict[str, int]:
    """Runs the filtered arm's recipe over the held-out text and writes its documents,
    unedited, to <out>/heldout/heldout_kept.jsonl and heldout_dropped.jsonl (what the
    recipe keeps, what it drops), so that the final evaluation shows on which kind of
    text the arms differ. Returns the documents in each."""
    folder = args.out / "heldout"
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, "-m", "data_pipelines.run", "--config", str(HERE / "filtered.yml"),
           f"input.paths=[{args.eval_text}]", f"output_dir={folder / 'data'}"]
    run_stage("split held-out text", cmd, folder / "prepare.log", timings)
    kept = {r["id"] for p in (folder / "data" / "kept").glob("*.jsonl.gz") for r in read_jsonl(p)}
    docs = read_jsonl(ROOT / args.eval_text)
    counts = {}
    for name, keep in (("heldout_kept", True), ("heldout_dropped", False)):
        texts = [d["text"] for d in docs if (d["id"] in kept) == keep]
        counts[name] = len(texts)
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return counts


def train_command(tokens: Path, run_dir: Path, seed: int, args: argparse.Namespace) -> list[str]:
    """The quickstart model and optimizer, on `tokens`, with rows packed full
    (concat_split) so that every step trains on batch x seq_len real tokens."""
    return [
        sys.executable, "-m", "maxllm.train", "--config", "configs/quickstart.yml",
        f"run.name=ablation-{run_dir.parent.name}-seed{seed}", f"run.output_dir={run_dir}",
        f"data.path={tokens}", f"data.eval_path={args.eval_tokens}", "data.packing=concat_split",
        f"data.seq_len={args.seq_len}", f"train.steps={args.steps}", f"train.global_batch_size={args.batch_size}",
        f"train.seed={seed}", f"train.warmup_steps={max(1, min(20, args.steps // 10))}",
        f"eval.every_steps={args.eval_every}", "eval.tasks=[]", f"checkpoint.every_steps={args.steps}",
        "logging.every_steps=1", "logging.tensorboard=false", "sample.prompts=[]",
    ]


def train(arm: str, tokens: Path, seed: int, args: argparse.Namespace, timings: dict[str, float]) -> Path:
    """Trains one arm from one seed into <out>/<arm>/seed<seed>; returns that run directory."""
    run_dir = args.out / arm / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # never resume an older run of another length
    run_stage(f"train {arm} seed {seed}", train_command(tokens, run_dir, seed, args), run_dir / "log.txt", timings)
    return run_dir


def evaluate(arm: str, run_dir: Path, seed: int, args: argparse.Namespace, timings: dict[str, float]) -> None:
    """`python -m maxllm.eval` on the run's final checkpoint, into <run_dir>/eval.json."""
    split = [f"perplexity={args.out / 'heldout' / f'{name}.jsonl'}" for name, n in args.heldout.items() if n]
    cmd = [sys.executable, "-m", "maxllm.eval", "--model", str(run_dir), "--tasks", ",".join([args.tasks, *split]),
           "--num-fewshot", str(args.num_fewshot), "--out", str(run_dir / "eval.json")]
    if args.eval_limit:
        cmd += ["--limit", str(args.eval_limit)]
    run_stage(f"eval {arm} seed {seed}", cmd, run_dir / "eval.log", timings)


# ---------------------------------------------------------------------------------
# Reading what the stages wrote


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def corpus_summary(data: Path, labels: dict[str, str]) -> dict:
    """Documents read, kept, dropped by `step/rule`, kept by labelled kind, and the
    tokens and tokenizer of the shards, from one pipeline output folder."""
    stats = json.loads((data / "stats.json").read_text())
    manifest = json.loads((data / "tokens" / "manifest.json").read_text())
    dropped = {f"{s['type']}/{rule}": n for s in stats["steps"] for rule, n in s["dropped"].items() if n}
    kept_ids = [r["id"] for p in sorted((data / "kept").glob("*.jsonl.gz")) for r in read_jsonl(p)]
    kinds = Counter(labels.get(i, "unlabelled") for i in kept_ids)
    return {
        "documents_read": stats["documents_read"],
        "kept": stats["kept"],
        "dropped": dropped,
        "kept_by_kind": dict(kinds),
        "tokens": manifest["tokens"],
        "tokenizer_sha256": manifest["tokenizer"]["sha256"],
        "vocab_size": manifest["tokenizer"]["vocab_size"],
    }


def run_summary(run_dir: Path) -> dict:
    """The training and evaluation record of one run directory: tokens trained on
    (from its resolved config: concat_split rows hold no padding), the train loss
    per step, the held-out loss at each evaluation, the final task scores."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yml").read_text())
    tokens_per_step = cfg["train"]["global_batch_size"] * cfg["data"]["seq_len"]
    by_step: dict[int, dict] = {}
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        by_step.setdefault(row["step"], {}).update(row)
    steps = sorted(by_step)
    last = steps[-max(1, len(steps) // 10):]  # the last tenth of the steps
    scores = json.loads((run_dir / "eval.json").read_text())["results"]
    return {
        "packing": cfg["data"]["packing"],
        "steps": steps[-1],
        "tokens_per_step": tokens_per_step,
        "train_tokens": steps[-1] * tokens_per_step,
        "train_loss": [[s, by_step[s]["loss"]] for s in steps],
        "final_train_loss": mean(by_step[s]["loss"] for s in last),
        "final_train_loss_steps": len(last),
        "eval_loss": [[s, by_step[s]["eval_loss"]] for s in steps if "eval_loss" in by_step[s]],
        "eval_tokens": next(by_step[s]["eval_tokens"] for s in steps if "eval_tokens" in by_step[s]),
        "scores": {f"{task}/{metric}": value for task, result in scores.items() for metric, value in result.items()
                   if metric in ("acc", "acc_norm", "exact_match", "perplexity", "bits_per_byte")},
        "score_n": {task: result.get("n", result.get("documents")) for task, result in scores.items()},
    }


# ---------------------------------------------------------------------------------
# The table and the plot


def _cell(values: list[float], fmt: str) -> str:
    """The mean, then each seed's value when there are several."""
    text = format(mean(values), fmt)
    return text + (" (" + ", ".join(format(v, fmt) for v in values) + ")" if len(values) > 1 else "")


def _diff(a: list[float], b: list[float], fmt: str) -> str:
    """B - A of the means, then per seed (the same seed starts both arms from the same weights)."""
    return _cell([y - x for x, y in zip(a, b)], "+" + fmt)


def metric_rows(runs: dict[str, list[dict]]) -> list[tuple[str, list[float], list[float], str]]:
    """(label, A's per-seed values, B's per-seed values, format) for every measured row."""
    a, b = runs["filtered"], runs["unfiltered"]
    rows = [("final train loss (mean of the last %d steps; each arm's own data)" % a[0]["final_train_loss_steps"],
             [r["final_train_loss"] for r in a], [r["final_train_loss"] for r in b], ".3f")]
    for i, (step, _) in enumerate(a[0]["eval_loss"]):
        label = f"held-out loss at step {step} ({step * a[0]['tokens_per_step']:,} tokens)"
        rows.append((label, [r["eval_loss"][i][1] for r in a], [r["eval_loss"][i][1] for r in b], ".3f"))
    for key in a[0]["scores"]:
        task = key.split("/")[0]
        label = f"`maxllm.eval` {key} (n={a[0]['score_n'][task]})"
        rows.append((label, [r["scores"][key] for r in a], [r["scores"][key] for r in b],
                     ".1f" if key.endswith("perplexity") else ".3f"))
    return rows


def corpus_rows(corpus: dict[str, dict], runs: dict[str, list[dict]]) -> list[str]:
    a, b = corpus["filtered"], corpus["unfiltered"]
    kinds = lambda c: " / ".join(str(c["kept_by_kind"].get(k, 0)) for k in KINDS)  # noqa: E731
    trained = [runs[arm][0]["train_tokens"] for arm in ARMS]
    epochs = [n / corpus[arm]["tokens"] for n, arm in zip(trained, ARMS)]
    return [
        f"| documents kept (of {a['documents_read']:,}) | {a['kept']:,} | {b['kept']:,} | {b['kept'] - a['kept']:+,} |",
        f"| kept by label: {' / '.join(KINDS)} | {kinds(a)} | {kinds(b)} | |",
        f"| tokens in the corpus | {a['tokens']:,} | {b['tokens']:,} | {b['tokens'] - a['tokens']:+,} |",
        f"| training tokens per run | {trained[0]:,} | {trained[1]:,} | {trained[1] - trained[0]:+,} |",
        f"| epochs of the corpus | {epochs[0]:.2f} | {epochs[1]:.2f} | |",
    ]


def results_markdown(corpus: dict[str, dict], runs: dict[str, list[dict]], seeds: list[int],
                     heldout: dict[str, int], timings: dict[str, float]) -> str:
    """The side-by-side table, the filtered arm's drops by rule, and the stage timings."""
    seed_note = f"seeds {', '.join(map(str, seeds))}: the mean, then each seed in parentheses" if len(seeds) > 1 \
        else f"seed {seeds[0]}"
    lines = ["| | filtered (A) | unfiltered (B) | B − A |", "| --- | ---: | ---: | ---: |",
             *corpus_rows(corpus, runs)]
    for label, a, b, fmt in metric_rows(runs):
        lines.append(f"| {label} | {_cell(a, fmt)} | {_cell(b, fmt)} | {_diff(a, b, fmt)} |")
    lines += ["", f"Runs: {seed_note}. Lower is better for losses, perplexity and bits per byte; higher for acc "
              "and exact_match. The held-out text is data/quickstart/valid.jsonl.gz "
              f"({runs['filtered'][0]['eval_tokens']:,.0f} tokens), which neither arm trains on; heldout_kept and "
              f"heldout_dropped are its {heldout['heldout_kept']} and {heldout['heldout_dropped']} documents that the "
              "filtered arm's recipe keeps and drops.", "",
              "Documents the filtered arm dropped, by rule:", "", "| rule | documents |", "| --- | ---: |"]
    lines += [f"| {rule} | {n:,} |" for rule, n in corpus["filtered"]["dropped"].items()]
    lines += ["", "Stage timings:", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {name} | {sec:.1f} |" for name, sec in timings.items()]
    lines.append(f"| total | {sum(timings.values()):.1f} |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], seeds: list[int], path: Path, smooth: int = 10) -> None:
    """Train loss (a moving average over `smooth` steps) and held-out loss against
    tokens trained on, both arms, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    colors = {"filtered": "tab:blue", "unfiltered": "tab:orange"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    for arm, arm_runs in runs.items():
        for i, (seed, r) in enumerate(zip(seeds, arm_runs)):
            style = dict(color=colors[arm], linestyle=("-", "--", ":", "-.")[i % 4], linewidth=1.2,
                         label=f"{arm}, seed {seed}")
            steps, losses = zip(*r["train_loss"])
            window = max(1, min(smooth, len(losses)))
            averaged = [mean(losses[max(0, j - window + 1): j + 1]) for j in range(len(losses))]
            left.plot([s * r["tokens_per_step"] for s in steps], averaged, **style)
            steps, losses = zip(*r["eval_loss"])
            right.plot([s * r["tokens_per_step"] for s in steps], losses, marker="o", markersize=3, **style)
    left.set_title(f"train loss (own data, {smooth}-step mean)", fontsize=10)
    right.set_title("held-out loss (quickstart valid)", fontsize=10)
    for ax in (left, right):
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:.0f}k"))
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylabel("loss (nats/token)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation", help="output folder")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run (the same in both arms)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per arm per seed")
    p.add_argument("--eval-every", type=int, default=None, help="held-out loss every N steps (default steps/8)")
    p.add_argument("--eval-tokens", default="data/quickstart/tokens/valid", help="held-out split (tokens/ folder)")
    p.add_argument("--eval-text", default=EVAL_TEXT, help="the held-out split as text (JSONL with id and text)")
    p.add_argument("--tasks", default=f"docs_mc,docs_qa,perplexity={EVAL_TEXT}",
                   help="maxllm.eval --tasks for the final evaluation (the held-out text split by the recipe is added)")
    p.add_argument("--num-fewshot", type=int, default=2)
    p.add_argument("--eval-limit", type=int, default=None, help="maxllm.eval --limit (a smoke run)")
    p.add_argument("--replot", action="store_true",
                   help="only rewrite results.md and ablation.png from <out>/results.json")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.eval_every = args.eval_every or max(1, args.steps // 8)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        saved = json.loads((args.out / "results.json").read_text())
        write_report(args.out, saved["corpus"], saved["runs"], saved["args"]["seeds"], saved["heldout"],
                     saved["timings"])
        return 0
    labels = {r["id"]: r["kind"] for r in read_jsonl(LABELS)} if LABELS.exists() else {}
    timings: dict[str, float] = {}
    corpus, runs = {}, {}
    for arm in ARMS:
        data = prepare(arm, args.out, timings)
        corpus[arm] = corpus_summary(data, labels)
    if len({c["tokenizer_sha256"] for c in corpus.values()}) != 1:
        sys.exit("[ablation] the two arms' shards use different tokenizers: their losses would not compare")
    args.heldout = split_heldout(args, timings)
    for arm in ARMS:
        runs[arm] = []
        for seed in args.seeds:
            run_dir = train(arm, args.out / arm / "data" / "tokens", seed, args, timings)
            evaluate(arm, run_dir, seed, args, timings)
            runs[arm].append(run_summary(run_dir))
    (args.out / "results.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "corpus": corpus, "heldout": args.heldout, "runs": runs, "timings": timings}, indent=1))
    write_report(args.out, corpus, runs, args.seeds, args.heldout, timings)
    return 0


def write_report(out: Path, corpus: dict, runs: dict, seeds: list[int], heldout: dict, timings: dict) -> None:
    """<out>/ablation.png and <out>/results.md (printed too)."""
    plot(runs, seeds, out / "ablation.png")
    table = results_markdown(corpus, runs, seeds, heldout, timings)
    (out / "results.md").write_text(table)
    print(table)
    print(f"[ablation] wrote {out / 'results.md'}, {out / 'ablation.png'}, {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
