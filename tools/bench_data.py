"""Corpus-pipeline throughput: data_pipelines against datatrove 0.10.1 running the
equivalent pipeline on the same input files and cores, in one run.

    python tools/bench_data.py --sample ../shared/data/web-sample.jsonl.gz --workers 2

Two pipelines, each read -> steps -> write kept JSONL.gz, with one task per input
file (the sample is first split into `--workers` files so both sides use every core):
  filters: URL filter, Gopher repetition, Gopher quality, C4 quality, FineWeb quality
           (FineWeb's order), defaults, stopping at the first drop;
  minhash: MinHash near-dedup, 5-grams, 14 bands x 8 rows (datatrove: its four stages,
           signatures -> buckets -> clusters -> filter).
Each side runs in a fresh subprocess; reported: wall seconds, documents/s (input
documents over wall time), peak resident memory of the largest process (the
driver or a worker), and kept-document agreement. Writes JSON (`--out`).
Language id is left out: datatrove's uses the full lid.176.bin, a download.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

OURS = textwrap.dedent(
    """
    import json, resource, sys, time
    sys.path.insert(0, {root!r})
    from data_pipelines.config import load_pipeline_config
    from data_pipelines.pipeline import run
    t0 = time.perf_counter()
    stats = run(load_pipeline_config({config!r}))
    seconds = time.perf_counter() - t0
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print("RESULT " + json.dumps({{"seconds": seconds, "peak_rss_mb": peak / 1024, "kept": stats["kept"]}}))
    """
)

DATATROVE = textwrap.dedent(
    """
    import json, resource, sys, time
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.pipeline.filters import (URLFilter, GopherRepetitionFilter, GopherQualityFilter,
                                            C4QualityFilter, FineWebQualityFilter)
    from datatrove.pipeline.dedup import (MinhashDedupSignature, MinhashDedupBuckets,
                                          MinhashDedupCluster, MinhashDedupFilter)
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    kind, inputs, work, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    tasks = len([p for p in __import__("os").listdir(inputs)])
    reader = lambda: JsonlReader(inputs, glob_pattern="*.jsonl.gz", text_key="text", id_key="id")
    t0 = time.perf_counter()
    if kind == "filters":
        LocalPipelineExecutor(pipeline=[reader(), URLFilter(), GopherRepetitionFilter(), GopherQualityFilter(),
                                        C4QualityFilter(filter_no_terminal_punct=False), FineWebQualityFilter(),
                                        JsonlWriter(work + "/kept")],
                              tasks=tasks, workers=workers, logging_dir=work + "/logs").run()
    else:
        cfg = MinhashConfig()
        LocalPipelineExecutor(pipeline=[reader(), MinhashDedupSignature(output_folder=work + "/sigs", config=cfg)],
                              tasks=tasks, workers=workers, logging_dir=work + "/logs1").run()
        LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(input_folder=work + "/sigs", output_folder=work + "/buckets", config=cfg)],
                              tasks=cfg.num_buckets, workers=workers, logging_dir=work + "/logs2").run()
        LocalPipelineExecutor(pipeline=[MinhashDedupCluster(input_folder=work + "/buckets", output_folder=work + "/remove", config=cfg)],
                              tasks=1, logging_dir=work + "/logs3").run()
        LocalPipelineExecutor(pipeline=[reader(), MinhashDedupFilter(input_folder=work + "/remove"), JsonlWriter(work + "/kept")],
                              tasks=tasks, workers=workers, logging_dir=work + "/logs4").run()
    seconds = time.perf_counter() - t0
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    import gzip, glob
    kept = [json.loads(l)["id"] for f in sorted(glob.glob(work + "/kept/*.jsonl.gz")) for l in gzip.open(f, "rt")]
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024, "kept_ids": kept}))
    """
)

STEPS = {
    "filters": "[{type: url_filter}, {type: gopher_repetition}, {type: gopher_quality},"
               " {type: c4_quality, filter_no_terminal_punct: false}, {type: fineweb_quality}]",
    "minhash": "[{type: minhash_dedup}]",
}


def split_sample(sample: Path, parts: int, folder: Path) -> int:
    """The sample as `parts` JSONL.gz files (round robin); returns the document count."""
    with gzip.open(sample, "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    folder.mkdir(parents=True)
    for i in range(parts):
        with gzip.open(folder / f"part-{i:03d}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(lines[i::parts])
    return len(lines)


def _result(proc: subprocess.CompletedProcess, what: str) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def run_ours(kind: str, inputs: Path, work: Path, workers: int) -> dict:
    work.mkdir(parents=True)
    config = work / "pipeline.yml"
    config.write_text(
        f"input: {{paths: ['{inputs}/*.jsonl.gz']}}\noutput_dir: {work / 'out'}\n"
        f"executor: {{kind: local, workers: {workers}}}\nprogress: false\nwrite_rejected: false\n"
        f"steps: {STEPS[kind]}\n"
    )
    proc = subprocess.run([sys.executable, "-c", OURS.format(root=str(ROOT), config=str(config))],
                          capture_output=True, text=True)
    result = _result(proc, f"data_pipelines {kind}")
    kept = []
    for part in sorted((work / "out" / "kept").glob("*.jsonl.gz")):
        with gzip.open(part, "rt") as f:
            kept.extend(json.loads(line)["id"] for line in f)
    return {**result, "kept_ids": kept}


def run_datatrove(python: str, kind: str, inputs: Path, work: Path, workers: int) -> dict:
    proc = subprocess.run([python, "-c", DATATROVE, kind, str(inputs), str(work), str(workers)],
                          capture_output=True, text=True)
    return _result(proc, f"datatrove {kind}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", default=str(ROOT.parent / "shared" / "data" / "web-sample.jsonl.gz"))
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--only", choices=["filters", "minhash"])
    parser.add_argument("--out", default="bench_results/bench_data.json")
    args = parser.parse_args()

    from datatrove_env import datatrove_python

    python = datatrove_python()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs"
        documents = split_sample(Path(args.sample), args.workers, inputs)
        for kind in [args.only] if args.only else ["filters", "minhash"]:
            ours = run_ours(kind, inputs, Path(tmp) / f"ours-{kind}", args.workers)
            theirs = run_datatrove(python, kind, inputs, Path(tmp) / f"dt-{kind}", args.workers)
            a, b = set(ours.pop("kept_ids")), set(theirs.pop("kept_ids"))
            row = {
                "pipeline": kind, "documents": documents, "workers": args.workers,
                "maxllm": {**ours, "docs_per_sec": documents / ours["seconds"]},
                "datatrove": {**theirs, "kept": len(b), "docs_per_sec": documents / theirs["seconds"]},
                "speedup": theirs["seconds"] / ours["seconds"],
                "same_decision": 1 - len(a ^ b) / documents,
            }
            rows.append(row)
            print(f"{kind:<8} {documents} docs, {args.workers} workers | data_pipelines {row['maxllm']['docs_per_sec']:8.1f} docs/s "
                  f"peak {ours['peak_rss_mb']:6.0f} MB kept {ours['kept']} | datatrove {row['datatrove']['docs_per_sec']:8.1f} docs/s "
                  f"peak {theirs['peak_rss_mb']:6.0f} MB kept {len(b)} | speedup {row['speedup']:.2f}x | same decision "
                  f"{row['same_decision']:.2%}", flush=True)
    report = {"date": datetime.date.today().isoformat(), "host": f"{platform.machine()}, {os.cpu_count()} cores",
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
