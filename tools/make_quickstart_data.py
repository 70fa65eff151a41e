"""Builds data/quickstart/: the small English corpus and the sentencepiece tokenizer
that `configs/quickstart.yml` trains on, and data/web/: the same manuals as raw
web-like documents, junk included, for the corpus pipeline.

    python tools/make_quickstart_data.py --sample ../shared/data

The text is the documents of the web sample whose source package carries a
permissive license (see data/quickstart/README.md); no GPL text ships.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
from pathlib import Path

import sentencepiece as spm

# Source package -> license, as the sample's LICENSES.md states them.
PERMISSIVE = {
    "python3.11-doc": "PSF License Version 2 (Python Software Foundation)",
    "postgresql-doc-15": "PostgreSQL License (PostgreSQL Global Development Group, Univ. of California)",
    "python-django-doc": "BSD-3-Clause (Django Software Foundation and contributors)",
}
VALID_EVERY = 20  # one document in 20 goes to the validation split


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    # mtime=0 keeps the file byte-identical across rebuilds.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", default="../shared/data", help="folder with web-sample*.jsonl.gz")
    parser.add_argument("--out", default="data/quickstart")
    parser.add_argument("--web-out", default="data/web")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()

    sample = Path(args.sample)
    docs = read_jsonl_gz(sample / "web-sample.jsonl.gz")
    labels = {r["id"]: r for r in read_jsonl_gz(sample / "web-sample.labels.jsonl.gz")}
    keep = [
        {"id": d["id"], "text": d["text"], "url": d["url"], "source": d["source"]}
        for d in docs
        if d["source"] in PERMISSIVE
        and labels[d["id"]]["kind"] == "clean"
        and labels[d["id"]]["lang"] == "en"
    ]
    valid = keep[::VALID_EVERY]
    train = [d for i, d in enumerate(keep) if i % VALID_EVERY]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(out / "train.jsonl.gz", train)
    write_jsonl_gz(out / "valid.jsonl.gz", valid)

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(d["text"] for d in train),
        model_writer=model,
        vocab_size=args.vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        remove_extra_whitespaces=False,  # keep code indentation
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "\t"],
        max_sentence_length=1 << 20,
        num_threads=1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    chars = sum(len(d["text"]) for d in train)
    print(f"{len(train)} train and {len(valid)} valid documents, {chars:,} train characters -> {out}")
    write_web_sample(docs, labels, {d["id"] for d in valid}, Path(args.web_out))


def write_web_sample(docs: list[dict], labels: dict[str, dict], held_out: set[str], out: Path) -> None:
    """Every document of the permissive sources, junk and duplicates included, less
    the quickstart's validation documents and their duplicates (so that split stays
    unseen by a model trained on this corpus), with the labels beside it."""
    held_clusters = {labels[i]["dup_cluster"] for i in held_out} - {None}
    keep = [
        {"id": d["id"], "text": d["text"], "url": d["url"], "source": d["source"]}
        for d in docs
        if d["source"] in PERMISSIVE
        and d["id"] not in held_out
        and labels[d["id"]]["dup_cluster"] not in held_clusters
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(out / "web.jsonl.gz", keep)
    write_jsonl_gz(out / "web.labels.jsonl.gz", [labels[d["id"]] for d in keep])
    kinds: dict[str, int] = {}
    for d in keep:
        kinds[labels[d["id"]]["kind"]] = kinds.get(labels[d["id"]]["kind"], 0) + 1
    print(f"{len(keep)} web documents {dict(sorted(kinds.items()))} -> {out}")


if __name__ == "__main__":
    main()
