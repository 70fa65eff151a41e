"""The Grain input pipeline over data_pipelines' shards: an epoch holds every
document's tokens exactly once, packing keeps segments whole with positions from 0
and padding masked, mixtures hold their weights, batches are global arrays with
the mesh's batch sharding, the held-out split comes in a fixed order, and bad data
gets an error naming the file."""

import collections
import gzip
import json
import shutil

import grain
import jax
import numpy as np
import pytest

from maxllm.data import DataError, EvalInput, TrainInput, process_rows
from maxllm.data import pipeline as pl
from maxllm.data.sources import Manifest, jsonl_documents, token_shards
from maxllm.data.synthetic import SyntheticRows, pack_window
from maxllm.mesh import batch_sharding, make_mesh
from maxllm.tokenizer import Tokenizer

from conftest import QUICKSTART, ROOT, prepare_tokens, resume_input

VALID = QUICKSTART / "tokens" / "valid"


def _docs(manifest_dir) -> list[np.ndarray]:
    ds = token_shards(Manifest.read(manifest_dir))
    return [ds[i] for i in range(len(ds))]


def _pieces(doc: np.ndarray, seq_len: int) -> list[tuple[tuple, tuple]]:
    return [(tuple(p["inputs"]), tuple(p["targets"])) for p in pl.ChunkDocument(seq_len).flat_map(doc)]


def _epoch(docs, *, packing, seq_len=64, rows=4, layout=None, shuffle=True, seed=0):
    stream = pl.document_stream(
        [grain.MapDataset.source(docs)], None, layout=layout or pl.Layout(rows, 0, 1),
        seed=seed, shuffle=shuffle, num_epochs=1,
    )
    batches = pl.packed_batches(
        stream, seq_len=seq_len, rows=rows, seed=seed, packing=packing, packing_bins=None,
        shuffle=shuffle, drop_remainder=False, num_workers=0,
    )
    return [pl.to_model_batch(b) for b in batches]


def _segments(batches) -> list[tuple[tuple, tuple]]:
    """Every (inputs, targets) segment of every row, checking the row invariants."""
    out = []
    for batch in batches:
        for r in range(batch["inputs"].shape[0]):
            seg, pos, mask = batch["segment_ids"][r], batch["positions"][r], batch["loss_mask"][r]
            np.testing.assert_array_equal(mask, seg != 0)  # padding, and only padding, is masked
            assert not batch["inputs"][r][seg == 0].any() and not pos[seg == 0].any()
            for s in np.unique(seg[seg != 0]):
                where = np.flatnonzero(seg == s)
                assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), "segment not contiguous"
                np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # positions from 0
                out.append((tuple(batch["inputs"][r][where]), tuple(batch["targets"][r][where])))
    return out


def test_first_fit_epoch_holds_every_piece_exactly_once_never_straddling():
    docs = _docs(VALID)
    seq_len = 64
    expected = collections.Counter(p for d in docs for p in _pieces(d, seq_len))
    got = collections.Counter(_segments(_epoch(docs, packing="first_fit", seq_len=seq_len)))
    # Equal multisets of whole pieces: every token once, no piece split across rows.
    assert got == expected
    assert sum(len(i) for i, _ in got.elements()) == sum(len(d) - 1 for d in docs)


def test_concat_split_rows_are_full_and_hold_the_stream_in_order():
    docs = _docs(VALID)
    batches = _epoch(docs, packing="concat_split", shuffle=False)
    _segments(batches)  # row invariants
    inputs = np.concatenate([b["inputs"][b["segment_ids"] != 0] for b in batches])
    targets = np.concatenate([b["targets"][b["segment_ids"] != 0] for b in batches])
    np.testing.assert_array_equal(inputs, np.concatenate([d[:-1] for d in docs]))
    np.testing.assert_array_equal(targets, np.concatenate([d[1:] for d in docs]))
    rows = np.concatenate([b["segment_ids"] for b in batches])
    full = (rows != 0).all(axis=1)
    assert full[: int(full.sum())].all() and full.sum() >= len(rows) - 4  # only the tail is short


def test_shuffle_is_seeded_and_changes_every_epoch():
    docs = [np.full(3, i, np.int32) for i in range(50)]
    def order(seed):
        stream = pl.document_stream([grain.MapDataset.source(docs)], None, layout=pl.Layout(1, 0, 1),
                                    seed=seed, shuffle=True, num_epochs=None)
        it = iter(stream)
        return [int(next(it)[0]) for _ in range(100)]
    a = order(0)
    assert a == order(0) and a != order(1)
    first, second = a[:50], a[50:]
    assert sorted(first) == sorted(second) == list(range(50)) and first != second


def test_process_shards_are_disjoint_and_cover_the_epoch():
    docs = _docs(VALID)
    single = collections.Counter(_segments(_epoch(docs, packing="first_fit", rows=4)))
    parts = [
        collections.Counter(_segments(_epoch(docs, packing="first_fit", rows=2, layout=pl.Layout(2, i, 2))))
        for i in range(2)
    ]
    assert not (parts[0] & parts[1]) and parts[0] + parts[1] == single


def test_mixture_weights_hold_over_10000_samples(tmp_path):
    a = prepare_tokens(tmp_path / "a", [f"alpha document {i}." for i in range(40)])
    b = prepare_tokens(tmp_path / "b", [f"beta text number {i}, longer." for i in range(25)])
    marks = {ds: set(map(tuple, _docs(ds))) for ds in (a, b)}
    for weights in ([0.7, 0.3], [0.2, 0.8]):
        stream = pl.document_stream([token_shards(Manifest.read(a)), token_shards(Manifest.read(b))], weights,
                                    layout=pl.Layout(1, 0, 1), seed=3, shuffle=True, num_epochs=None)
        it = iter(stream)
        samples = [tuple(next(it)) for _ in range(10_000)]
        share = sum(s in marks[a] for s in samples) / len(samples)
        assert all(s in marks[a] or s in marks[b] for s in samples)
        assert abs(share - weights[0]) <= 0.02 * weights[0], share


def test_train_input_gives_global_arrays_with_the_batch_sharding(tiny):
    cfg = tiny(f"data.source=tokens", f"data.path={VALID}", "model.vocab_size=4096", "mesh.fsdp=4", "mesh.sequence=2")
    mesh = make_mesh(cfg.mesh)
    shape = (cfg.train.global_batch_size, cfg.data.seq_len)
    sharding = batch_sharding(cfg.mesh.rules.activations, mesh, shape)
    data = TrainInput(cfg, sharding)
    assert data.tokenizer.vocab_size == 4096 and data.layout == pl.Layout(shape[0], 0, 1)
    batch = data.next()
    assert batch["inputs"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "sequence")
    assert batch["inputs"].shape == shape
    for key in ("inputs", "targets", "positions", "segment_ids", "loss_mask"):
        for shard in batch[key].addressable_shards:  # each device holds its block of the rows
            assert shard.data.shape == (shape[0] // 4, shape[1] // 2)


def test_process_rows_group_processes_that_share_rows(tiny):
    cfg = tiny("mesh.fsdp=4", "mesh.sequence=2")
    mesh = make_mesh(cfg.mesh)
    sharding = batch_sharding(cfg.mesh.rules.activations, mesh, (8, 32))
    rows, cols, layout = process_rows(sharding, (8, 32))
    assert (rows, cols, layout) == (slice(0, 8), slice(0, 32), pl.Layout(8, 0, 1))


def test_synthetic_rows_are_a_pure_function_of_seed_step_and_row():
    rows = SyntheticRows(32, 512, seed=0)
    np.testing.assert_array_equal(rows.rows(2, 3, 6)["inputs"], rows.rows(2, 0, 8)["inputs"][3:6])
    assert not np.array_equal(rows.rows(0, 0, 4)["inputs"], SyntheticRows(32, 512, 1).rows(0, 0, 4)["inputs"])


def test_pack_window_segments_positions_and_mask():
    row = pack_window(np.array([10, 11, 12, 20, 21, 30, 31, 32]), np.array([0, 0, 0, 1, 1, 2, 2, 2]))
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 0, 1])
    np.testing.assert_array_equal(row["loss_mask"], [1, 1, 0, 1, 0, 1, 1])


def test_eval_split_is_read_in_a_fixed_order_once(tiny):
    cfg = tiny(f"data.source=tokens", f"data.path={VALID}", f"data.eval_path={VALID}", "model.vocab_size=4096",
               "mesh.fsdp=8")
    mesh = make_mesh(cfg.mesh)
    shape = (cfg.train.global_batch_size, cfg.data.seq_len)
    ev = EvalInput(cfg, batch_sharding(cfg.mesh.rules.activations, mesh, shape))
    first = [{k: np.asarray(v) for k, v in b.items()} for b in ev.batches()]
    second = [{k: np.asarray(v) for k, v in b.items()} for b in ev.batches()]
    assert len(first) == len(second) > 1
    for x, y in zip(first, second):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    docs = _docs(VALID)
    expected = collections.Counter(p for d in docs for p in _pieces(d, cfg.data.seq_len))
    assert collections.Counter(_segments(first)) == expected
    assert first[-1]["loss_mask"][-1].sum() == 0  # the short last batch is padded and masked


def test_text_source_tokenizes_jsonl_on_the_fly(tiny):
    cfg = tiny("data.source=text", f"data.path={QUICKSTART / 'valid.jsonl.gz'}",
               f"data.tokenizer={QUICKSTART / 'tokenizer.model'}", "model.vocab_size=4096")
    tok = Tokenizer.load(cfg.data.tokenizer)
    with gzip.open(QUICKSTART / "valid.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    ds = jsonl_documents(cfg.data.path, "text", cfg.data.tokenizer, add_eos=True)
    assert len(ds) == len(texts)
    np.testing.assert_array_equal(ds[3], tok.encode(texts[3]) + [tok.eos_id])
    # The same documents as the shipped shards, which data_pipelines made from this file.
    assert sorted(map(tuple, (ds[i] for i in range(len(ds))))) == sorted(map(tuple, _docs(VALID)))
    mesh = make_mesh(cfg.mesh)
    data = TrainInput(cfg, batch_sharding(cfg.mesh.rules.activations, mesh, (8, cfg.data.seq_len)))
    assert int(np.asarray(data.next()["loss_mask"]).sum()) > 0


def test_hf_tokenizer_json_loads_behind_the_same_wrapper(tmp_path):
    from tokenizers import Tokenizer as HF, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3, "again": 4}
    hf = HF(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert (tok.vocab_size, tok.eos_id, tok.encode("hello world again")) == (5, 1, [2, 3, 4])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "again"}))
    assert Tokenizer.load(tmp_path / "tokenizer.json").eos_id == 4
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"tokenizer.json: eos token '<\|nope\|>'"):
        Tokenizer.load(tmp_path)


def test_quickstart_shards_are_what_the_data_config_makes(tmp_path, monkeypatch):
    from data_pipelines.config import load_pipeline_config
    from data_pipelines.pipeline import run

    monkeypatch.chdir(ROOT)  # the config's paths are relative to the repository
    for split in ("train", "valid"):
        cfg = load_pipeline_config("configs/data/quickstart.yml", [
            f"input.paths=[data/quickstart/{split}.jsonl.gz]", f"output_dir={tmp_path / split}", "executor.workers=1",
        ])
        run(cfg)
        shipped = QUICKSTART / "tokens" / split
        made = tmp_path / split / "tokens"
        assert sorted(p.name for p in shipped.iterdir()) == sorted(p.name for p in made.iterdir())
        for path in shipped.iterdir():
            assert path.read_bytes() == (made / path.name).read_bytes(), path


# ---------------------------------------------------------------------------------
# Errors name the file


def _copy_valid(tmp_path):
    shutil.copytree(VALID, tmp_path / "tokens")
    return tmp_path / "tokens"


def test_missing_shard_is_named(tmp_path):
    tokens = _copy_valid(tmp_path)
    (tokens / "shard-00001-of-00002.array_record").unlink()
    with pytest.raises(DataError, match=r"shard-00001-of-00002.array_record: shard listed in .*manifest.json is missing"):
        Manifest.read(tokens)


def test_manifest_that_does_not_match_its_shards_is_named(tmp_path):
    tokens = _copy_valid(tmp_path)
    manifest = json.loads((tokens / "manifest.json").read_text())
    manifest["shards"][0]["documents"] += 1
    (tokens / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"shard-00000-of-00002.array_record: \d+ records, but .*manifest.json says \d+"):
        Manifest.read(tokens)
    (tokens / "shard-00000-of-00002.array_record").write_bytes(b"not an array record file")
    with pytest.raises(DataError, match=r"shard-00000-of-00002.array_record: unreadable shard"):
        Manifest.read(tokens)
    (tokens / "manifest.json").write_text("{")
    with pytest.raises(DataError, match=r"manifest.json: not a data_pipelines manifest"):
        Manifest.read(tokens)


def test_tokenizer_that_does_not_match_is_named(tmp_path, tiny):
    tokens = _copy_valid(tmp_path)
    cfg = tiny("data.source=tokens", f"data.path={tokens}", "model.vocab_size=512")
    mesh = make_mesh(cfg.mesh)
    sharding = batch_sharding(cfg.mesh.rules.activations, mesh, (8, cfg.data.seq_len))
    with pytest.raises(DataError, match=r"tokenizer.model: tokenizer has 4096 tokens but model.vocab_size is 512"):
        TrainInput(cfg, sharding)
    with (tokens / "tokenizer.model").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match=r"tokenizer.model: sha256 .* does not match .*manifest.json"):
        Manifest.read(tokens)


def test_bad_text_records_are_named_with_their_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no string field 'text'"):
        jsonl_documents(str(bad), "text", str(QUICKSTART / "tokenizer.model"), True)
    bad.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        jsonl_documents(str(bad), "text", str(QUICKSTART / "tokenizer.model"), True)
    with pytest.raises(DataError, match=r"missing.jsonl: data file not found"):
        jsonl_documents(str(tmp_path / "missing.jsonl"), "text", str(QUICKSTART / "tokenizer.model"), True)


# ---------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_iterator_gives_the_uninterrupted_batches(tiny, tmp_path, workers):
    import absl.flags

    absl.flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
    cfg = tiny("data.source=tokens", f"data.path={VALID}", "model.vocab_size=4096", "mesh.fsdp=8",
               f"data.num_workers={workers}", "checkpoint.enabled=true")
    mesh = make_mesh(cfg.mesh)
    sharding = batch_sharding(cfg.mesh.rules.activations, mesh, (cfg.train.global_batch_size, cfg.data.seq_len))
    # 30 batches: past the end of the first epoch (54 documents, ~25 batches)
    resumed, expected, got = resume_input(cfg, sharding, tmp_path / "ckpt", 3, 30)
    for step, (x, y) in enumerate(zip(expected, got), start=4):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"step {step} {k}")
    assert resumed.step == 33


def test_resumed_training_sees_the_same_batches_and_losses(tiny, tmp_path):
    from maxllm.train import train

    run = ["data.source=tokens", f"data.path={VALID}", "model.vocab_size=4096", "train.steps=12",
           "checkpoint.enabled=true", "checkpoint.every_steps=4", "checkpoint.max_to_keep=null"]
    whole = train(tiny(f"run.output_dir={tmp_path / 'whole'}", *run))
    for k in (4, 8):
        out = tmp_path / f"from{k}"
        shutil.copytree(tmp_path / "whole", out)
        for step in range(k + 4, 13, 4):  # as if the run had stopped after step k
            shutil.rmtree(out / "checkpoints" / str(step))
        resumed = train(tiny(f"run.output_dir={out}", *run))
        assert resumed.start_step == k and sorted(resumed.losses) == list(range(k + 1, 13))
        for step, loss in resumed.losses.items():
            assert loss == whole.losses[step], step


# ---------------------------------------------------------------------------------
# Shards damaged or removed during a run


def test_a_shard_damaged_mid_run_is_an_error_naming_it(tiny, tmp_path):
    """A shard overwritten after the run started: the next read of it is a
    DataError naming the file and the record. A shard deleted mid-run is still
    read through the open file (POSIX keeps it until closed), so the run's data
    stay right; the next start names it as missing."""
    from maxllm import train as train_lib

    tokens = tmp_path / "tokens"
    shutil.copytree(QUICKSTART / "tokens" / "train", tokens)
    cfg = tiny("data.source=tokens", f"data.path={tokens}", "model.vocab_size=4096", "data.seq_len=256")
    mesh = make_mesh(cfg.mesh)
    damaged, deleted = sorted(tokens.glob("*.array_record"))
    with train_lib.step_context(cfg, mesh):
        data = TrainInput(cfg, train_lib.input_layout(cfg, mesh))
        for _ in range(3):
            data.next()
        deleted.unlink()
        damaged.write_bytes(bytes(damaged.stat().st_size))  # the same inode, overwritten with zeros
        with pytest.raises(DataError) as err:
            for _ in range(2000):  # the epoch visits every record of both shards
                data.next()
    print("\n" + str(err.value))
    assert str(err.value).startswith(f"{damaged}: record ") and "cannot be read" in str(err.value)
    with pytest.raises(DataError, match=f"{damaged}: unreadable shard"):
        Manifest.read(tokens)  # a resume checks every shard before reading
    shutil.copy(QUICKSTART / "tokens" / "train" / damaged.name, damaged)
    with pytest.raises(DataError, match=f"{deleted}: shard listed in .* is missing"):
        Manifest.read(tokens)
