"""From raw web documents to a served chat model, in one script: the recipe of
examples/end_to_end/README.md, stage by stage, with the time each stage took.

    python examples/end_to_end/run.py            # ~5 min on 2 CPU cores -> runs/end_to_end/
    python examples/end_to_end/run.py --quick    # the reduced form CI runs (~2 min)

Each stage is one of maxllm's commands, printed before it runs so it can be copied:

    data     python -m data_pipelines.run     filter, dedup, train a tokenizer, tokenize
    pretrain python -m maxllm.train           a small Llama on the prepared shards
    eval     python -m maxllm.eval            held-out perplexity and two sample tasks
    sft      python -m maxllm.train           supervised fine-tuning on a chat set
    export   python -m maxllm.export          a Hugging Face folder
    serve    python -m maxllm.serve           the OpenAI-compatible server, asked a question
                                              with the official `openai` client
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What does len() return for a dictionary?"


def stage_commands(out: Path, quick: bool) -> dict[str, list[str]]:
    """The command of every stage but the last; `quick` appends overrides that
    shorten training and evaluation and nothing else."""
    data, base, sft, hf = out / "data", out / "base", out / "sft", out / "hf"
    py = [sys.executable, "-m"]
    pretrain_quick = ["train.steps=30", "checkpoint.every_steps=30", "logging.every_steps=10"]
    sft_quick = ["train.steps=10", "checkpoint.every_steps=10", "eval.every_steps=10", "logging.every_steps=5"]
    return {
        "data": py + ["data_pipelines.run", "--config", "configs/data/web.yml",
                      "input.paths=[data/web/web.jsonl.gz]", f"output_dir={data}", "progress=false"],
        "pretrain": py + ["maxllm.train", "--config", "configs/quickstart.yml", f"run.output_dir={base}",
                          f"data.path={data}/tokens", "model.vocab_size=8192", "data.eval_path=null",
                          "eval.tasks=[]", "train.steps=300", "checkpoint.every_steps=300"]
        + (pretrain_quick if quick else []),
        "eval": py + ["maxllm.eval", "--model", str(base), "--tasks",
                      "docs_mc,docs_qa,perplexity=data/quickstart/valid.jsonl.gz", "--num-fewshot", "2",
                      "--out", f"{out}/eval.json"] + (["--limit", "8"] if quick else []),
        "sft": py + ["maxllm.train", "--config", "configs/sft/chat.yml", f"train.init_from={base}", "model.vocab_size=8192",
                     f"run.output_dir={sft}"] + (sft_quick if quick else []),
        "export": py + ["maxllm.export", "--run", str(sft), "--out", str(hf), "--overwrite"],
    }


def run_stage(name: str, command: list[str], log_dir: Path) -> float:
    """Runs one stage's command from the repository root, its output to the console
    and to `<log_dir>/<name>.log`; seconds taken. A failing stage stops the recipe."""
    print(f"\n== {name}: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log.write(line)
            if not line.startswith(("I0000", "W0000")) and " INFO " not in line:
                print(line, end="", flush=True)
        process.wait()
    if process.returncode != 0:
        sys.exit(f"stage {name} failed (exit {process.returncode}); its output: {log_dir / f'{name}.log'}")
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, log: Path, deadline_s: float = 600) -> None:
    """Polls /health until the server answers 200; fails with its log if it exits."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with {server.returncode}; its output: {log}\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"the server did not become healthy in {deadline_s:.0f}s; its output: {log}")


def serve_and_ask(hf: Path, log_dir: Path) -> tuple[float, str]:
    """Starts `python -m maxllm.serve` on the exported folder, asks QUESTION through
    the official OpenAI client, stops the server; (seconds, answer)."""
    from openai import OpenAI

    port = free_port()
    command = [sys.executable, "-m", "maxllm.serve", "--model", str(hf), "--port", str(port), "--dtype", "float32",
               "--max-total-tokens", "256"]  # chat turns are short: fewer prefill shapes to compile
    print(f"\n== serve: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    log = log_dir / "serve.log"
    with open(log, "w") as sink:
        server = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, server, log)
            client = OpenAI(base_url=f"{url}/v1", api_key="unused")
            model = client.models.list().data[0].id
            print(f"asking {model!r} through the OpenAI client: {QUESTION}", flush=True)
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=48, temperature=0)
            answer = reply.choices[0].message.content
        finally:
            server.terminate()
            server.wait(timeout=60)
    return time.perf_counter() - start, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/end_to_end", help="where every stage writes (relative to the repo root)")
    parser.add_argument("--quick", action="store_true", help="30 pre-training steps, 10 SFT steps, 8 eval examples")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty: remove it or pass --out elsewhere (the recipe starts from raw documents)")
    log_dir = out / "logs"
    log_dir.mkdir(parents=True)

    timings = {}
    for name, command in stage_commands(out, args.quick).items():
        timings[name] = run_stage(name, command, log_dir)
    timings["serve"], answer = serve_and_ask(out / "hf", log_dir)
    print(f"\nanswer: {answer}\n")

    evaluation = json.loads((out / "eval.json").read_text())["results"]
    total = sum(timings.values())
    lines = ["| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
    lines += [f"| total | {total:.1f} |"]
    table = "\n".join(lines)
    print(table)
    (out / "timings.md").write_text(table + "\n")
    summary = {"quick": args.quick, "timings_s": timings, "total_s": total, "question": QUESTION,
               "answer": answer, "eval": evaluation, "cpu_count": os.cpu_count()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nsummary: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
