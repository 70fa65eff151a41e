"""The quickstart's path, shortened: prepared token shards through the Grain
pipeline, the loss falls, the held-out split is evaluated, and greedy continuations
come back as text."""

import math

import pytest

from maxllm.config import load_config
from maxllm.train import train

from conftest import ROOT


@pytest.mark.slow
def test_quickstart_learns_and_samples(tmp_path):
    cfg = load_config(
        ROOT / "configs" / "quickstart.yml",
        [f"run.output_dir={tmp_path}", "train.steps=40", "train.warmup_steps=5",
         "checkpoint.every_steps=20", "logging.every_steps=10", "sample.max_new_tokens=8"],
    )
    result = train(cfg)
    first, last = result.losses[1], result.losses[40]
    assert first > 8.0  # about log(4096): the model starts knowing nothing
    assert last < first - 1.5, result.losses
    assert len(result.samples) == len(cfg.sample.prompts)
    assert all(isinstance(s, str) and s.strip() for s in result.samples)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["20", "40"]
    # The held-out split, read once at the end: about as hard as the training text.
    final = result.history[40]
    assert final["eval_tokens"] == 55_451 - 54  # every valid document's targets, once
    assert abs(final["eval_loss"] - last) < 1.0 and final["eval_perplexity"] == pytest.approx(math.exp(final["eval_loss"]))
    # The sample tasks the config evaluates, logged with it.
    assert 0 <= final["eval/docs_mc/acc"] <= 1 and 0 <= final["eval/docs_qa/exact_match"] <= 1


@pytest.mark.slow
def test_fine_tuning_configs_run_from_the_quickstart(tmp_path):
    """configs/sft/chat.yml then configs/sft/dpo.yml, shortened, each starting from
    the run before it."""
    base = load_config(ROOT / "configs" / "quickstart.yml",
                       [f"run.output_dir={tmp_path / 'base'}", "train.steps=2", "eval.tasks=[]", "data.eval_path=null",
                        "sample.prompts=[]", "logging.tensorboard=false"])
    train(base)
    short = ["checkpoint.every_steps=3", "eval.every_steps=3", "logging.tensorboard=false", "sample.max_new_tokens=4"]
    sft = train(load_config(ROOT / "configs" / "sft" / "chat.yml", [
        f"run.output_dir={tmp_path / 'sft'}", f"train.init_from={tmp_path / 'base'}", "train.steps=3", *short]))
    assert sft.history[3]["eval_tokens"] > 0 and math.isfinite(sft.history[3]["eval_loss"])
    assert len(sft.samples) == 1
    dpo = train(load_config(ROOT / "configs" / "sft" / "dpo.yml", [
        f"run.output_dir={tmp_path / 'dpo'}", f"train.init_from={tmp_path / 'sft'}", "train.steps=3", *short]))
    assert dpo.history[1]["rewards/margins"] == 0.0  # the policy starts as its reference
    assert 0 <= dpo.history[3]["eval_rewards/accuracies"] <= 1
    assert (tmp_path / "dpo" / "chat_template.jinja").read_text() == (tmp_path / "sft" / "chat_template.jinja").read_text()
