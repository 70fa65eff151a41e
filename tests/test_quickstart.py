"""The quickstart's path, shortened: real text through the sentencepiece source,
the loss falls, and greedy continuations come back as text."""

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
