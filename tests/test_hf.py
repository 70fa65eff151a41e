"""Hugging Face export and import: transformers' own tiny Llamas import with equal
logits; a maxllm-trained model exports to a folder transformers loads without
warnings, with equal logits and equal greedy generations; export -> import ->
export is byte-identical; the Hub upload calls the client as documented; bad
folders get errors naming the file, key or tensor."""

import json
import logging
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from maxllm.hf import HFError, export_run, load_pretrained, read_hf_model
from maxllm.import_hf import import_hf
from maxllm.models import build_model
from maxllm.sample import greedy_generate

from conftest import QUICKSTART, model_logits, train_on_quickstart

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VALID = QUICKSTART / "tokens" / "valid"


def _hf_llama(folder, tied: bool, kv_heads: int = 2, seed: int = 0):
    """A random tiny LlamaForCausalLM saved by transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at one; perturb them so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def _tokens(vocab, shape=(2, 17), seed=3):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("tied, kv_heads", [(False, 2), (True, 1)], ids=["gqa", "tied-mqa"])
def test_transformers_llama_imports_with_equal_logits(tmp_path, tied, kv_heads):
    hf = _hf_llama(tmp_path / "hf", tied, kv_heads)
    tokens = _tokens(96)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens).long()).logits.numpy()

    direct = load_pretrained(tmp_path / "hf")  # an HF folder, loaded directly
    assert direct.config.model.tie_embeddings == tied and direct.config.model.num_kv_heads == kv_heads
    diff = np.abs(model_logits(direct, tokens) - theirs).max()
    assert diff <= 1e-4, diff

    run = import_hf(tmp_path / "hf", tmp_path / "run")  # a run directory with a checkpoint
    imported = load_pretrained(run)
    assert np.abs(model_logits(imported, tokens) - theirs).max() <= 1e-4


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny model trained by maxllm for a few steps on the quickstart shards."""
    out = tmp_path_factory.mktemp("trained")
    result = train_on_quickstart(
        out, "train.steps=6", "train.lr=3e-3", "checkpoint.every_steps=3", "model.tie_embeddings=false",
        "model.max_seq_len=128", "model.init_std=0.3",  # large: varied greedy tokens
    )
    return out, result


def test_export_loads_in_transformers_with_equal_logits_and_generations(trained_run, tmp_path, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, result = trained_run
    out = export_run(run, tmp_path / "hf", dtype="float32")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json",
    ]
    transformers.utils.logging.enable_propagation()  # so caplog sees transformers' warnings
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    finally:
        transformers.utils.logging.disable_propagation()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert not [r for r in caplog.records if r.name.startswith("transformers")], caplog.text
    hf.eval()

    ours = load_pretrained(run)
    tokens = _tokens(4096, (2, 24))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens).long()).logits.numpy()
    diff = np.abs(model_logits(ours, tokens) - theirs).max()
    assert diff <= 1e-4, diff

    tok = AutoTokenizer.from_pretrained(out)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(QUICKSTART / "tokenizer.model"))
    prompt = "The function returns a value when"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids == sp.encode(prompt)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(ours.config.model, 0)))
    mine = greedy_generate(graphdef, ours.params, [ids], 20, ours.config.model.max_seq_len)[0]
    with torch.no_grad():
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert gen[0, len(ids):].tolist() == mine
    assert len(set(mine)) > 5, mine  # a real sequence, not one token repeated


def test_export_import_export_is_byte_identical(trained_run, tmp_path):
    run, _ = trained_run
    first = export_run(run, tmp_path / "a", max_shard_size="100KB")  # bfloat16, several shards
    index = json.loads((first / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    reimported = import_hf(first, tmp_path / "run")
    second = export_run(reimported, tmp_path / "b", max_shard_size="100KB")
    for name in [*shards, "model.safetensors.index.json"]:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # The shards are plain safetensors: the reference reader agrees with ours.
    from safetensors import safe_open

    hf = read_hf_model(first)
    with safe_open(str(first / shards[0]), framework="flax") as f:
        for name in f.keys():
            np.testing.assert_array_equal(np.asarray(f.get_tensor(name)), hf.tensors.get(name))
    hf.tensors.close()


def test_training_continues_from_an_hf_folder(tmp_path, tiny):
    from maxllm.train import train

    _hf_llama(tmp_path / "hf", tied=False)
    loaded = load_pretrained(tmp_path / "hf")
    model = loaded.config.model
    cfg = tiny(f"run.output_dir={tmp_path / 'run'}", f"train.init_from={tmp_path / 'hf'}", "train.steps=1",
               "train.lr=0.0", "model.vocab_size=96", "model.d_model=64", "model.mlp_dim=160", "model.num_layers=3",
               "model.head_dim=16", f"model.norm_eps={model.norm_eps}", "model.max_seq_len=128",
               "mesh.fsdp=4", "mesh.tensor=2")
    result = train(cfg)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(result.state["params"])[0],
                            jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(trained_run, tmp_path, monkeypatch):
    import huggingface_hub

    from maxllm.export import main

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, repo_type, private, exist_ok):
            calls.append(("create_repo", repo_id, repo_type, private, exist_ok))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, repo_id, repo_type, folder_path, commit_message):
            files = sorted(p.name for p in (tmp_path / "hf").iterdir())
            calls.append(("upload_folder", repo_id, repo_type, folder_path, files))
            return "https://huggingface.co/me/tiny/commit/abc"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    run, _ = trained_run
    assert main(["--run", str(run), "--out", str(tmp_path / "hf"), "--push-to-hub", "me/tiny", "--private"]) == 0
    assert calls[1] == ("create_repo", "me/tiny", "model", True, True)
    assert calls[2][:4] == ("upload_folder", "me/tiny", "model", str(tmp_path / "hf"))
    assert "model.safetensors" in calls[2][4] and "README.md" in calls[2][4]
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "library_name: transformers" in card and "train:" in card and str(VALID) in card


# ---------------------------------------------------------------------------------
# Errors


def test_errors_name_the_file_key_or_tensor(tmp_path):
    with pytest.raises(HFError, match=r"config.json: not found"):
        read_hf_model(tmp_path)
    _hf_llama(tmp_path / "hf", tied=False)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())

    bad = tmp_path / "gpt2"
    shutil.copytree(tmp_path / "hf", bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(HFError, match=r"architectures=\['GPT2LMHeadModel'\].*not supported"):
        read_hf_model(bad)

    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(HFError, match=r"tensor model.layers.0.mlp.down_proj.weight has shape \(64, 160\), config.json implies \(64, 128\)"):
        load_pretrained(bad)

    (bad / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}))
    with pytest.raises(HFError, match=r"rope_type='yarn' is not supported"):
        read_hf_model(bad)

    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").unlink()
    with pytest.raises(HFError, match=r"gpt2: no model.safetensors"):
        read_hf_model(bad)
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(HFError, match=r"model-00002-of-00002.safetensors: shard named by model.safetensors.index.json is missing"):
        read_hf_model(bad)
    shutil.copyfile(tmp_path / "hf" / "model.safetensors", bad / "model.safetensors")
    (bad / "model.safetensors.index.json").unlink()
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate((bad / "model.safetensors").stat().st_size - 100)
    with pytest.raises(HFError, match=r"model.safetensors: truncated"):
        read_hf_model(bad)


def test_tokenizer_json_gives_sentencepiece_ids(tmp_path):
    """The converted fast tokenizer against sentencepiece itself, on the quickstart
    tokenizer and text (runs of spaces, newlines and tabs, non-Latin text, byte
    fallback), and decoding back to the same text."""
    import gzip

    import sentencepiece as spm
    from tokenizers import Tokenizer

    from maxllm.hf.tokenizer_files import sentencepiece_to_tokenizer_json

    model = QUICKSTART / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    fast = Tokenizer.from_str(sentencepiece_to_tokenizer_json(model))
    with gzip.open(QUICKSTART / "valid.jsonl.gz", "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    texts += ["two  spaces\nnew line\ttab", "SELECT * FROM t;\n    return x", "ünïcødé 日本語 🙂", "trailing  ", "a\n\n b"]
    for text in texts:
        ids = sp.encode(text)
        assert fast.encode(text, add_special_tokens=False).ids == ids, text[:80]
        assert fast.decode(ids, skip_special_tokens=False) == sp.decode(ids)


def test_export_cli_errors_exit_2_and_never_leave_a_partial_folder(trained_run, tmp_path, capsys):
    from maxllm.export import main

    assert main(["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "nope/config.yml: not found" in capsys.readouterr().err
    run, _ = trained_run
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["--run", str(run), "--out", str(tmp_path / "taken")]) == 2
    assert "taken: exists and is not empty (pass --overwrite" in capsys.readouterr().err
    assert main(["--run", str(run), "--out", str(tmp_path / "y"), "--step", "4"]) == 2
    assert "checkpoint step 4 not found" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not (tmp_path / "taken" / "config.json").exists()
