"""Tokenizer training and tokenization into ArrayRecord shards.

Tokenization runs in two stages. Each kept part is tokenized into three arrays
(concatenated uint32 ids, document offsets, gids). Then the documents of all parts
are put in input order (by gid), permuted by the seed, and cut into `shards`
contiguous runs; each shard task gathers its documents from the memory-mapped
part arrays and writes one ArrayRecord file, one record per document (uint32
little-endian ids, EOS appended). The result does not depend on how the input was
split into tasks or which executor ran them.

tokens/manifest.json:
    {"format": "array_record", "dtype": "uint32", "tokenizer": {"path", "sha256",
     "type": "sentencepiece", "vocab_size", "eos_id", "bos_id"}, "seed", "documents",
     "tokens", "shards": [{"path", "documents", "tokens"}]}
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import xxhash

from data_pipelines import io as dio

TOKENIZER_FILE = "tokenizer.model"


def tokens_dir(cfg) -> str:
    return dio.join(cfg.output_dir, "tokens")


def _marker(cfg, stage: str, task: int) -> str:
    from data_pipelines.pipeline import marker

    return marker(cfg, stage, task)


# ---------------------------------------------------------------------------------
# Tokenizer training


def run_train_tokenizer(cfg, step, kept_files: list[str], executor) -> dict[str, Any]:
    from data_pipelines.executor import Task

    out = dio.join(tokens_dir(cfg), TOKENIZER_FILE)
    (result,) = executor.map(
        [Task(train_tokenizer_task, (step.model_dump_json(), cfg.seed, kept_files, out), _marker(cfg, "train_tokenizer", 0))],
        "train_tokenizer",
    )
    return result


def train_tokenizer_task(step_json: str, seed: int, kept_files: list[str], out: str) -> dict[str, Any]:
    import sentencepiece as spm

    from data_pipelines.config import TrainTokenizerConfig

    step = TrainTokenizerConfig.model_validate_json(step_json)
    if step.model:
        with dio.open_read(step.model) as f:
            data = f.read()
        sp = spm.SentencePieceProcessor(model_proto=data)
        with dio.atomic_write(out) as f:
            f.write(data)
        return {"trained": False, "vocab_size": sp.get_piece_size(), "source": step.model}
    texts = _training_sample(kept_files, seed, step.max_documents, step.max_document_chars)
    if not texts:
        raise ValueError("train_tokenizer: no kept documents to train on")
    model = _train(texts, step)
    with dio.atomic_write(out) as f:
        f.write(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    return {"trained": True, "vocab_size": sp.get_piece_size(), "documents": len(texts)}


def _training_sample(kept_files: list[str], seed: int, limit: int, max_chars: int) -> list[str]:
    """Up to `limit` kept documents, chosen by a seeded hash of their gid (the same
    sample whatever the task layout), in gid order."""
    ranked: list[tuple[int, int, str]] = []
    for path in kept_files:
        for row in dio.read_jsonl_gz(path):
            rank = xxhash.xxh64_intdigest(row["gid"].to_bytes(8, "little"), seed=seed)
            ranked.append((rank, row["gid"], row["text"][:max_chars]))
    ranked.sort()
    chosen = sorted(ranked[:limit], key=lambda r: r[1])
    return [text for _, _, text in chosen]


def _train(texts: list[str], step) -> bytes:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=step.vocab_size,
        model_type=step.model_type,
        byte_fallback=step.byte_fallback,
        character_coverage=step.character_coverage,
        user_defined_symbols=["\n", "\t", *step.special_tokens],
        remove_extra_whitespaces=False,  # keep indentation (code)
        normalization_rule_name="identity",  # lossless: decode(encode(text)) == text
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=step.max_document_chars * 4,
        num_threads=1,  # deterministic
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return model.getvalue()


# ---------------------------------------------------------------------------------
# Tokenization


def run_tokenize(cfg, step, kept_files: list[str], executor) -> dict[str, Any]:
    from data_pipelines.executor import Task

    out = tokens_dir(cfg)
    model_path = dio.join(out, TOKENIZER_FILE)
    work = dio.join(cfg.output_dir, "work", "tokens")
    tasks = [
        Task(tokenize_part_task, (path, model_path, step.add_eos, dio.join(work, f"part-{i:05d}")), _marker(cfg, "tokenize", i))
        for i, path in enumerate(kept_files)
    ]
    executor.map(tasks, "tokenize")
    plan = _shard_plan([dio.join(work, f"part-{i:05d}") for i in range(len(kept_files))], step.shards, step.seed)
    shard_tasks = []
    for j, (parts, rows) in enumerate(plan):
        name = f"shard-{j:05d}-of-{step.shards:05d}.array_record"
        shard_tasks.append(Task(write_shard_task, (work, parts, rows, dio.join(out, name)), _marker(cfg, "shards", j)))
    shards = executor.map(shard_tasks, "shards")
    manifest = _manifest(model_path, step.seed, shards)
    dio.write_json(dio.join(out, "manifest.json"), manifest)
    return {"documents": manifest["documents"], "tokens": manifest["tokens"], "shards": len(shards)}


def tokenize_part_task(kept_file: str, model_path: str, add_eos: bool, prefix: str) -> dict[str, int]:
    sp = _processor(model_path)
    gids, lengths, pieces = [], [], []
    rows = list(dio.read_jsonl_gz(kept_file))
    for start in range(0, len(rows), 256):
        batch = rows[start : start + 256]
        for row, ids in zip(batch, sp.encode([r["text"] for r in batch])):
            if add_eos:
                ids.append(sp.eos_id())
            gids.append(row["gid"])
            lengths.append(len(ids))
            pieces.append(np.asarray(ids, np.uint32))
    tokens = np.concatenate(pieces) if pieces else np.empty(0, np.uint32)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.uint64)]).astype(np.uint64)
    for suffix, array in (("tokens", tokens), ("offsets", offsets), ("gids", np.asarray(gids, np.uint64))):
        with dio.atomic_write(f"{prefix}.{suffix}.npy") as f:
            np.save(f, array)
    return {"documents": len(gids), "tokens": int(tokens.size)}


def _processor(model_path: str):
    import sentencepiece as spm

    with dio.open_read(model_path) as f:
        return spm.SentencePieceProcessor(model_proto=f.read())


def _shard_plan(prefixes: list[str], shards: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """For each shard, the (part, row) of its documents, in record order."""
    gids = [_load(f"{p}.gids.npy") for p in prefixes]
    part = np.concatenate([np.full(g.size, i, np.int64) for i, g in enumerate(gids)]) if gids else np.empty(0, np.int64)
    row = np.concatenate([np.arange(g.size) for g in gids]) if gids else np.empty(0, np.int64)
    order = np.argsort(np.concatenate(gids) if gids else np.empty(0, np.uint64), kind="stable")
    order = order[np.random.default_rng(seed).permutation(order.size)]
    bounds = np.linspace(0, order.size, shards + 1).astype(np.int64)
    return [(part[order[a:b]].tolist(), row[order[a:b]].tolist()) for a, b in zip(bounds[:-1], bounds[1:])]


def write_shard_task(work: str, parts: list[int], rows: list[int], out: str) -> dict[str, Any]:
    from array_record.python.array_record_module import ArrayRecordWriter

    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    tokens = 0
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "shard.array_record")
        writer = ArrayRecordWriter(local, "group_size:1")
        for p, r in zip(parts, rows):
            if p not in cache:
                prefix = dio.join(work, f"part-{p:05d}")
                cache[p] = (_load(f"{prefix}.tokens.npy", mmap=True), _load(f"{prefix}.offsets.npy"))
            ids, offsets = cache[p]
            record = np.asarray(ids[offsets[r] : offsets[r + 1]], "<u4")
            writer.write(record.tobytes())
            tokens += record.size
        writer.close()
        with open(local, "rb") as src, dio.atomic_write(out) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return {"path": os.path.basename(out), "documents": len(parts), "tokens": tokens}


def _manifest(model_path: str, seed: int, shards: list[dict[str, Any]]) -> dict[str, Any]:
    with dio.open_read(model_path) as f:
        model = f.read()
    sp = _processor(model_path)
    return {
        "format": "array_record",
        "dtype": "uint32",
        "tokenizer": {
            "path": TOKENIZER_FILE,
            "type": "sentencepiece",
            "sha256": hashlib.sha256(model).hexdigest(),
            "vocab_size": sp.get_piece_size(),
            "eos_id": sp.eos_id(),
            "bos_id": sp.bos_id(),
        },
        "seed": seed,
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
    }


def _load(path: str, mmap: bool = False) -> np.ndarray:
    if not dio.is_remote(path):
        return np.load(path, mmap_mode="r" if mmap else None)
    with dio.open_read(path) as f:
        return np.load(f)
