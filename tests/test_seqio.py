"""seqio Tasks and Mixtures feed the same packing, batching and checkpointing as the
other sources. Needs `pip install "maxllm[seqio]"` (TensorFlow): CI runs this file
in a separate environment that has it; elsewhere it is skipped."""

import collections
import functools
import gzip
import json

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from maxllm.config import SeqioConfig  # noqa: E402
from maxllm.data import DataError  # noqa: E402
from maxllm.data import pipeline as pl  # noqa: E402
from maxllm.data.seqio_source import SeqioDocuments  # noqa: E402
from maxllm.mesh import batch_sharding, make_mesh  # noqa: E402
from maxllm.tokenizer import Tokenizer  # noqa: E402

from conftest import QUICKSTART, resume_input  # noqa: E402

TOKENIZER = QUICKSTART / "tokenizer.model"


def _texts() -> list[str]:
    with gzip.open(QUICKSTART / "valid.jsonl.gz", "rt") as f:
        return [json.loads(line)["text"] for line in f]


def _dataset_fn(split, shuffle_files, seed=None, texts=()):
    return tf.data.Dataset.from_tensor_slices({"text": list(texts)})


def _register():
    if "maxllm_test_docs" in seqio.TaskRegistry.names():
        return
    vocab = seqio.SentencePieceVocabulary(str(TOKENIZER))
    features = {"targets": seqio.Feature(vocab, add_eos=True)}
    texts = _texts()
    for name, subset in (("maxllm_test_docs", texts), ("maxllm_test_even", texts[::2]), ("maxllm_test_odd", texts[1::2])):
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(functools.partial(_dataset_fn, texts=subset), splits=["train"]),
            preprocessors=[
                functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
                seqio.preprocessors.tokenize,
                seqio.preprocessors.append_eos,
            ],
            output_features=features,
        )
    seqio.MixtureRegistry.add("maxllm_test_mix", [("maxllm_test_even", 3.0), ("maxllm_test_odd", 1.0)])


@pytest.fixture(scope="module")
def task():
    _register()
    return SeqioConfig(task="maxllm_test_docs", split="train", module=None, feature="targets", add_eos=True)


def _read(docs, n=None):
    it = iter(docs)
    out = []
    while n is None or len(out) < n:
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def test_documents_are_the_tokenized_texts_with_eos(task):
    tok = Tokenizer.load(TOKENIZER)
    docs = _read(SeqioDocuments(task, shard_index=0, shard_count=1, seed=0, shuffle=False, num_epochs=1, model_vocab=4096))
    expected = [tok.encode(t) + [tok.eos_id] for t in _texts()]
    assert [d.tolist() for d in docs] == expected


def test_shards_are_disjoint_and_cover_the_task_and_packing_keeps_every_token(task):
    parts = [
        _read(SeqioDocuments(task, shard_index=i, shard_count=2, seed=0, shuffle=True, num_epochs=1, model_vocab=4096))
        for i in range(2)
    ]
    everything = _read(SeqioDocuments(task, shard_index=0, shard_count=1, seed=0, shuffle=False, num_epochs=1, model_vocab=4096))
    a, b = (collections.Counter(map(tuple, p)) for p in parts)
    assert not (a & b) and a + b == collections.Counter(map(tuple, everything))

    docs = SeqioDocuments(task, shard_index=0, shard_count=1, seed=0, shuffle=True, num_epochs=1, model_vocab=4096)
    batches = pl.packed_batches(docs, seq_len=64, rows=4, seed=0, packing="first_fit", packing_bins=None,
                                shuffle=True, drop_remainder=False, num_workers=0)
    got = collections.Counter()
    for packed in batches:
        b = pl.to_model_batch(packed)
        for r in range(4):
            seg = b["segment_ids"][r]
            for s in np.unique(seg[seg != 0]):
                got[(tuple(b["inputs"][r][seg == s]), tuple(b["targets"][r][seg == s]))] += 1
    expected = collections.Counter(
        (tuple(p["inputs"]), tuple(p["targets"])) for d in everything for p in pl.ChunkDocument(64).flat_map(d)
    )
    assert got == expected


def test_train_input_resumes_a_seqio_mixture_exactly(tiny, tmp_path, task):
    cfg = tiny("data.source=seqio", "data.seqio.task=maxllm_test_mix", "model.vocab_size=4096", "mesh.fsdp=8",
               "checkpoint.enabled=true")
    sharding = batch_sharding(cfg.mesh.rules.activations, make_mesh(cfg.mesh), (8, cfg.data.seq_len))
    _, expected, got = resume_input(cfg, sharding, tmp_path / "ckpt", 2, 4)
    for x, y in zip(expected, got):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert expected[0]["loss_mask"].sum() > 0


def test_errors_name_the_task(task):
    bad = task.model_copy(update={"task": "no_such_task"})
    with pytest.raises(DataError, match="data.seqio.task='no_such_task'"):
        SeqioDocuments(bad, shard_index=0, shard_count=1, seed=0, shuffle=False, num_epochs=1, model_vocab=4096)
    with pytest.raises(DataError, match="its vocabulary has 4096 tokens but model.vocab_size is 512"):
        SeqioDocuments(task, shard_index=0, shard_count=1, seed=0, shuffle=False, num_epochs=1, model_vocab=512)
    with pytest.raises(DataError, match=r"data.seqio.feature='inputs'"):
        SeqioDocuments(task.model_copy(update={"feature": "inputs"}), shard_index=0, shard_count=1, seed=0,
                       shuffle=False, num_epochs=1, model_vocab=4096)
