import gzip
import json

import jax
import numpy as np
import pytest

from maxllm.data import DataError, SyntheticSource, TextSource, Tokenizer, global_batch, make_source, pack_window
from maxllm.mesh import batch_sharding, make_mesh

from conftest import ROOT

QUICKSTART = ROOT / "data" / "quickstart"


def test_pack_window_segments_positions_and_mask():
    window = np.array([10, 11, 12, 20, 21, 30, 31, 32])
    docs = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    row = pack_window(window, docs)
    np.testing.assert_array_equal(row["inputs"], [10, 11, 12, 20, 21, 30, 31])
    np.testing.assert_array_equal(row["targets"], [11, 12, 20, 21, 30, 31, 32])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 0, 1])
    # Targets that start the next document are not trained on.
    np.testing.assert_array_equal(row["loss_mask"], [1, 1, 0, 1, 0, 1, 1])


def _text_cfg(tiny, *extra):
    return tiny(
        "data.source=text",
        f"data.path={QUICKSTART / 'valid.jsonl.gz'}",
        f"data.tokenizer={QUICKSTART / 'tokenizer.model'}",
        "model.vocab_size=4096",
        *extra,
    )


def test_text_source_is_a_pure_function_of_seed_and_step(tiny):
    cfg = _text_cfg(tiny)
    a = TextSource(cfg.data, Tokenizer(cfg.data.tokenizer), seed=0, batch_size=8)
    b = TextSource(cfg.data, Tokenizer(cfg.data.tokenizer), seed=0, batch_size=8)
    for step in (0, 3, 1000):
        for key, value in a.rows(step, 0, 8).items():
            np.testing.assert_array_equal(value, b.rows(step, 0, 8)[key])
    # Any slice of rows is the same rows of the whole batch (what each process reads).
    np.testing.assert_array_equal(a.rows(2, 3, 6)["inputs"], a.rows(2, 0, 8)["inputs"][3:6])
    other_seed = TextSource(cfg.data, Tokenizer(cfg.data.tokenizer), seed=1, batch_size=8)
    assert not np.array_equal(a.rows(0, 0, 8)["inputs"], other_seed.rows(0, 0, 8)["inputs"])


def test_text_source_epoch_visits_every_window_once_and_reshuffles(tiny):
    cfg = _text_cfg(tiny, "data.seq_len=64")
    B = 7  # does not divide the window count, so epochs start mid-step
    src = TextSource(cfg.data, Tokenizer(cfg.data.tokenizer), seed=0, batch_size=B)
    W = src.num_windows
    order = [src.window_index(step, row) for step in range(3 * W // B + 1) for row in range(B)]
    first, second = order[:W], order[W : 2 * W]
    assert sorted(first) == list(range(W)) and sorted(second) == list(range(W))
    assert first != second
    # rows() reads exactly those windows.
    window = src.window_index(5, 2) * 64
    np.testing.assert_array_equal(src.rows(5, 2, 3)["inputs"][0], src.tokens[window : window + 64])


def test_text_source_errors_name_file_and_line(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    cfg = _text_cfg(tiny, f"data.path={bad}")
    with pytest.raises(DataError, match=r"bad.jsonl:2: no string field 'text'"):
        TextSource(cfg.data, Tokenizer(cfg.data.tokenizer), 0, 8)
    bad.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        TextSource(cfg.data, Tokenizer(cfg.data.tokenizer), 0, 8)
    with pytest.raises(DataError, match="has 4096 pieces but model.vocab_size is 512"):
        make_source(_text_cfg(tiny, "model.vocab_size=512").data, 512, 0, 8)


def test_global_batch_is_sharded_and_equals_host_rows(tiny):
    cfg = tiny("mesh.fsdp=4", "mesh.sequence=2")
    mesh = make_mesh(cfg.mesh)
    sharding = batch_sharding(cfg.mesh.rules.activations, mesh, (8, 32))
    src = SyntheticSource(cfg.data, 512, 0)
    batch = global_batch(src, 5, sharding, (8, 32))
    assert batch["inputs"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "sequence")
    np.testing.assert_array_equal(np.asarray(batch["inputs"]), src.rows(5, 0, 8)["inputs"])


def test_quickstart_data_is_what_the_docs_say():
    with gzip.open(QUICKSTART / "train.jsonl.gz", "rt") as f:
        sources = {json.loads(line)["source"] for line in f}
    assert sources == {"python3.11-doc", "postgresql-doc-15", "python-django-doc"}  # permissive only
    tok = Tokenizer(QUICKSTART / "tokenizer.model")
    text = "SELECT * FROM users;\n    return x"
    assert tok.decode(tok.encode(text)) == text
