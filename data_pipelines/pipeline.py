"""Plans and runs a corpus pipeline.

The steps split into passes at each dedup step. A pass is one task per input
part: read documents (pass 0: the input files; later passes: the previous pass's
output), drop the previous dedup's duplicates, run the per-document steps in
order, write survivors, rejects and counters, and compute the next dedup's
signatures on the way. Between passes the dedup's bucket and cluster stages run.
The last pass writes `kept/`; tokenizer training and tokenization follow.

    output_dir/
      kept/part-NNNNN.jsonl.gz        kept documents: {"id", "text", "metadata", "gid"}
      rejected/pass-K-part-NNNNN.jsonl.gz   {"id", "reason", "where", "text", "metadata"}
      stats.json                      documents in/out per step, drops per rule, tokens
      tokens/                         manifest.json, tokenizer.model, *.array_record
      work/                           intermediate files and task completion markers
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import Counter
from functools import lru_cache
from typing import Any

from data_pipelines import dedup
from data_pipelines import io as dio
from data_pipelines import tokenize as tok
from data_pipelines.config import PipelineConfig, StepConfig
from data_pipelines.document import Document
from data_pipelines.executor import Executor, Task
from data_pipelines.readers import BadRecord, read_file

log = logging.getLogger(__name__)

DEDUP_TYPES = ("exact_dedup", "minhash_dedup")
END_TYPES = ("train_tokenizer", "tokenize")


@dataclasses.dataclass(frozen=True)
class Part:
    """One task's share of the input: every `parts`-th record of a file."""

    index: int
    file_index: int
    file: str
    part: int
    parts: int


@dataclasses.dataclass(frozen=True)
class Pass:
    index: int
    dedup_before: StepConfig | None  # drop the duplicates this dedup found
    steps: tuple[StepConfig, ...]  # per-document steps, in config order
    dedup_after: StepConfig | None  # compute this dedup's signatures of the survivors
    final: bool


def plan_parts(cfg: PipelineConfig) -> list[Part]:
    files = dio.expand(cfg.input.paths)
    per_file = cfg.input.parts_per_file or max(1, -(-cfg.executor.num_workers // len(files)))
    parts = [(fi, f, p) for fi, f in enumerate(files) for p in range(per_file)]
    return [Part(i, fi, f, p, per_file) for i, (fi, f, p) in enumerate(parts)]


def plan_passes(cfg: PipelineConfig) -> list[Pass]:
    passes: list[Pass] = []
    before, current = None, []
    for step in cfg.steps:
        if step.type in END_TYPES:
            break
        if step.type in DEDUP_TYPES:
            passes.append(Pass(len(passes), before, tuple(current), step, False))
            before, current = step, []
        else:
            current.append(step)
    passes.append(Pass(len(passes), before, tuple(current), None, True))
    return passes


# ---------------------------------------------------------------------------------
# Paths


def kept_path(cfg: PipelineConfig, part: int) -> str:
    return dio.join(cfg.output_dir, "kept", f"part-{part:05d}.jsonl.gz")


def _pass_output(cfg: PipelineConfig, p: Pass, part: int) -> str:
    if p.final:
        return kept_path(cfg, part)
    return dio.join(cfg.output_dir, "work", f"pass-{p.index}", f"part-{part:05d}.jsonl.gz")


def _dedup_dir(cfg: PipelineConfig, step: StepConfig) -> str:
    return dio.join(cfg.output_dir, "work", step.type)


def marker(cfg: PipelineConfig, stage: str, task: int) -> str:
    return dio.join(cfg.output_dir, "work", "done", stage, f"{task:05d}.json")


# ---------------------------------------------------------------------------------
# Per-document steps


@lru_cache(maxsize=8)
def _config(cfg_json: str) -> PipelineConfig:
    return PipelineConfig.model_validate_json(cfg_json)


def _step(step: StepConfig):
    """The step object for a config, built once per worker process (models and
    block lists load once)."""
    return _build_step(type(step), step.model_dump_json())


@lru_cache(maxsize=32)
def _build_step(config_class: type, config_json: str):
    from data_pipelines.filters import language, pii, quality, url

    step = config_class.model_validate_json(config_json)
    classes = {
        "url_filter": url.URLFilter,
        "language": language.LanguageFilter,
        "gopher_quality": quality.GopherQuality,
        "gopher_repetition": quality.GopherRepetition,
        "c4_quality": quality.C4Quality,
        "fineweb_quality": quality.FineWebQuality,
        "pii": pii.PIIScrub,
    }
    return classes[step.type](step)


def _documents(cfg: PipelineConfig, p: Pass, part: Part):
    """(gid, Document | BadRecord) of this task's input."""
    if p.index == 0:
        for position, record in read_file(part.file, cfg.input):
            if position % part.parts == part.part:
                yield (part.file_index << 32) | position, record
        return
    previous = dataclasses.replace(p, index=p.index - 1, final=False)
    for row in dio.read_jsonl_gz(_pass_output(cfg, previous, part.index)):
        yield row["gid"], Document(row["id"], row["text"], row["metadata"])


def pass_task(cfg_json: str, pass_index: int, part: Part) -> dict[str, Any]:
    """Runs one pass over one part; returns its counters."""
    cfg = _config(cfg_json)
    p = plan_passes(cfg)[pass_index]
    steps = [(s.type, _step(s)) for s in p.steps]
    removed = dedup.RemovedSet(_removed_path(cfg, p.dedup_before)) if p.dedup_before else None
    signer = _signer(cfg, p.dedup_after, part.index)
    counts: Counter[str] = Counter()
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(dio.JsonlGzWriter(_pass_output(cfg, p, part.index)))
        rejected = None
        if cfg.write_rejected:
            path = dio.join(cfg.output_dir, "rejected", f"pass-{p.index}-part-{part.index:05d}.jsonl.gz")
            rejected = stack.enter_context(dio.JsonlGzWriter(path))
        for gid, doc in _documents(cfg, p, part):
            reason = _process(doc, gid, p, steps, removed, counts)
            if reason is None:
                out.write({"id": doc.id, "text": doc.text, "metadata": doc.metadata, "gid": gid})
                if signer is not None:
                    signer.add(gid, doc.text)
            elif rejected is not None:
                rejected.write(_reject_record(doc, reason))
        if signer is not None:
            signer.close()
    return dict(counts)


def _process(doc, gid, p: Pass, steps, removed, counts: Counter) -> str | None:
    """The reason `doc` is rejected, or None; counts what each step saw."""
    if isinstance(doc, BadRecord):
        counts[doc.reason] += 1
        return doc.reason
    if p.index == 0:
        counts["read/documents"] += 1
    if removed is not None:
        counts[f"{p.dedup_before.type}/in"] += 1
        if gid in removed:
            counts[f"{p.dedup_before.type}/drop/duplicate"] += 1
            return f"{p.dedup_before.type}/duplicate"
        counts[f"{p.dedup_before.type}/out"] += 1
    for name, step in steps:
        counts[f"{name}/in"] += 1
        rule = step(doc)
        if rule is not None:
            counts[f"{name}/drop/{rule}"] += 1
            return f"{name}/{rule}"
        counts[f"{name}/out"] += 1
    return None


def _reject_record(doc, reason: str) -> dict[str, Any]:
    if isinstance(doc, BadRecord):
        return {"id": None, "reason": reason, "where": doc.where(), "detail": doc.detail, "text": doc.raw}
    return {"id": doc.id, "reason": reason, "text": doc.text, "metadata": doc.metadata}


# ---------------------------------------------------------------------------------
# Dedup stages


class _Signer:
    def __init__(self, cfg: PipelineConfig, step: StepConfig, task: int):
        bands = step.bands if step.type == "minhash_dedup" else 1
        self.writer = dedup.SignatureWriter(dio.join(_dedup_dir(cfg, step), "signatures"), task, bands, step.partitions)
        self.hasher = (
            dedup.MinHasher(step.n_grams, step.bands, step.rows, step.seed)
            if step.type == "minhash_dedup" else None
        )

    def add(self, gid: int, text: str) -> None:
        if self.hasher is None:
            self.writer.add(gid, [dedup.exact_key(text)])
            return
        keys = self.hasher.band_keys(text)
        if keys is not None:
            self.writer.add(gid, [(int(k), 0) for k in keys])

    def close(self) -> None:
        self.writer.close()


def _signer(cfg: PipelineConfig, step: StepConfig | None, task: int) -> _Signer | None:
    return None if step is None else _Signer(cfg, step, task)


def _removed_path(cfg: PipelineConfig, step: StepConfig) -> str:
    return dio.join(_dedup_dir(cfg, step), "removed.npy")


def run_dedup(cfg: PipelineConfig, step: StepConfig, executor: Executor) -> dict[str, int]:
    base = _dedup_dir(cfg, step)
    bands = step.bands if step.type == "minhash_dedup" else 1
    jobs = [(b, q) for b in range(bands) for q in range(step.partitions)]
    edge_files = [dio.join(base, "edges", f"band-{b:02d}-part-{q:03d}.npy") for b, q in jobs]
    tasks = [
        Task(_bucket_task, (dio.join(base, "signatures"), b, q, path), marker(cfg, f"{step.type}-buckets", i))
        for i, ((b, q), path) in enumerate(zip(jobs, edge_files))
    ]
    edges = sum(r["edges"] for r in executor.map(tasks, f"{step.type}: buckets"))
    (result,) = executor.map(
        [Task(_cluster_task, (edge_files, _removed_path(cfg, step)), marker(cfg, f"{step.type}-clusters", 0))],
        f"{step.type}: clusters",
    )
    return {"edges": edges, **result}


def _bucket_task(directory: str, band: int, part: int, out: str) -> dict[str, int]:
    return {"edges": dedup.bucket_edges(directory, band, part, out)}


def _cluster_task(edge_files: list[str], out: str) -> dict[str, int]:
    clusters, removed = dedup.removed_gids(edge_files, out)
    return {"clusters": clusters, "removed": removed}


# ---------------------------------------------------------------------------------
# Driver


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Runs (or resumes) the pipeline; returns the stats also written to stats.json."""
    _claim_output_dir(cfg)
    parts = plan_parts(cfg)
    cfg_json = cfg.model_dump_json()
    executor = Executor(cfg.executor, progress=cfg.progress)
    counts: Counter[str] = Counter()
    extra: dict[str, Any] = {}
    try:
        for p in plan_passes(cfg):
            names = ", ".join(s.type for s in p.steps) or "write"
            tasks = [Task(pass_task, (cfg_json, p.index, part), marker(cfg, f"pass-{p.index}", part.index)) for part in parts]
            for result in executor.map(tasks, f"pass {p.index} ({names})"):
                counts.update(result)
            if p.dedup_after is not None:
                extra[p.dedup_after.type] = run_dedup(cfg, p.dedup_after, executor)
        kept_files = [kept_path(cfg, part.index) for part in parts]
        for step in cfg.steps:
            if step.type == "train_tokenizer":
                extra["train_tokenizer"] = tok.run_train_tokenizer(cfg, step, kept_files, executor)
            elif step.type == "tokenize":
                extra["tokenize"] = tok.run_tokenize(cfg, step, kept_files, executor)
    finally:
        executor.close()
    stats = build_stats(cfg, counts, extra)
    dio.write_json(dio.join(cfg.output_dir, "stats.json"), stats)
    return stats


def _claim_output_dir(cfg: PipelineConfig) -> None:
    """Refuses an output_dir holding a run of a different pipeline, whose task
    markers would otherwise be mistaken for this run's."""
    path = dio.join(cfg.output_dir, "pipeline.json")
    identity = cfg.model_dump(mode="json", exclude={"executor", "progress"})
    if dio.exists(path):
        if dio.read_json(path) != identity:
            raise ValueError(
                f"{cfg.output_dir} holds the output of a different pipeline config "
                f"({path}); use a new output_dir or delete that one"
            )
        return
    dio.write_json(path, identity)


def build_stats(cfg: PipelineConfig, counts: Counter, extra: dict[str, Any]) -> dict[str, Any]:
    read_errors = {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("read/") and k != "read/documents"}
    steps = []
    for step in [s for s in cfg.steps if s.type not in END_TYPES]:
        t = step.type
        dropped = {k.split("/drop/", 1)[1]: v for k, v in counts.items() if k.startswith(f"{t}/drop/")}
        steps.append({"type": t, "in": counts.get(f"{t}/in", 0), "out": counts.get(f"{t}/out", 0),
                      "dropped": dict(sorted(dropped.items(), key=lambda kv: -kv[1])), **extra.get(t, {})})
    kept = steps[-1]["out"] if steps else counts.get("read/documents", 0)
    return {
        "documents_read": counts.get("read/documents", 0),
        "read_errors": read_errors,
        "steps": steps,
        "kept": kept,
        **{k: v for k, v in extra.items() if k in END_TYPES},
    }


def summary_table(stats: dict[str, Any]) -> str:
    lines = [f"{'step':<20} {'in':>10} {'out':>10} {'dropped':>8}  top rules"]
    bad = sum(stats["read_errors"].values())
    lines.append(f"{'read':<20} {stats['documents_read'] + bad:>10,} {stats['documents_read']:>10,} "
                 f"{_pct(bad, stats['documents_read'] + bad):>8}  "
                 + ", ".join(f"{k} {v:,}" for k, v in list(stats["read_errors"].items())[:3]))
    for s in stats["steps"]:
        rules = ", ".join(f"{k} {v:,}" for k, v in list(s["dropped"].items())[:3])
        lines.append(f"{s['type']:<20} {s['in']:>10,} {s['out']:>10,} {_pct(s['in'] - s['out'], s['in']):>8}  {rules}")
    lines.append(f"kept {stats['kept']:,} documents")
    if "tokenize" in stats:
        t = stats["tokenize"]
        lines.append(f"tokens {t['tokens']:,} in {t['shards']} shards ({t['documents']:,} documents)")
    return "\n".join(lines)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"
