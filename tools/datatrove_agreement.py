"""Agreement and speed of data_pipelines' quality and URL filters against datatrove's.

    python tools/datatrove_agreement.py                       # web sample, both sides
    python tools/datatrove_agreement.py --sample docs.jsonl.gz --golden golden.json
    python tools/datatrove_agreement.py --sample docs.jsonl.gz --write-golden golden.json
    python tools/datatrove_agreement.py --write-fixture tests/data/filters_fixture.jsonl.gz \
        --write-golden tests/data/filters_golden.json           # the tests' fixture
    python tools/datatrove_agreement.py --write-spacy-rules   # refresh the tokenizer asset

datatrove (0.10.1, with spaCy for English words) lives in its own virtual environment
(`--datatrove-python`, default $DATATROVE_PYTHON or tools/datatrove_env.py's): this file
re-runs itself there as a worker (`--_worker`), which imports only datatrove and the
standard library. Each filter runs on its own over every document (default settings,
fresh copies, single process), so the agreement is per filter; the chain (URL,
repetition, Gopher quality, C4, FineWeb, stopping at the first drop, as in FineWeb's
pipeline) is timed as well. Our side starts every timing with empty caches (words are
cached per chunk across documents; spaCy keeps nothing between them). Prints
per-filter agreement (same keep/drop decision; for C4 also identical output text among
documents both keep), the disagreeing ids with both reasons, documents/s of both, and
writes everything as JSON (`--out`).

Input: JSONL (optionally .gz) with fields id, text and url.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = ROOT.parent / "shared" / "data" / "web-sample.jsonl.gz"
SPACY_RULES_ASSET = ROOT / "data_pipelines" / "assets" / "spacy_en_tokenizer.json"

# Filter names in the order of FineWeb's pipeline (which the chain timing follows).
FILTERS = ["url_filter", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality"]

# A decision: (keep, reason or None, sha1 of the output text for kept C4 documents).
Decision = tuple[bool, "str | None", "str | None"]


def load_docs(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read JSONL (gzip or plain) records with at least id, text and url."""
    opener = gzip.open if str(path).endswith(".gz") else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                docs.append(json.loads(line))
                if limit and len(docs) >= limit:
                    break
    return docs


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _time_filter(
    fn: Callable[[Any], Any], make_doc: Callable[[dict], Any], docs: list[dict], text_of: Callable[[Any], str],
    normalize: Callable[[Any], tuple[bool, str | None]], keep_text: bool,
) -> tuple[dict[str, Decision], float]:
    """Run `fn` on fresh documents; return decisions by id and the seconds spent in `fn` alone."""
    objs = [make_doc(d) for d in docs]
    fn(make_doc(docs[0]))  # warm-up: loads tokenizers and lists outside the timing
    t0 = time.perf_counter()
    raw = [fn(o) for o in objs]
    seconds = time.perf_counter() - t0
    out = {}
    for d, o, r in zip(docs, objs, raw):
        keep, reason = normalize(r)
        out[d["id"]] = (keep, reason, _sha1(text_of(o)) if keep and keep_text else None)
    return out, seconds


def _time_chain(fns: list[Callable[[Any], Any]], make_doc: Callable[[dict], Any], docs: list[dict],
                is_drop: Callable[[Any], bool]) -> tuple[int, float]:
    """Run the filters in sequence on each document, stopping at the first drop."""
    objs = [make_doc(d) for d in docs]
    for fn in fns:
        fn(make_doc(docs[0]))  # warm-up: lists and tokenizers load outside the timing
    t0 = time.perf_counter()
    kept = 0
    for o in objs:
        for fn in fns:
            if is_drop(fn(o)):
                break
        else:
            kept += 1
    return kept, time.perf_counter() - t0


# --------------------------------------------------------------------------- datatrove side
# Runs inside datatrove's virtual environment: imports nothing from this repository.


def _dt_normalize(res: Any) -> tuple[bool, str | None]:
    if isinstance(res, tuple):
        return bool(res[0]), res[1]
    return bool(res), None


def _dt_filters() -> dict[str, Any]:
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        URLFilter,
    )

    return {
        "url_filter": URLFilter(),
        "gopher_repetition": GopherRepetitionFilter(),
        "gopher_quality": GopherQualityFilter(),
        "c4_quality": C4QualityFilter(),
        "fineweb_quality": FineWebQualityFilter(),
    }


def _dt_worker(sample: Path, out: Path, limit: int | None, names: list[str], chain: bool) -> None:
    """Datatrove's decisions and timings for `sample`, written to `out` as JSON."""
    from importlib.metadata import version

    import spacy
    from datatrove.data import Document
    from datatrove.utils.text import split_into_parts

    docs = load_docs(sample, limit)

    def make_doc(d: dict) -> Document:
        return Document(text=d["text"], id=d["id"], metadata={"url": d.get("url")})

    filters = _dt_filters()
    result: dict[str, Any] = {
        "meta": {"datatrove": version("datatrove"), "spacy": spacy.__version__, "n_docs": len(docs),
                 "sample": str(sample)},
        "filters": {},
    }
    for name in names:
        split_into_parts.cache_clear()
        decisions, seconds = _time_filter(
            filters[name].filter, make_doc, docs, lambda o: o.text, _dt_normalize, keep_text=name == "c4_quality"
        )
        result["filters"][name] = {"decisions": decisions, "seconds": seconds, "docs_per_s": len(docs) / seconds}
        print(f"datatrove {name}: {len(docs) / seconds:.0f} docs/s", file=sys.stderr)
    if chain:
        split_into_parts.cache_clear()
        fns = [filters[n].filter for n in FILTERS]
        kept, seconds = _time_chain(fns, make_doc, docs, lambda r: not _dt_normalize(r)[0])
        result["chain"] = {"kept": kept, "seconds": seconds, "docs_per_s": len(docs) / seconds}
    out.write_text(json.dumps(result))


def _dump_spacy_rules(out: Path) -> None:
    """Write spaCy's English tokenizer rules (as `spacy.blank("en")` builds them) and its
    sentencizer's punctuation to `out`, for data_pipelines.text to reproduce without spaCy."""
    import spacy
    from spacy.pipeline import Sentencizer
    from spacy.symbols import ORTH

    tok = spacy.blank("en").tokenizer
    rules = {text: [t[ORTH] for t in tokens] for text, tokens in sorted(tok.rules.items())}
    data = {
        "source": f"spaCy {spacy.__version__} (MIT license, ExplosionAI GmbH): spacy.blank('en').tokenizer "
        "and Sentencizer.default_punct_chars; written by tools/datatrove_agreement.py --write-spacy-rules",
        "prefix": tok.prefix_search.__self__.pattern,
        "suffix": tok.suffix_search.__self__.pattern,
        "infix": tok.infix_finditer.__self__.pattern,
        "url": tok.url_match.__self__.pattern,
        "faster_heuristics": bool(tok.faster_heuristics),
        "rules": rules,
        "sentencizer_punct_chars": sorted(Sentencizer.default_punct_chars),
    }
    out.write_text(json.dumps(data, ensure_ascii=False, indent=0, sort_keys=True) + "\n", encoding="utf-8")


def run_datatrove(dt_python: str, sample: Path, limit: int | None, names: list[str], chain: bool) -> dict:
    """Run the worker in datatrove's environment and return its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "dt.json"
        cmd = [dt_python, str(Path(__file__).resolve()), "--_worker", "--sample", str(sample),
               "--out", str(out), "--filters", ",".join(names)]
        if limit:
            cmd += ["--limit", str(limit)]
        if not chain:
            cmd += ["--no-chain"]
        # tldextract's default tries to refresh the public suffix list online: keep it
        # offline (it falls back to its bundled snapshot, as ours uses).
        env = dict(os.environ, TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS="")
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- our side


def _our_filters(names: list[str]) -> dict[str, Any]:
    """Our filters at their default settings, by name."""
    from data_pipelines.filters import quality, url

    build = {
        "url_filter": lambda: url.URLFilter(url.URLFilterConfig(type="url_filter")),
        "gopher_repetition": lambda: quality.GopherRepetition(quality.GopherRepetitionConfig(type="gopher_repetition")),
        "gopher_quality": lambda: quality.GopherQuality(quality.GopherQualityConfig(type="gopher_quality")),
        "c4_quality": lambda: quality.C4Quality(quality.C4QualityConfig(type="c4_quality")),
        "fineweb_quality": lambda: quality.FineWebQuality(quality.FineWebQualityConfig(type="fineweb_quality")),
    }
    return {name: build[name]() for name in names}


def run_ours(docs: list[dict], names: list[str], chain: bool) -> dict:
    """Our decisions and timings, in the worker's JSON layout."""
    sys.path.insert(0, str(ROOT))
    from data_pipelines.document import Document
    from data_pipelines.filters.quality import clear_caches

    def make_doc(d: dict) -> Document:
        return Document(id=d["id"], text=d["text"], metadata={"url": d.get("url")})

    def normalize(r: str | None) -> tuple[bool, str | None]:
        return r is None, r

    filters = _our_filters(FILTERS if chain else names)
    result: dict[str, Any] = {"meta": {"n_docs": len(docs)}, "filters": {}}
    for name in names:
        clear_caches()  # each filter starts cold, as datatrove's spaCy keeps nothing between documents
        decisions, seconds = _time_filter(
            filters[name], make_doc, docs, lambda o: o.text, normalize, keep_text=name == "c4_quality"
        )
        result["filters"][name] = {"decisions": decisions, "seconds": seconds, "docs_per_s": len(docs) / seconds}
    if chain:
        clear_caches()
        kept, seconds = _time_chain([filters[n] for n in FILTERS], make_doc, docs, lambda r: r is not None)
        result["chain"] = {"kept": kept, "seconds": seconds, "docs_per_s": len(docs) / seconds}
    return result


# --------------------------------------------------------------------------- test fixture

# Sources of the web sample whose text may be shipped in the repository's tests
# (permissive licenses, see shared/data/LICENSES.md).
FIXTURE_SOURCES = ("python3.11-doc", "postgresql-doc-15", "python-django-doc", "fortunes", "fortunes-min")


def select_fixture(docs: list[dict], dt: dict, size: int, per_reason: int = 6, seed: int = 0) -> list[dict]:
    """About `size` documents of FIXTURE_SOURCES: up to `per_reason` for every (filter,
    rule) datatrove gives them, at least one kept and one dropped by each filter, then
    random ones; in sample order."""
    import random

    pool = [d for d in docs if d.get("source") in FIXTURE_SOURCES]
    chosen: set[str] = set()
    for name in FILTERS:
        decisions = dt["filters"][name]["decisions"]
        by_reason: dict[str, list[str]] = {}
        for d in pool:
            keep, reason, _ = decisions[d["id"]]
            by_reason.setdefault("keep" if keep else reason, []).append(d["id"])
        for ids in by_reason.values():
            chosen.update(sorted(ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())[:per_reason])
    rest = sorted(d["id"] for d in pool if d["id"] not in chosen)
    random.Random(seed).shuffle(rest)
    chosen.update(rest[: max(0, size - len(chosen))])
    return [{k: d[k] for k in ("id", "text", "url", "source")} for d in pool if d["id"] in chosen]


def write_jsonl_gz(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(path, "wb", mtime=0) as raw:  # mtime=0: the same bytes every time
        raw.write("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8"))


def dump_golden(golden: dict) -> str:
    """JSON with one line per decision (readable diffs)."""
    lines = ["{", f' "meta": {json.dumps(golden["meta"], sort_keys=True)},', ' "filters": {']
    names = sorted(golden["filters"])
    for fi, name in enumerate(names):
        items = sorted(golden["filters"][name]["decisions"].items())
        lines.append(f'  {json.dumps(name)}: {{"decisions": {{')
        lines += [f"   {json.dumps(k)}: {json.dumps(v)}" + ("," if i < len(items) - 1 else "")
                  for i, (k, v) in enumerate(items)]
        lines.append("  }}" + ("," if fi < len(names) - 1 else ""))
    return "\n".join(lines + [" }", "}"]) + "\n"


def golden_of(dt: dict) -> dict:
    """Datatrove's result without its timings (stable across runs)."""
    return {"meta": {k: v for k, v in dt["meta"].items() if k != "sample"},
            "filters": {n: {"decisions": f["decisions"]} for n, f in dt["filters"].items()}}


# --------------------------------------------------------------------------- comparison


def compare(dt: dict, ours: dict, names: list[str], show: int) -> dict:
    """Per-filter agreement between two results; prints a report and returns it as a dict."""
    report: dict[str, Any] = {}
    for name in names:
        a, b = dt["filters"][name]["decisions"], ours["filters"][name]["decisions"]
        ids = [i for i in a if i in b]
        differ = [i for i in ids if bool(a[i][0]) != bool(b[i][0])]
        entry: dict[str, Any] = {
            "n": len(ids),
            "agree_pct": 100.0 * (len(ids) - len(differ)) / max(len(ids), 1),
            "disagree": len(differ),
            "disagreements": [{"id": i, "datatrove": a[i][1] if not a[i][0] else "keep",
                               "ours": b[i][1] if not b[i][0] else "keep"} for i in differ],
            "same_reason_pct": 100.0 * sum(a[i][1] == b[i][1] for i in ids) / max(len(ids), 1),
        }
        if name == "c4_quality":
            both = [i for i in ids if a[i][0] and b[i][0]]
            text_differ = [i for i in both if a[i][2] != b[i][2]]
            entry["text_same_pct"] = 100.0 * (len(both) - len(text_differ)) / max(len(both), 1)
            entry["text_differ"] = text_differ
        for side, res in (("datatrove", dt), ("ours", ours)):
            if "docs_per_s" in res["filters"][name]:
                entry[f"{side}_docs_per_s"] = res["filters"][name]["docs_per_s"]
        report[name] = entry
    _print_report(report, dt, ours, show)
    return report


def _print_report(report: dict, dt: dict, ours: dict, show: int) -> None:
    print(f"{'filter':20} {'agree %':>8} {'differ':>6} {'same reason %':>13} "
          f"{'datatrove docs/s':>16} {'ours docs/s':>11} {'speed-up':>8}")
    for name, e in report.items():
        dts, ous = e.get("datatrove_docs_per_s"), e.get("ours_docs_per_s")
        speed = f"{ous / dts:7.1f}x" if dts and ous else ""
        print(f"{name:20} {e['agree_pct']:8.2f} {e['disagree']:6d} {e['same_reason_pct']:13.2f} "
              f"{dts or float('nan'):16.0f} {ous or float('nan'):11.0f} {speed:>8}")
        if "text_same_pct" in e:
            print(f"{'':20} identical C4 output text among kept: {e['text_same_pct']:.2f}% "
                  f"({len(e['text_differ'])} differ)")
    for side, res in (("datatrove", dt), ("ours", ours)):
        if "chain" in res:
            print(f"chain ({' -> '.join(FILTERS)}), {side}: {res['chain']['docs_per_s']:.0f} docs/s, "
                  f"kept {res['chain']['kept']}")
    for name, e in report.items():
        for d in e["disagreements"][:show]:
            print(f"  {name}: {d['id']}: datatrove={d['datatrove']} ours={d['ours']}")
        for i in e.get("text_differ", [])[:show]:
            print(f"  {name}: {i}: output text differs")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE, help="JSONL(.gz) with id, text, url")
    p.add_argument("--limit", type=int, default=None, help="only the first N documents")
    p.add_argument("--filters", default=",".join(FILTERS), help="comma-separated subset of " + ",".join(FILTERS))
    p.add_argument("--golden", type=Path, help="compare with this golden JSON instead of running datatrove")
    p.add_argument("--write-golden", type=Path, metavar="PATH", help="write datatrove's decisions to PATH and exit")
    p.add_argument("--write-fixture", type=Path, metavar="PATH",
                   help="pick a test fixture from --sample (permissive sources, every rule) into PATH (.jsonl.gz), "
                   "then write datatrove's decisions for it to --write-golden")
    p.add_argument("--fixture-size", type=int, default=150)
    p.add_argument("--write-spacy-rules", nargs="?", const=SPACY_RULES_ASSET, type=Path, metavar="PATH",
                   help="dump spaCy's English tokenizer rules (needs spaCy: runs in datatrove's environment)")
    p.add_argument("--datatrove-python", default=None,
                   help="python of an environment with datatrove (default: $DATATROVE_PYTHON, or one "
                   "tools/datatrove_env.py creates)")
    p.add_argument("--no-chain", action="store_true", help="skip the whole-chain timing")
    p.add_argument("--show", type=int, default=50, help="disagreeing ids printed per filter")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "datatrove_agreement.json")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_dump-rules", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    names = [n for n in args.filters.split(",") if n]
    unknown = set(names) - set(FILTERS)
    if unknown:
        p.error(f"unknown filters: {sorted(unknown)}")

    if args.datatrove_python is None and not args._worker:
        sys.path.insert(0, str(ROOT / "tools"))
        from datatrove_env import datatrove_python

        args.datatrove_python = datatrove_python()

    if args._worker:
        _dt_worker(args.sample, args.out, args.limit, names, chain=not args.no_chain)
        return
    if args._dump_rules:
        _dump_spacy_rules(args.out)
        return
    if args.write_spacy_rules:
        cmd = [args.datatrove_python, str(Path(__file__).resolve()), "--_dump-rules", "--out",
               str(args.write_spacy_rules.resolve())]
        subprocess.run(cmd, check=True)
        print(f"wrote {args.write_spacy_rules}")
        return
    if args.write_fixture:
        if not args.write_golden:
            p.error("--write-fixture needs --write-golden PATH")
        docs = load_docs(args.sample, args.limit)
        if args.golden:
            dt = json.loads(args.golden.read_text())
        else:
            dt = run_datatrove(args.datatrove_python, args.sample, args.limit, FILTERS, chain=False)
        fixture = select_fixture(docs, dt, args.fixture_size)
        write_jsonl_gz(args.write_fixture, fixture)
        print(f"wrote {args.write_fixture} ({len(fixture)} documents)")
        args.sample = args.write_fixture
    if args.write_golden:
        dt = run_datatrove(args.datatrove_python, args.sample, args.limit, names, chain=False)
        args.write_golden.parent.mkdir(parents=True, exist_ok=True)
        args.write_golden.write_text(dump_golden(golden_of(dt)))
        print(f"wrote {args.write_golden} ({dt['meta']['n_docs']} documents)")
        return

    docs = load_docs(args.sample, args.limit)
    if args.golden:
        dt = json.loads(args.golden.read_text())
    else:
        dt = run_datatrove(args.datatrove_python, args.sample, args.limit, names, chain=not args.no_chain)
    ours = run_ours(docs, names, chain=not args.no_chain)
    report = compare(dt, ours, names, args.show)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"sample": str(args.sample), "n_docs": len(docs), "datatrove_meta": dt.get("meta"),
           "filters": report, "chain": {"datatrove": dt.get("chain"), "ours": ours.get("chain")}}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
