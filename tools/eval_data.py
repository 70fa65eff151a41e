"""Quality of the corpus pipeline on the labelled web sample: language-id accuracy,
duplicate recall, drop rates per junk kind, and keep rates of clean English pages,
ours beside datatrove's on the same documents.

    python tools/eval_data.py --sample ../shared/data --workers 2

Reads web-sample.jsonl.gz and web-sample.labels.jsonl.gz (language, junk kind,
duplicate cluster per document). Runs three pipelines with data_pipelines:
  dedup:   exact_dedup + minhash_dedup over all documents (duplicate recall and
           false removals);
  lang+dedup: language [en] + both dedups (what an English pipeline keeps without
           quality filters);
  full:    url_filter, language [en], gopher_repetition, gopher_quality, c4_quality
           (FineWeb's setting: no end-punctuation rule), fineweb_quality, both dedups;
and datatrove's URL/Gopher/C4/FineWeb chain (same settings) on the clean,
non-duplicate English documents. Prints a report and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

QUALITY = ("[{type: url_filter}, {type: language, languages: [en]}, {type: gopher_repetition},"
           " {type: gopher_quality}, {type: c4_quality, filter_no_terminal_punct: false},"
           " {type: fineweb_quality}, {type: exact_dedup}, {type: minhash_dedup}]")
PIPELINES = {
    "dedup": "[{type: exact_dedup}, {type: minhash_dedup}]",
    "lang+dedup": "[{type: language, languages: [en]}, {type: exact_dedup}, {type: minhash_dedup}]",
    "full": QUALITY,
}

DATATROVE_CHAIN = textwrap.dedent(
    """
    import gzip, json, sys
    from datatrove.data import Document
    from datatrove.pipeline.filters import (URLFilter, GopherRepetitionFilter, GopherQualityFilter,
                                            C4QualityFilter, FineWebQualityFilter)
    filters = [("url_filter", URLFilter()), ("gopher_repetition", GopherRepetitionFilter()),
               ("gopher_quality", GopherQualityFilter()), ("c4_quality", C4QualityFilter(filter_no_terminal_punct=False)),
               ("fineweb_quality", FineWebQualityFilter())]
    out = {}
    for line in gzip.open(sys.argv[1], "rt"):
        r = json.loads(line)
        doc = Document(text=r["text"], id=r["id"], metadata={"url": r["url"]})
        reason = None
        for name, f in filters:
            res = f.filter(doc)
            keep, rule = (res, None) if isinstance(res, bool) else res
            if not keep:
                reason = f"{name}/{rule}"
                break
        out[r["id"]] = reason
    print("RESULT " + json.dumps(out))
    """
)


def _read(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_pipeline(name: str, sample: Path, work: Path, workers: int) -> tuple[set[str], dict[str, str]]:
    """Kept ids and {rejected id: reason} of one pipeline over the sample."""
    from data_pipelines.config import load_pipeline_config
    from data_pipelines.pipeline import run

    out = work / name.replace("+", "_")
    config = work / f"{out.name}.yml"
    config.write_text(f"input: {{paths: ['{sample}']}}\noutput_dir: {out}\nprogress: false\n"
                      f"executor: {{workers: {workers}}}\nsteps: {PIPELINES[name]}\n")
    run(load_pipeline_config(config))
    kept = {row["id"] for part in (out / "kept").glob("*.jsonl.gz") for row in _read(part)}
    rejected = {row["id"]: row["reason"] for part in (out / "rejected").glob("*.jsonl.gz") for row in _read(part)}
    return kept, rejected


def language_accuracy(docs: list[dict], labels: dict[str, dict]) -> dict:
    from data_pipelines.filters.language import LanguageConfig, LanguageFilter

    lid = LanguageFilter(LanguageConfig(type="language"))
    single = [d for d in docs if labels[d["id"]]["lang"] and labels[d["id"]]["kind"] != "mixed_lang"]
    whole = sum(next(iter(lid.predict(d["text"]))) == labels[d["id"]]["lang"] for d in single)
    prefix = sum(next(iter(lid.predict(d["text"][:80]))) == labels[d["id"]]["lang"] for d in single)
    return {"documents": len(single), "accuracy_whole_text": whole / len(single), "accuracy_first_80_chars": prefix / len(single)}


def dedup_quality(labels: dict[str, dict], kept: set[str]) -> dict:
    dups = [i for i, l in labels.items() if l["kind"] in ("exact_dup", "near_dup")]
    non_dups = [i for i, l in labels.items() if l["dup_cluster"] is None]
    clusters = defaultdict(list)
    for i, l in labels.items():
        if l["dup_cluster"] is not None:
            clusters[l["dup_cluster"]].append(i)
    by_kind = {k: sum(i not in kept for i in dups if labels[i]["kind"] == k) / sum(labels[i]["kind"] == k for i in dups)
               for k in ("exact_dup", "near_dup")}
    return {
        "labelled_duplicates": len(dups),
        "recall": sum(i not in kept for i in dups) / len(dups),
        "recall_by_kind": by_kind,
        "clusters": len(clusters),
        "clusters_left_with_one_document": sum(sum(i in kept for i in ids) == 1 for ids in clusters.values()) / len(clusters),
        "non_duplicates": len(non_dups),
        "non_duplicates_removed": sum(i not in kept for i in non_dups) / len(non_dups),
    }


def drop_rates(labels: dict[str, dict], kept: set[str]) -> dict:
    kinds = Counter(l["kind"] for l in labels.values())
    dropped = Counter(l["kind"] for i, l in labels.items() if i not in kept)
    return {k: {"documents": n, "dropped": dropped[k] / n} for k, n in sorted(kinds.items())}


def clean_english(labels: dict[str, dict]) -> list[str]:
    return sorted(i for i, l in labels.items() if l["kind"] == "clean" and l["lang"] == "en" and l["dup_cluster"] is None)


def datatrove_decisions(docs: list[dict], work: Path) -> dict[str, str | None]:
    from datatrove_env import datatrove_python

    path = work / "clean_en.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    proc = subprocess.run([datatrove_python(), "-c", DATATROVE_CHAIN, str(path)], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(lines[-1].removeprefix("RESULT "))


def datatrove_minhash_kept(sample: Path, work: Path, workers: int) -> set[str]:
    """Kept ids of datatrove's MinHash pipeline (same 5-gram, 14 x 8 settings), for
    comparison (exact dedup is subsumed: identical texts share every band)."""
    from bench_data import run_datatrove, split_sample
    from datatrove_env import datatrove_python

    inputs = work / "dt-inputs"
    split_sample(sample, workers, inputs)
    (work / "dt-minhash").mkdir()
    return set(run_datatrove(datatrove_python(), "minhash", inputs, work / "dt-minhash", workers)["kept_ids"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="bench_results/eval_data.json")
    args = parser.parse_args()
    folder = Path(args.sample)
    sample = folder / "web-sample.jsonl.gz"
    docs = _read(sample)
    labels = {l["id"]: l for l in _read(folder / "web-sample.labels.jsonl.gz")}
    report: dict = {"language": language_accuracy(docs, labels)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {name: run_pipeline(name, sample, work, args.workers) for name in PIPELINES}
        report["dedup"] = dedup_quality(labels, results["dedup"][0])
        english = clean_english(labels)
        by_id = {d["id"]: d for d in docs}
        for name in ("lang+dedup", "full"):
            kept, rejected = results[name]
            report[name] = {
                "clean_english_kept": sum(i in kept for i in english) / len(english),
                "clean_english_drops": dict(Counter(rejected[i] for i in english if i in rejected).most_common(8)),
                "drop_rate_by_kind": drop_rates(labels, kept),
            }
        report["dedup_datatrove_minhash"] = dedup_quality(labels, datatrove_minhash_kept(sample, work, args.workers))
        dt = datatrove_decisions([by_id[i] for i in english], work)
        sources = Counter(by_id[i]["source"] for i in english)
        ours_full = results["full"][1]
        report["clean_english_quality"] = {
            "documents": len(english),
            "datatrove_kept": sum(dt[i] is None for i in english) / len(english),
            "datatrove_drops": dict(Counter(r for r in dt.values() if r).most_common(8)),
            "gopher_quality_drops_by_source": {
                s: sum(1 for i in english if by_id[i]["source"] == s and (ours_full.get(i) or "").startswith("gopher_quality"))
                / n for s, n in sources.most_common()
            },
        }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
