"""The corpus pipeline end to end on a small corpus built from the shipped
quickstart text plus junk the steps must catch: outputs, stats, token shards,
independence from task layout and executor, and resume after a kill."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

from data_pipelines.config import load_pipeline_config
from data_pipelines.pipeline import run, summary_table

from conftest import ROOT

# Short paragraphs written for these tests (not from any corpus).
FOREIGN = [
    "Der Datenbankserver speichert jede Änderung zuerst im Protokoll, bevor er sie in die Tabellen schreibt. "
    "So lässt sich nach einem Absturz jeder bestätigte Vorgang wiederherstellen, und die Daten bleiben konsistent.",
    "Le serveur conserve chaque modification dans un journal avant de l'écrire dans les tables. Ainsi, après "
    "une panne, toutes les transactions validées peuvent être rejouées et les données restent cohérentes.",
    "El servidor guarda cada cambio primero en el registro y después lo escribe en las tablas. De este modo, "
    "tras un fallo se pueden recuperar todas las transacciones confirmadas y los datos siguen siendo coherentes.",
]


CONTACT = (
    "If the server refuses connections after an upgrade, first check that the new configuration file "
    "still lists the addresses it should listen on, and that the firewall allows the port. When the "
    "problem remains, collect the log files from the last hour and the output of the status command, "
    "and send them to the operations team at jane.roe@mail.example.com so that we can look at them "
    "together. The monitoring host at 8.8.4.4 keeps a copy of the metrics, and the test machine at "
    "203.0.113.9 can be used to try a fix before it goes to production. Please describe what you "
    "changed, when the problem started, and whether other services on the same machine are affected. "
    "We answer most requests within one working day, and we will tell you if we need more details."
)


def _quickstart_docs():
    with gzip.open(ROOT / "data" / "quickstart" / "valid.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


def _prose(text: str) -> bool:
    """Pages the Gopher quality rules keep (code-heavy manual pages fail them)."""
    from data_pipelines.document import Document
    from data_pipelines.filters.quality import GopherQuality, GopherQualityConfig

    return GopherQuality(GopherQualityConfig(type="gopher_quality"))(Document("x", text)) is None


def _edit(text: str, every: int = 150) -> str:
    words = text.split(" ")
    return " ".join(w + "x" if i % every == 7 else w for i, w in enumerate(words))


def build_corpus(folder: Path) -> dict:
    """Two input files (.jsonl.gz and .jsonl.zst) and what each document is."""
    clean = [d for d in _quickstart_docs() if len(d["text"].split()) > 200 and _prose(d["text"])][:24]
    records, kinds = [], {}

    def add(doc_id, text, kind, url=None):
        records.append({"id": doc_id, "text": text, "url": url or f"https://docs.example/{doc_id}"})
        kinds[doc_id] = kind

    for d in clean:
        add(d["id"], d["text"], "clean")
    for d in clean[:4]:
        add(d["id"] + "-copy", d["text"].replace(" ", "  ") + "\n", "exact_dup")
    for d in clean[4:8]:
        add(d["id"] + "-near", _edit(d["text"]), "near_dup")
    for i, text in enumerate(FOREIGN):
        add(f"foreign-{i}", text * 3, "foreign")
    add("spam-0", clean[10]["text"], "spam", url="https://free-casino-porn.example/win")
    add("contact", CONTACT, "pii")

    lines = [json.dumps(r).encode() for r in records]
    bad = [b'{"id": "broken", "text": "no end', b'{"id": "latin", "text": "caf\xe9"}', b'{"id": "notext"}']
    half = len(lines) // 2
    first = b"\n".join(lines[:half] + bad[:2]) + b"\n"
    second = b"\n".join(lines[half:] + bad[2:]) + b"\n"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.jsonl.gz").write_bytes(gzip.compress(first, mtime=0))
    (folder / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(second))
    return kinds


STEPS = [
    "steps=[{type: url_filter}, {type: language, languages: [en]}, {type: gopher_quality},"
    " {type: pii}, {type: exact_dedup, partitions: 2}, {type: minhash_dedup, partitions: 2},"
    " {type: train_tokenizer, vocab_size: 600}, {type: tokenize, shards: 3, seed: 5}]"
]


def _config(tmp_path, inputs, out, *extra):
    path = tmp_path / "pipeline.yml"
    path.write_text(f"input: {{paths: ['{inputs}/*']}}\noutput_dir: {out}\nsteps: []\n")
    return load_pipeline_config(path, [*STEPS, "progress=false", *extra])


def _kept(out: Path) -> dict[str, str]:
    docs = {}
    for part in sorted((out / "kept").glob("*.jsonl.gz")):
        with gzip.open(part, "rt") as f:
            for line in f:
                row = json.loads(line)
                docs[row["id"]] = row["text"]
    return docs


def _shards(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "tokens").glob("*.array_record"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, build_corpus(folder / "in")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One local run with two workers, shared by the tests below."""
    folder, kinds = corpus
    out = tmp_path_factory.mktemp("ref") / "out"
    cfg = _config(folder, folder / "in", out, "executor.workers=2")
    stats = run(cfg)
    return out, stats, kinds


def test_outputs_and_decisions(reference):
    out, stats, kinds = reference
    kept = _kept(out)
    by_kind = Counter(kinds[i] for i in kept)
    assert by_kind == Counter({"clean": 24, "pii": 1}), by_kind  # every duplicate, foreign and spam doc gone
    assert "jane.roe@mail.example.com" not in kept["contact"] and "8.8.4.4" not in kept["contact"]
    assert "203.0.113.9" in kept["contact"]  # a documentation address, not public: kept as datatrove does

    assert stats["read_errors"] == {"invalid_json": 1, "invalid_utf8": 1, "missing_text": 1}
    steps = {s["type"]: s for s in stats["steps"]}
    assert "spam-0" not in kept and steps["url_filter"]["in"] - steps["url_filter"]["out"] == 1
    assert steps["language"]["dropped"] == {"other_language": 3}
    assert steps["exact_dedup"]["dropped"] == {"duplicate": 4}
    assert steps["minhash_dedup"]["dropped"] == {"duplicate": 4}
    assert stats["kept"] == len(kept) == 25

    rejected = Counter()
    for part in (out / "rejected").glob("*.jsonl.gz"):
        with gzip.open(part, "rt") as f:
            rejected.update(json.loads(line)["reason"] for line in f)
    assert rejected["language/other_language"] == 3 and rejected["read/invalid_json"] == 1
    assert sum(rejected.values()) == len(kinds) + 3 - len(kept)  # 3 unreadable lines


def test_token_shards_hold_every_kept_document_once(reference):
    from array_record.python.array_record_module import ArrayRecordReader

    out, stats, _ = reference
    manifest = json.loads((out / "tokens" / "manifest.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokens" / "tokenizer.model"))
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256((out / "tokens" / "tokenizer.model").read_bytes()).hexdigest()
    assert manifest["tokenizer"]["vocab_size"] == sp.get_piece_size() == 600
    decoded, records_ids = [], []
    for shard in manifest["shards"]:
        reader = ArrayRecordReader(str(out / "tokens" / shard["path"]))
        records = reader.read(list(range(reader.num_records())))
        reader.close()
        assert len(records) == shard["documents"]
        for record in records:
            ids = np.frombuffer(record, "<u4").tolist()
            assert ids[-1] == sp.eos_id()
            records_ids.append(tuple(ids))
            decoded.append(sp.decode(ids[:-1]))
    kept_texts = list(_kept(out).values())
    assert Counter(records_ids) == Counter(tuple(sp.encode(t) + [sp.eos_id()]) for t in kept_texts)
    assert Counter(decoded) == Counter(kept_texts)  # identity normalization: lossless
    assert manifest["documents"] == stats["kept"] and manifest["tokens"] == stats["tokenize"]["tokens"]


def test_task_layout_does_not_change_the_result(reference, corpus, tmp_path):
    out, _, _ = reference
    folder, _ = corpus
    other = tmp_path / "out"
    run(_config(folder, folder / "in", other, "executor.workers=1", "input.parts_per_file=3"))
    assert _kept(other) == _kept(out)
    assert _shards(other) == _shards(out)


@pytest.mark.slow
def test_ray_executor_equals_local(reference, corpus, tmp_path):
    pytest.importorskip("ray")
    out, _, _ = reference
    folder, _ = corpus
    ray_out = tmp_path / "ray"
    run(_config(folder, folder / "in", ray_out, "executor.kind=ray", "executor.workers=2"))
    assert sorted(_kept(ray_out)) == sorted(_kept(out))
    assert _shards(ray_out) == _shards(out)


@pytest.mark.slow
def test_gcs_input_and_output_equal_local(reference, corpus, gcs):
    import fsspec

    out, _, _ = reference
    folder, _ = corpus
    fs = fsspec.filesystem("gs")
    for path in sorted((folder / "in").iterdir()):
        fs.put_file(str(path), f"{gcs}/corpus/{path.name}")
    cfg = _config(folder, f"{gcs}/corpus", f"{gcs}/out", "executor.workers=2")
    run(cfg)
    local = Path(folder / "from-gcs")
    fs.get(f"{gcs}/out/kept/", str(local / "kept"), recursive=True)
    fs.get(f"{gcs}/out/tokens/", str(local / "tokens"), recursive=True)
    assert _kept(local) == _kept(out)
    assert _shards(local) == _shards(out)


@pytest.mark.slow
def test_killed_and_rerun_equals_uninterrupted(reference, corpus, tmp_path):
    out, _, _ = reference
    folder, _ = corpus
    killed = tmp_path / "killed"
    cfg_path = tmp_path / "p.yml"
    cfg_path.write_text(f"input: {{paths: ['{folder / 'in'}/*']}}\noutput_dir: {killed}\nsteps: []\n")
    cmd = [sys.executable, "-m", "data_pipelines.run", "--config", str(cfg_path), *STEPS,
           "progress=false", "executor.workers=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    done = killed / "work" / "done"
    deadline = time.monotonic() + 240
    while not (done.exists() and any(done.glob("minhash_dedup-buckets/*.json"))):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)  # polling for progress; no result depends on this delay
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes
    proc.wait()
    assert not (killed / "stats.json").exists(), "the run finished before the kill"

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _kept(killed) == _kept(out)
    assert _shards(killed) == _shards(out)
    assert json.loads((killed / "stats.json").read_text()) == json.loads((out / "stats.json").read_text())


def test_config_errors(tmp_path):
    from maxllm.config import ConfigError

    (tmp_path / "p.yml").write_text("input: {paths: [x]}\noutput_dir: o\nsteps: []\n")
    with pytest.raises(ConfigError, match=r"config key 'steps.0.type': 'gopher' is not one of 'url_filter', "):
        load_pipeline_config(tmp_path / "p.yml", ["steps=[{type: gopher}]"])
    with pytest.raises(ConfigError, match=r"unknown config key 'steps.0.min_doc_wordz'; did you mean 'steps.0.min_doc_words'"):
        load_pipeline_config(tmp_path / "p.yml", ["steps=[{type: gopher_quality, min_doc_wordz: 3}]"])
    with pytest.raises(ConfigError, match="tokenize needs a train_tokenizer step"):
        load_pipeline_config(tmp_path / "p.yml", ["steps=[{type: tokenize}]"])


def test_output_dir_of_another_config_is_refused(corpus, tmp_path):
    folder, _ = corpus
    out = tmp_path / "o"
    run(_config(folder, folder / "in", out, "steps=[{type: pii}]", "executor.workers=1"))
    with pytest.raises(ValueError, match="holds the output of a different pipeline config"):
        run(_config(folder, folder / "in", out, "steps=[{type: exact_dedup}]", "executor.workers=1"))
