"""The dry run: compiles a config's step on the mesh without running it, reads no
data, writes nothing, and reports what XLA says one step needs per device."""

import pytest

from maxllm.config import load_config
from maxllm.metrics import param_count
from maxllm.plan import plan
from maxllm.train import main

from conftest import ROOT, TINY

DRY_RUN_8B = ROOT / "configs" / "dry-run-8b.yml"  # the README's example


def test_dry_run_of_llama_8b_on_eight_devices(tmp_path, capsys):
    overrides = [f"run.output_dir={tmp_path / 'never'}"]
    cfg = load_config(DRY_RUN_8B, overrides)
    assert (cfg.mesh.fsdp, cfg.data.seq_len, cfg.train.global_batch_size) == (8, 2048, 8)
    p = plan(cfg)
    n = param_count(cfg.model)
    assert p.params == n and p.devices == 8
    # fsdp=8 shards every matrix, each device holding 1/8 of it, in params and two Adam
    # moments (fp32); the RMSNorm scales (2 per layer and a final one) are replicated.
    norms = (2 * 32 + 1) * 4096
    assert p.state_bytes == pytest.approx(3 * 4 * ((n - norms) / 8 + norms), rel=1e-6)
    assert p.argument_bytes >= p.state_bytes and p.temp_bytes > 0
    assert p.peak_bytes == p.argument_bytes + p.temp_bytes + p.output_bytes
    matmul = n - 128256 * 4096 - norms  # every parameter but the embedding table and the norms
    assert p.flops_per_step == pytest.approx(8 * 2048 * (6 * matmul + 6 * 32 * 2048 * 32 * 128), rel=1e-9)
    half = plan(load_config(DRY_RUN_8B, [*overrides, "mesh.fsdp=4", "mesh.data=2"]))
    assert half.state_bytes == pytest.approx(3 * 4 * ((n - norms) / 4 + norms), rel=1e-6)  # over 4, not 8
    with capsys.disabled():
        print(f"\nLlama-3.1-8B, fsdp=8: state {p.state_bytes / 1e9:.2f} GB, temporaries {p.temp_bytes / 1e9:.2f} GB, "
              f"peak {p.peak_bytes / 1e9:.2f} GB per device; fsdp=4 x data=2: state {half.state_bytes / 1e9:.2f} GB, "
              f"peak {half.peak_bytes / 1e9:.2f} GB")

    assert main(["--config", str(DRY_RUN_8B), "--dry-run", *overrides]) == 0
    out = capsys.readouterr().out
    assert "dry run: llama, 8.03B parameters, 8 devices" in out and "peak" in out
    assert not (tmp_path / "never").exists()  # nothing written


def test_dry_run_of_dpo_counts_the_frozen_reference(tmp_path):
    """DPO's step compiles from the config alone (no records read); a frozen
    reference adds one copy of the parameters to the state."""
    dpo = ["train.objective=dpo", "data.source=text", f"data.path={tmp_path / 'none.jsonl'}",
           f"data.tokenizer={tmp_path / 'none.model'}"]
    frozen = plan(load_config(TINY, dpo))
    pre = plan(load_config(TINY, [*dpo, "dpo.precompute_ref=true"]))
    sft = plan(load_config(TINY, ["train.objective=pretrain"]))
    assert pre.state_bytes == sft.state_bytes
    # params + 2 Adam moments, sharded alike; the frozen reference is a fourth copy
    assert frozen.state_bytes == pytest.approx(pre.state_bytes * 4 / 3, rel=1e-3)
    assert frozen.tokens_per_step == 2 * sft.tokens_per_step
