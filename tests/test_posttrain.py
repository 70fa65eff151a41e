"""Fine-tuning: DPO losses against their formulas, SFT masks and packing, record
errors with file:line, chat templates, and DPO runs (reference kept or
precomputed, resumed, sharded)."""

import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import QUICKSTART, ROOT, TINY
from maxllm.config import load_config
from maxllm.data import DataError
from maxllm.posttrain import BUILTIN_TEMPLATES, ChatTemplate, Reader, TemplateError, TextEncoder, dpo_losses
from maxllm.posttrain.dpo import dpo_objective, pair_logps
from maxllm.tokenizer import Tokenizer

SP = QUICKSTART / "tokenizer.model"
CHAT = ROOT / "data" / "posttrain" / "chat.jsonl"
PREFERENCES = ROOT / "data" / "posttrain" / "preferences.jsonl"


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)  # log(1 / (1 + e^-x)), stable


def _reference_losses(pc, pr, rc, rr, beta, loss_type, eps):
    """The papers' losses, written out independently of maxllm.posttrain.dpo."""
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":  # DPO eq. 7; conservative DPO (Mitchell, 2023) for eps > 0
        return -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
    if loss_type == "robust":  # Chowdhury et al. 2024, eq. 9
        return ((1 - eps) * -_log_sigmoid(beta * h) - eps * -_log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":  # RSO
        return np.maximum(0.0, 1 - beta * h)
    return (h - 1 / (2 * beta)) ** 2  # IPO eq. 17


@pytest.mark.parametrize("loss_type,beta,eps", [
    ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("robust", 0.1, 0.1), ("robust", 0.3, 0.0),
    ("hinge", 0.1, 0.0), ("hinge", 2.0, 0.0), ("ipo", 0.1, 0.0), ("ipo", 0.7, 0.0),
])
def test_dpo_losses_and_metrics_equal_the_formulas(loss_type, beta, eps):
    pc = np.array([-12.0, -30.5, -7.25, -50.0, -3.0, -18.0])
    pr = np.array([-15.0, -29.0, -7.25, -80.0, -9.5, -11.0])
    rc = np.array([-13.0, -31.0, -8.0, -49.0, -4.0, -17.5])
    rr = np.array([-14.0, -30.0, -7.0, -70.0, -5.0, -12.5])
    losses, metrics = dpo_losses(*(jnp.asarray(a, jnp.float32) for a in (pc, pr, rc, rr)),
                                 beta=beta, loss_type=loss_type, label_smoothing=eps)
    expected = _reference_losses(pc, pr, rc, rr, beta, loss_type, eps)
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-5, atol=1e-6)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    want = {
        "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).mean(),
        "logps/chosen": pc.mean(), "logps/rejected": pr.mean(),
    }
    got = {k: float(np.mean(v)) for k, v in metrics.items()}
    assert got.keys() == want.keys()
    for key in want:
        assert math.isclose(got[key], want[key], rel_tol=1e-5, abs_tol=1e-6), (key, got[key], want[key])
    print(f"\n{loss_type} beta={beta} eps={eps}: loss {float(np.mean(losses)):.6f} (formula {expected.mean():.6f}), "
          f"accuracies {got['rewards/accuracies']:.3f}, margins {got['rewards/margins']:.4f}")


def _tiny_model(tiny):
    from flax import nnx

    from maxllm.models import build_model

    cfg = tiny("model.vocab_size=4096", "model.remat=none")
    model = build_model(cfg.model, 0)
    graphdef, state = nnx.split(model)
    return cfg, model, graphdef, nnx.to_pure_dict(state)


def _pairs(cfg, n=3):
    reader = Reader(TextEncoder(Tokenizer.load(SP)), None, cfg.data.seq_len)
    from maxllm.posttrain.input import PadPair

    records = [{"prompt": f"Question {i}: what does len() return?\nAnswer:", "chosen": f" The number of items, {i}.",
                "rejected": " I do not know." * (i + 1)} for i in range(n)]
    pad = PadPair(cfg.data.seq_len, None)
    rows = [pad({**reader.preference(r), "index": i}) for i, r in enumerate(records)]
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_objective_scores_completions_summed_or_averaged(tiny, loss_type):
    """The objective's loss equals the formula on sequence log-probs computed here
    from the model's logits: summed over the answer's tokens (IPO: averaged)."""
    cfg, model, graphdef, params = _tiny_model(tiny)
    batch = _pairs(cfg)
    P, _, T = batch["inputs"].shape
    logits, _, _ = model(batch["inputs"].reshape(2 * P, T), batch["positions"].reshape(2 * P, T),
                         batch["segment_ids"].reshape(2 * P, T))
    logp = np.take_along_axis(_log_softmax(np.asarray(logits, np.float64)),
                              np.asarray(batch["targets"]).reshape(2 * P, T)[..., None], -1)[..., 0]
    mask = np.asarray(batch["loss_mask"]).reshape(2 * P, T)
    seq = (logp * mask).sum(-1)
    if loss_type == "ipo":
        seq = seq / mask.sum(-1)
    seq = seq.reshape(P, 2)
    ref = seq + np.array([[0.5, -0.25], [-1.0, 0.75], [0.0, 0.125]])  # a reference that differs
    batch["ref_logps"] = jnp.asarray(ref, jnp.float32)
    dpo = cfg.dpo.model_copy(update={"loss_type": loss_type, "beta": 0.2})
    total, (pairs, sums, _) = dpo_objective(dpo, graphdef)(params, batch, None)
    expected = _reference_losses(seq[:, 0], seq[:, 1], ref[:, 0], ref[:, 1], 0.2, loss_type, 0.0)
    assert float(pairs) == P
    np.testing.assert_allclose(float(sums["loss"]), expected.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(sums["logps/chosen"]), seq[:, 0].sum(), rtol=1e-5)
    got, _ = pair_logps(graphdef, params, batch, average=loss_type == "ipo", train=False)
    np.testing.assert_allclose(np.asarray(got), seq, rtol=1e-5)
    assert (mask.sum(-1) > 0).all() and (mask.sum(-1) < (np.asarray(batch["segment_ids"]).reshape(2 * P, T) > 0).sum(-1)).all()


# ---------------------------------------------------------------------------------
# Records, masks, templates


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(Tokenizer.load(SP))


def _learned_text(encoder, arrays):
    ids = arrays["targets"][arrays["loss_mask"] == 1].tolist()
    return encoder.fast.decode(ids, skip_special_tokens=False)


def test_sft_learns_the_assistant_turns_and_eos_only(encoder):
    template = ChatTemplate(BUILTIN_TEMPLATES["chatml"], eos_token=encoder.eos_token)
    reader = Reader(encoder, template, 256)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What does len() return?"},
        {"role": "assistant", "content": "The number of items."},
        {"role": "user", "content": "And for a dict?"},
        {"role": "assistant", "content": "The number of keys."},
    ]
    out = reader.sft({"messages": messages})
    text = template.render(messages)
    assert encoder.fast.decode(np.concatenate([out["inputs"][:1], out["targets"]]).tolist(),
                               skip_special_tokens=False) == text + "</s>"
    learned = _learned_text(encoder, out)
    assert learned == "The number of items.<|im_end|>\nThe number of keys.<|im_end|>\n</s>", learned
    assert out["targets"][-1] == encoder.eos_id and out["loss_mask"][-1] == 1
    # No prompt token is learned: the first learned target follows the generation prompt.
    first = int(np.argmax(out["loss_mask"]))
    prompt = template.render(messages[:2], add_generation_prompt=True)
    assert encoder.fast.decode(out["inputs"][: first + 1].tolist(), skip_special_tokens=False) == prompt

    pc = reader.sft({"prompt": "Q: What does len() return?\nA:", "completion": " The number of items."})
    assert _learned_text(encoder, pc) == "The number of items.</s>"  # (decoding drops the first token's space)
    n_prompt = int(np.argmax(pc["loss_mask"]))
    assert encoder.fast.decode(pc["inputs"][: n_prompt + 1].tolist()) == "Q: What does len() return?\nA:"

    pref = reader.preference({"prompt": [messages[1]], "chosen": [messages[2]],
                              "rejected": [{"role": "assistant", "content": "No idea."}]})
    assert _learned_text(encoder, {"targets": pref["chosen_targets"], "loss_mask": pref["chosen_loss_mask"]}) == \
        "The number of items.<|im_end|>\n</s>"
    assert _learned_text(encoder, {"targets": pref["rejected_targets"], "loss_mask": pref["rejected_loss_mask"]}) == \
        "No idea.<|im_end|>\n</s>"


def test_builtin_templates_render_as_transformers_does(encoder):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=encoder.fast, eos_token="</s>", bos_token="<s>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"}]
    for name, source in BUILTIN_TEMPLATES.items():
        ours = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
        for gen in (False, True):
            theirs = hf.apply_chat_template(messages, chat_template=source, tokenize=False, add_generation_prompt=gen)
            assert ours.render(messages, add_generation_prompt=gen) == theirs, name


def test_templates_that_rewrite_earlier_turns_are_refused(encoder):
    # Shows only the last user message: a prefix of the conversation is not a prefix of the text.
    rewriting = ("{% for m in messages %}{% if m['role'] == 'assistant' or loop.last %}"
                 "{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
    reader = Reader(encoder, ChatTemplate(rewriting), 256)
    with pytest.raises(TemplateError, match="renders an earlier part"):
        reader.sft({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})


def test_bad_records_are_reported_with_file_and_line(tmp_path, encoder):
    from maxllm.posttrain import read_records

    good = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    lines = [
        json.dumps(good),
        json.dumps({"text": "no fields"}),
        json.dumps({"messages": [{"role": "user", "content": "Only a question?"}]}),
        "{not json",
        "",
        json.dumps({"prompt": "word " * 400, "completion": " answer"}),
        json.dumps({"prompt": "Q:", "completion": ""}),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"prompt": "Q:", "completion": " a long answer" * 100}),
        json.dumps(good),
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n")
    reader = Reader(encoder, ChatTemplate(BUILTIN_TEMPLATES["chatml"]), 128)
    with pytest.raises(DataError) as e:
        read_records(str(path), reader.sft, skip_bad=False)
    message = str(e.value)
    print("\n" + message)
    assert "7 of 9 records" in message
    for line, why in [(2, "no `messages`, nor `prompt` and `completion`"), (3, "the conversation has no assistant turn"),
                      (4, "not valid JSON"), (6, "the prompt alone is"), (7, "`completion` is empty"),
                      (8, "`messages[0]` must be"), (9, "tokens (prompt 2) do not fit data.seq_len=128")]:
        assert re.search(rf"{re.escape(str(path))}:{line}: [^\n]*{re.escape(why)}", message), (line, why)
    kept = read_records(str(path), reader.sft, skip_bad=True)
    assert len(kept) == 2 and [int(k["index"]) for k in kept] == [0, 1]

    pref = tmp_path / "dpo.jsonl"
    pref.write_text(json.dumps({"prompt": "Q:", "chosen": " yes"}) + "\n"
                    + json.dumps({"prompt": [good["messages"][0]], "chosen": " yes", "rejected": " no"}) + "\n")
    with pytest.raises(DataError) as e:
        read_records(str(pref), reader.preference, skip_bad=False)
    assert f"{pref}:1: missing `rejected`" in str(e.value)
    assert f"{pref}:2: `prompt` and `chosen` must both be strings or both message lists" in str(e.value)


def test_message_records_without_a_template_name_the_fix(tmp_path, capsys):
    """A tokenizer with no chat template: string records train, message records
    stop the run with the reason and the record's file:line."""
    from maxllm.train import main

    strings, messages = tmp_path / "pc.jsonl", tmp_path / "chat.jsonl"
    strings.write_text(json.dumps({"prompt": "Hi?", "completion": " Hello."}) + "\n")
    messages.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                                 {"role": "assistant", "content": "Hello."}]}) + "\n")
    common = ["--config", str(TINY), "train.objective=sft", "data.source=text", f"data.tokenizer={SP}",
              "model.vocab_size=4096", "train.steps=2", "checkpoint.enabled=false", "logging.tensorboard=false"]
    assert main([*common, f"run.output_dir={tmp_path / 'a'}", f"data.path={strings}"]) == 0
    assert not (tmp_path / "a" / "chat_template.jinja").exists()
    assert main([*common, f"run.output_dir={tmp_path / 'b'}", f"data.path={messages}"]) == 2
    err = capsys.readouterr().err
    assert f"{messages}:1: records with `messages` need a chat template" in err, err
    assert "set posttrain.chat_template to chatml, llama3, zephyr or a .jinja file" in err


# ---------------------------------------------------------------------------------
# Packing


def test_packed_examples_do_not_see_each_other(tiny, tmp_path):
    """Each example in a packed SFT row gives the logits it gives alone in a row."""
    from maxllm.posttrain.input import PosttrainInput
    from maxllm.posttrain.records import read_records

    records = [{"prompt": f"Question {i}: " + "how are tables made? " * (i % 3 + 1), "completion": f" Answer {i}."}
               for i in range(12)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg, model, _, _ = _tiny_model(lambda *o: tiny(*o, "train.objective=sft", "data.source=text",
                                                   f"data.path={path}", f"data.tokenizer={SP}", "data.seq_len=64",
                                                   "train.global_batch_size=4", "mesh.fsdp=1"))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    data = PosttrainInput(cfg, sharding, Tokenizer.load(SP), None)
    batch = {k: np.asarray(v) for k, v in data.next().items()}
    assert (batch["segment_ids"].max(axis=1) >= 2).any(), "expected rows holding several examples"
    logits = np.asarray(model(batch["inputs"], batch["positions"], batch["segment_ids"])[0])
    by_tokens = {tuple(e["inputs"].tolist()): e for e in read_records(str(path), Reader(
        TextEncoder(Tokenizer.load(SP)), None, 64).sft, skip_bad=False)}
    checked = 0
    for row in range(batch["inputs"].shape[0]):
        for seg in range(1, batch["segment_ids"][row].max() + 1):
            where = batch["segment_ids"][row] == seg
            tokens = batch["inputs"][row][where]
            example = by_tokens[tuple(tokens.tolist())]
            np.testing.assert_array_equal(batch["loss_mask"][row][where], example["loss_mask"])
            np.testing.assert_array_equal(batch["positions"][row][where], np.arange(len(tokens)))
            alone = np.asarray(model(tokens[None], np.arange(len(tokens))[None], np.ones((1, len(tokens)), np.int32))[0])
            np.testing.assert_allclose(logits[row][where], alone[0], atol=2e-5, rtol=1e-5)
            checked += 1
    assert checked >= 4


# ---------------------------------------------------------------------------------
# DPO runs


def _dpo(tmp_path, name, *overrides, devices=None):
    from maxllm.train import train

    cfg = load_config(TINY, [
        f"run.output_dir={tmp_path / name}", "train.objective=dpo", "data.source=text", f"data.path={PREFERENCES}",
        f"data.tokenizer={SP}", "model.vocab_size=4096", "data.seq_len=128", "posttrain.chat_template=chatml",
        "train.steps=4", "train.global_batch_size=8", "train.lr=1e-3", "train.warmup_steps=0",
        "checkpoint.enabled=true", "checkpoint.every_steps=2", "checkpoint.max_to_keep=null", "logging.every_steps=1", "logging.tensorboard=false", "model.remat=none",
        *overrides,
    ])
    return train(cfg, devices)


def _close(a: dict, b: dict, rtol: float, keys=("loss", "rewards/margins", "rewards/chosen", "logps/rejected")):
    """Equal to `rtol`, or to 1e-5 absolute: a reward is beta * (log p - log p_ref),
    a difference of two float32 sums of hundreds in log-probability, so summing in
    another order (sharded, accumulated, compiled otherwise) moves it by a few
    float32 steps of those sums times beta (~1e-6), however small the reward."""
    for step in a:
        for key in keys:
            assert math.isclose(a[step][key], b[step][key], rel_tol=rtol, abs_tol=1e-5), (step, key, a[step][key], b[step][key])


def test_dpo_precomputed_reference_equals_frozen_reference_and_both_resume(tmp_path):
    frozen = _dpo(tmp_path, "frozen")
    assert "ref_params" in frozen.state
    pre = _dpo(tmp_path, "pre", "dpo.precompute_ref=true")
    assert "ref_params" not in pre.state and (tmp_path / "pre" / "ref_logps.npy").is_file()
    print("\nstep  loss(frozen)  loss(precomputed)  margins(frozen)  margins(precomputed)")
    for step in sorted(frozen.history):
        f, p = frozen.history[step], pre.history[step]
        print(f"{step:4d}  {f['loss']:.6f}      {p['loss']:.6f}           {f['rewards/margins']:.6f}        {p['rewards/margins']:.6f}")
    _close(frozen.history, pre.history, 1e-5)
    assert frozen.history[1]["rewards/margins"] == 0.0 and frozen.history[1]["rewards/accuracies"] == 0.0  # policy = reference
    assert frozen.history[4]["rewards/margins"] > 0
    for name, whole, extra in (("frozen", frozen, ()), ("pre", pre, ("dpo.precompute_ref=true",))):
        out = tmp_path / f"{name}-resumed"
        shutil.copytree(tmp_path / name, out)
        shutil.rmtree(out / "checkpoints" / "4")  # as if the run had stopped after step 2
        resumed = _dpo(tmp_path, out.name, *extra)
        assert resumed.start_step == 2 and sorted(resumed.history) == [3, 4]
        for step in (3, 4):
            assert resumed.history[step]["loss"] == whole.history[step]["loss"], (name, step)
            assert resumed.history[step]["rewards/margins"] == whole.history[step]["rewards/margins"], (name, step)


def test_dpo_sharded_and_accumulated_equal_one_device(tmp_path):
    one = _dpo(tmp_path, "one", "train.steps=3", "checkpoint.enabled=false", devices=jax.devices()[:1])
    sharded = _dpo(tmp_path, "sharded", "train.steps=3", "checkpoint.enabled=false", "mesh.fsdp=4", "mesh.tensor=2",
                   "train.grad_accum_steps=2")
    for step in sorted(one.history):
        print(f"step {step}: loss one device {one.history[step]['loss']:.6f}, fsdp=4 x tensor=2 with 2 microbatches "
              f"{sharded.history[step]['loss']:.6f}")
    _close(one.history, sharded.history, 1e-5)


# ---------------------------------------------------------------------------------
# End to end: an HF model in, SFT, DPO, an HF model out


def _tiny_hf_model(folder):
    """A randomly initialized Llama saved by transformers, with the quickstart
    tokenizer and a ChatML template in its tokenizer_config.json."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from maxllm.hf.tokenizer_files import write_tokenizer

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
    hf.save_pretrained(folder)
    write_tokenizer(folder, SP, bos_id=1, eos_id=2, max_length=512, chat_template=BUILTIN_TEMPLATES["chatml"])
    return folder


def _answers_ending_with_eos(run, prompts, max_new):
    from maxllm.hf import load_pretrained
    from maxllm.sample import greedy_generate
    from flax import nnx
    from maxllm.models import build_model

    loaded = load_pretrained(run)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(loaded.config.model, 0)))
    outs = greedy_generate(graphdef, loaded.params, prompts, max_new, loaded.config.model.max_seq_len, eos_id=2)
    return sum(len(o) < max_new for o in outs), outs  # a row shorter than max_new stopped at EOS


def test_import_sft_dpo_export_end_to_end(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from maxllm.hf import export_run
    from maxllm.import_hf import import_hf
    from maxllm.train import train

    imported = import_hf(_tiny_hf_model(tmp_path / "hf"), tmp_path / "imported")

    def run(name, base, **sections):
        """Trains a config that inherits `base` (a run's config.yml), as a user writes one."""
        import yaml

        common = {"run": {"output_dir": str(tmp_path / name)},
                  "data": {"source": "text", "seq_len": 256, "eval_path": None},
                  "train": {"global_batch_size": 8, "warmup_steps": 10},
                  "model": {"remat": "none"}, "checkpoint": {"every_steps": 1000},
                  "logging": {"tensorboard": False, "every_steps": 25}}
        for key, value in sections.items():
            common[key] = {**common.get(key, {}), **value}
        path = tmp_path / f"{name}.yml"
        path.write_text(yaml.safe_dump({"base": str(base / "config.yml"), **common}))
        return train(load_config(path))

    # SFT on the team's chat set, with the template the imported tokenizer brings.
    sft = run("sft", imported, train={"objective": "sft", "init_from": str(imported), "steps": 200, "lr": 3e-3},
              data={"path": str(CHAT)})
    assert sft.losses[200] < 0.3 * sft.losses[25], sft.losses
    assert (tmp_path / "sft" / "chat_template.jinja").read_text() == BUILTIN_TEMPLATES["chatml"]
    encoder = TextEncoder(Tokenizer.load(SP))
    template = ChatTemplate(BUILTIN_TEMPLATES["chatml"], eos_token=encoder.eos_token)
    records = [json.loads(line) for line in CHAT.read_text().splitlines()]
    prompts = [encoder.fast.encode(template.render(r["messages"][:-1], add_generation_prompt=True),
                                   add_special_tokens=False).ids for r in records]
    before, _ = _answers_ending_with_eos(imported, prompts, 80)
    after, outs = _answers_ending_with_eos(tmp_path / "sft", prompts, 80)
    print(f"\nanswers that end with EOS within 80 tokens: {before}/{len(prompts)} before SFT, {after}/{len(prompts)} after")
    print("e.g.", repr(encoder.fast.decode(outs[0], skip_special_tokens=False)))
    assert before == 0 and after >= 0.9 * len(prompts)

    # DPO from the SFT run, scored on its own training pairs every 10 steps.
    dpo = run("dpo", tmp_path / "sft", train={"objective": "dpo", "init_from": str(tmp_path / "sft"), "steps": 40,
                                               "lr": 1e-3, "warmup_steps": 5},
              data={"path": str(PREFERENCES), "eval_path": str(PREFERENCES)}, eval={"every_steps": 10},
              logging={"every_steps": 10})
    evals = {s: m for s, m in sorted(dpo.history.items()) if "eval_rewards/accuracies" in m}
    for step, m in evals.items():
        print(f"DPO step {step}: rewards/accuracies {m['eval_rewards/accuracies']:.3f}, "
              f"rewards/margins {m['eval_rewards/margins']:.3f}, loss {m['eval_loss']:.4f}")
    margins = [m["eval_rewards/margins"] for m in evals.values()]
    assert sorted(evals) == [10, 20, 30, 40]
    assert evals[40]["eval_rewards/accuracies"] > 0.9
    assert all(b > a for a, b in zip(margins, margins[1:])) and margins[0] > 0, margins

    # Export: transformers loads the model and the tokenizer with the template.
    folder = export_run(tmp_path / "dpo", tmp_path / "export", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template(records[0]["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert list(ids) == prompts[0]
    ours = model_logits_for(tmp_path / "dpo", ids)
    with torch.no_grad():
        theirs = hf(torch.tensor([list(ids)])).logits.numpy()[0]
        generated = hf.generate(torch.tensor([list(ids)]), max_new_tokens=80, do_sample=False)[0, len(ids):].tolist()
    diff = float(np.abs(ours - theirs).max())
    print(f"exported: max |logit difference| vs transformers {diff:.2e}; transformers answers "
          f"{tok.decode(generated)!r}")
    assert diff < 1e-4
    assert generated[-1] == tok.eos_token_id and len(generated) < 80


def model_logits_for(run, ids):
    from conftest import model_logits
    from maxllm.hf import load_pretrained

    return model_logits(load_pretrained(run), np.asarray([list(ids)], np.int32))[0]


def test_packed_sft_resumes_exactly_and_a_changed_reference_setting_is_refused(tmp_path):
    from maxllm.config import ConfigError
    from maxllm.train import train

    sft = [f"data.path={CHAT}", "train.objective=sft", "posttrain.chat_template=chatml", "data.seq_len=256"]

    def run(name, *extra):
        return train(load_config(TINY, [
            f"run.output_dir={tmp_path / name}", "data.source=text", f"data.tokenizer={SP}", "model.vocab_size=4096",
            "train.steps=6", "train.global_batch_size=8", "checkpoint.enabled=true", "checkpoint.every_steps=3",
            "checkpoint.max_to_keep=null", "logging.tensorboard=false", *extra]))

    whole = run("whole", *sft)
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    resumed = run("resumed", *sft)
    assert resumed.start_step == 3 and sorted(resumed.losses) == [4, 5, 6]
    assert all(resumed.losses[s] == whole.losses[s] for s in (4, 5, 6)), (resumed.losses, whole.losses)

    dpo = [f"data.path={PREFERENCES}", "train.objective=dpo", "posttrain.chat_template=chatml", "data.seq_len=128"]
    run("dpo", *dpo, "train.steps=3")
    with pytest.raises(ConfigError, match="holds a frozen reference .ref_params., but this run has train.objective=dpo, "
                                          "dpo.precompute_ref=True"):
        run("dpo", *dpo, "dpo.precompute_ref=true")


def test_unreadable_files_and_refusing_templates_are_clear_errors(tmp_path, encoder):
    import gzip

    from maxllm.posttrain import read_records

    good = json.dumps({"prompt": "Q:", "completion": " yes"}) + "\n"
    path = tmp_path / "records.jsonl.gz"
    path.write_bytes(gzip.compress((good * 50).encode())[:-20])  # truncated
    reader = Reader(encoder, None, 64)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:\d+: cannot be read \((EOFError|BadGzipFile)"):
        read_records(str(path), reader.sft, skip_bad=False)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(good.encode() + '{"prompt": "caf\xe9", "completion": " x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{re.escape(str(latin))}:2: cannot be read \(UnicodeDecodeError"):
        read_records(str(latin), reader.sft, skip_bad=False)
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}"
                          + BUILTIN_TEMPLATES["chatml"])
    with pytest.raises(TemplateError, match="refuses this conversation: must start with user"):
        strict.render([{"role": "assistant", "content": "hi"}])
