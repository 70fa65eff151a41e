"""examples/ablation/run.py, reduced to 10 steps per arm: both arms prepared from the
labelled web sample with the same tokenizer, trained on the same number of tokens,
evaluated, tabled side by side and plotted."""

import gzip
import json
import subprocess
import sys

import pytest

from conftest import ROOT

STEPS, BATCH, SEQ_LEN = 10, 8, 128


def _jsonl(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def _kept(data_dir):
    return [r for p in sorted((data_dir / "kept").glob("*.jsonl.gz")) for r in _jsonl(p)]


def _row(table: str, label: str) -> list[str]:
    """The cells of the table row whose first cell starts with `label`."""
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith(f"| {label}")]
    assert len(rows) == 1, (label, table)
    return [cell.strip() for cell in rows[0]]


@pytest.mark.slow
def test_ablation_reduced(tmp_path):
    out = tmp_path / "ablation"
    cmd = [sys.executable, str(ROOT / "examples" / "ablation" / "run.py"), "--out", str(out), "--steps", str(STEPS),
           "--batch-size", str(BATCH), "--seq-len", str(SEQ_LEN), "--seeds", "0", "--eval-every", "5",
           "--eval-limit", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[ablation] train filtered seed 0" in proc.stdout  # per-stage timings printed
    results = json.loads((out / "results.json").read_text())
    corpus, runs = results["corpus"], results["runs"]
    a, b = runs["filtered"][0], runs["unfiltered"][0]

    # The same tokens in both arms: same tokenizer, rows packed full, same steps,
    # under one epoch of either corpus, the held-out loss taken at the same steps.
    assert corpus["filtered"]["tokenizer_sha256"] == corpus["unfiltered"]["tokenizer_sha256"]
    assert a["packing"] == b["packing"] == "concat_split"
    assert a["train_tokens"] == b["train_tokens"] == STEPS * BATCH * SEQ_LEN
    assert [s for s, _ in a["train_loss"]] == [s for s, _ in b["train_loss"]] == list(range(1, STEPS + 1))
    assert [s for s, _ in a["eval_loss"]] == [s for s, _ in b["eval_loss"]] == [5, 10]
    assert corpus["filtered"]["tokens"] > a["train_tokens"]
    for r in (a, b):  # both learned something from a near-uniform start (log 4096 = 8.32)
        assert r["eval_loss"][-1][1] < r["eval_loss"][0][1] < 8.3

    # The filtered arm: fewer documents, no exact duplicate left (by the labels and
    # by the text), and every drop named by a rule; the unfiltered arm keeps all.
    labels = {r["id"]: r["kind"] for r in _jsonl(ROOT / "data" / "web" / "web.labels.jsonl.gz")}
    kept = _kept(out / "filtered" / "data")
    assert len(kept) == corpus["filtered"]["kept"] < corpus["unfiltered"]["kept"] == len(labels)
    assert [labels[r["id"]] for r in kept].count("exact_dup") == 0
    assert len({r["text"] for r in kept}) == len(kept)
    assert sum(corpus["filtered"]["dropped"].values()) == len(labels) - len(kept)
    assert corpus["filtered"]["dropped"]["exact_dedup/duplicate"] > 0
    assert corpus["unfiltered"]["kept_by_kind"]["exact_dup"] == list(labels.values()).count("exact_dup")

    # The held-out text, split by the filtered recipe for the final evaluation.
    assert sum(results["heldout"].values()) == len(_jsonl(ROOT / "data" / "quickstart" / "valid.jsonl.gz"))
    assert all(f"heldout_{kind}/bits_per_byte" in a["scores"] for kind in ("kept", "dropped"))

    # The table: both arms' numbers side by side, and B - A that agrees with them.
    table = (out / "results.md").read_text()
    assert _row(table, "| filtered (A) | unfiltered (B) | B − A")
    docs = _row(table, "documents kept")
    assert docs[1:] == [f"{len(kept):,}", f"{len(labels):,}", f"{len(labels) - len(kept):+,}"]
    assert _row(table, "training tokens per run")[1:3] == [f"{STEPS * BATCH * SEQ_LEN:,}"] * 2
    for label in (f"held-out loss at step {STEPS}", "final train loss", "`maxllm.eval` docs_mc/acc ",
                  "`maxllm.eval` valid/bits_per_byte"):
        x, y, diff = (float(cell) for cell in _row(table, label)[1:])
        assert diff == pytest.approx(y - x, abs=2e-3), label
    assert float(_row(table, f"held-out loss at step {STEPS}")[1]) == pytest.approx(a["eval_loss"][-1][1], abs=1e-3)

    # The plot: a PNG that matplotlib reads back, two panels wide.
    png = out / "ablation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > height > 100
