"""Resume equals uninterrupted (after kill -9: the model state and the data
iterator), SIGTERM saves and exits 0, and an unfinished checkpoint is skipped with a
warning."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from maxllm.train import train

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow

# A tiny model made slow enough (~0.1 s a step) that a signal lands mid-run, on the
# Grain path (data_pipelines shards), so a resume restores the data iterator too.
RUN = [
    "data.source=tokens",
    f"data.path={ROOT / 'data' / 'quickstart' / 'tokens' / 'valid'}",
    "model.vocab_size=4096",
    "checkpoint.enabled=true",
    "checkpoint.every_steps=10",
    "logging.every_steps=1",
    "model.d_model=256",
    "model.mlp_dim=512",
    "data.seq_len=128",
    "train.global_batch_size=16",
]


def _command(out, steps, *extra):
    return [sys.executable, "-m", "maxllm.train", "--config", str(TINY),
            f"run.output_dir={out}", f"train.steps={steps}", *RUN, *extra]


def _losses(out):
    """Loss by step from metrics.jsonl, which must hold each step once."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    steps = [row["step"] for row in lines]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {row["step"]: row["loss"] for row in lines}


def _start(out, steps):
    return subprocess.Popen(_command(out, steps), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, out, step, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = _losses(out)
        if done and max(done) >= step:
            return max(done)
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)  # polling for progress; no result depends on this delay
    raise AssertionError(f"no step {step} within {timeout}s")


def _finish(cmd, timeout=300):
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_kill_9_then_rerun_reproduces_the_uninterrupted_losses(tmp_path):
    steps = 60
    _finish(_command(tmp_path / "whole", steps))
    expected = _losses(tmp_path / "whole")
    assert sorted(expected) == list(range(1, steps + 1))

    out = tmp_path / "killed"
    proc = _start(out, steps)
    killed_at = _wait_for_step(proc, out, 14)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_at < steps, "the run finished before the kill; make steps slower"

    rerun = _finish(_command(out, steps))
    resumed = [line for line in rerun.stderr.splitlines() if "resumed from checkpoint step" in line]
    assert resumed, rerun.stderr[-2000:]
    resumed_step = int(resumed[0].split("resumed from checkpoint step ")[1].split()[0])
    assert 10 <= resumed_step <= killed_at
    got = _losses(out)
    for step in range(resumed_step + 1, steps + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), f"step {step}"


def test_sigterm_saves_a_usable_checkpoint_and_exits_0(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, 500)
    _wait_for_step(proc, out, 5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM after step" in stderr
    stopped = int(stderr.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 5 <= stopped < 500
    assert (out / "checkpoints" / str(stopped)).is_dir()

    rerun = _finish(_command(out, stopped + 2))
    assert f"resumed from checkpoint step {stopped}" in rerun.stderr
    assert max(_losses(out)) == stopped + 2


def test_unfinished_checkpoint_is_skipped_with_a_warning(tiny, tmp_path, caplog):
    common = [f"run.output_dir={tmp_path}", "checkpoint.enabled=true", "checkpoint.every_steps=2",
              "checkpoint.async_save=false", "checkpoint.max_to_keep=2"]
    train(tiny(*common, "train.steps=6"))
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["4", "6"]  # max_to_keep
    # Make step 6 look like a save cut short: Orbax's temporary name, a part missing.
    unfinished = ckpts / "6.orbax-checkpoint-tmp"
    os.rename(ckpts / "6", unfinished)
    shutil.rmtree(next(p for p in unfinished.iterdir() if p.is_dir()))
    with caplog.at_level(logging.INFO):
        result = train(tiny(*common, "train.steps=7"))
    assert "skipping unfinished checkpoint" in caplog.text
    assert result.start_step == 4
    assert sorted(result.losses) == [5, 6, 7]
    assert not unfinished.exists()


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(damage, tiny, tmp_path, caplog):
    """The newest step is complete (finalized) but one of its array files is cut in
    half or overwritten with garbage: the run says so, sets the step aside as
    `6.corrupt` (nothing deleted), resumes from step 4 and computes steps 5 and 6
    again with the losses they had."""
    common = [f"run.output_dir={tmp_path}", "checkpoint.enabled=true", "checkpoint.every_steps=2",
              "checkpoint.async_save=false", "checkpoint.max_to_keep=3", "train.schedule=constant"]
    first = train(tiny(*common, "train.steps=6"))
    ckpts = tmp_path / "checkpoints"
    files = [f for f in (ckpts / "6" / "state").rglob("*") if f.is_file()]
    victim = max(files, key=lambda f: f.stat().st_size)  # the array data, not metadata
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(len(data)))
    with caplog.at_level(logging.WARNING):
        result = train(tiny(*common, "train.steps=8"))
    print(f"\n{damage}: {caplog.records[-1].getMessage() if caplog.records else ''}")
    assert f"checkpoint {ckpts}/6 cannot be read" in caplog.text and "resuming from the previous checkpoint" in caplog.text
    assert result.start_step == 4
    assert (ckpts / "6.corrupt").is_dir() and (ckpts / "6.corrupt" / "state").exists()
    for step in (5, 6):
        assert result.losses[step] == first.losses[step]
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["4", "6", "8"]


def test_resuming_with_another_model_is_a_clear_error(tiny, tmp_path):
    from maxllm.checkpoint import CheckpointMismatch

    common = [f"run.output_dir={tmp_path}", "checkpoint.enabled=true", "checkpoint.async_save=false", "train.steps=2"]
    train(tiny(*common))
    with pytest.raises(CheckpointMismatch, match=r"embed/table: saved \(512, 64\), config \(512, 128\);.*; resume with the config"):
        train(tiny(*common, "model.d_model=128", "train.steps=3"))


def _can_mount_tmpfs() -> bool:
    """A user and mount namespace (`unshare -rm`) lets the test mount a tmpfs of a
    chosen size without touching the host's mounts."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_a_disk_that_fills_during_a_checkpoint_write(async_save, tiny, tmp_path):
    """The run directory is a real filesystem (tmpfs) with room for one checkpoint
    and a half: the save of step 4 runs out of space (ENOSPC from the kernel). The
    run stops with an error naming the step, the cause and the intact step 2, and
    deletes step 4's partial files; with more room, the same command resumes from
    step 2 and computes steps 3-6 as the uninterrupted run did."""
    if not _can_mount_tmpfs():
        pytest.skip("cannot mount a size-limited tmpfs here (unshare -rm is not permitted)")
    common = ["checkpoint.enabled=true", "checkpoint.every_steps=2", f"checkpoint.async_save={async_save}",
              "checkpoint.max_to_keep=3", "train.steps=6"]
    whole = train(tiny(f"run.output_dir={tmp_path / 'whole'}", *common))
    step_bytes = sum(f.stat().st_size for f in (tmp_path / "whole" / "checkpoints" / "2").rglob("*") if f.is_file())

    run, logs = tmp_path / "run", tmp_path / "logs"
    run.mkdir()
    logs.mkdir()
    command = " ".join([sys.executable, "-m", "maxllm.train", "--config", str(TINY), f"run.output_dir={run}", *common])
    script = f"""
        mount -t tmpfs -o size={int(1.6 * step_bytes)} tmpfs {run}
        {command} > {logs}/full.log 2>&1; echo $? > {logs}/full.rc
        ls {run}/checkpoints > {logs}/after_full.txt
        mount -o remount,size=64m {run}
        {command} > {logs}/resumed.log 2>&1; echo $? > {logs}/resumed.rc
        ls {run}/checkpoints > {logs}/after_resume.txt
        cp {run}/metrics.jsonl {logs}/
    """
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, timeout=600)

    full = (logs / "full.log").read_text()
    # Orbax's writer threads may print tracebacks into the same stream meanwhile,
    # so the error line is searched for, not expected at a line start.
    error = re.search(r"error: writing checkpoint .*", full)
    print(f"\nasync_save={async_save}: {error.group() if error else full[-2000:]}")
    assert (logs / "full.rc").read_text().strip() == "2", full[-3000:]
    assert error and error.group().startswith(f"error: writing checkpoint {run}/checkpoints/4 failed")
    assert "No space left on device" in error.group() and "The disk is full" in error.group()
    assert "checkpoint step 2 is intact" in error.group()
    # Step 4 was never finalized (its partial files are deleted; a tensorstore write
    # still in flight may recreate some, which the next start removes).
    assert [name for name in (logs / "after_full.txt").read_text().split() if name.isdigit()] == ["2"]

    resumed = (logs / "resumed.log").read_text()
    assert (logs / "resumed.rc").read_text().strip() == "0", resumed[-3000:]
    assert "resumed from checkpoint step 2" in resumed
    assert (logs / "after_resume.txt").read_text().split() == ["2", "4", "6"]
    losses = {}
    for line in (logs / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    for step in range(3, 7):
        assert losses[step] == pytest.approx(whole.losses[step], rel=1e-6), step


# ---------------------------------------------------------------------------------
# Non-finite steps


def test_a_non_finite_step_is_skipped_and_training_goes_on(tiny):
    """A batch whose loss is NaN (a NaN in its loss mask) leaves the state as it
    was, is counted, and the next batch updates as usual."""
    import jax
    import numpy as np

    from maxllm import train as train_lib
    from maxllm.mesh import make_mesh

    cfg = tiny("mesh.fsdp=8")
    mesh = make_mesh(cfg.mesh)
    sharding = train_lib.input_layout(cfg, mesh)
    with train_lib.step_context(cfg, mesh):
        spec = train_lib.train_state_spec(cfg, mesh)
        step = train_lib.make_train_step(cfg, spec.graphdef, spec.tx, spec.shardings,
                                         dict.fromkeys(train_lib.BATCH_KEYS, sharding))
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, cfg.model.vocab_size, (8, 33))
        host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": np.tile(np.arange(32), (8, 1)),
                "segment_ids": np.ones((8, 32)), "loss_mask": np.ones((8, 32))}
        good = {k: jax.device_put(v.astype(np.float32 if k == "loss_mask" else np.int32), sharding)
                for k, v in host.items()}
        poisoned = dict(good, loss_mask=jax.device_put(np.where(np.eye(8, 32), np.nan, 1.0).astype(np.float32),
                                                       sharding))
        state = spec.init()
        before = jax.device_get(state["params"])
        state, bad = step(state, poisoned)
        assert float(bad["skipped"]) == 1.0 and not np.isfinite(float(bad["loss"]))
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), before)
        state, ok = step(state, good)
        assert float(ok["skipped"]) == 0.0 and np.isfinite(float(ok["loss"]))
        changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), jax.device_get(state["params"]), before)
        assert all(jax.tree.leaves(changed))


def test_max_bad_steps_in_a_row_stop_the_run_naming_the_step(tiny, tmp_path):
    """A learning rate of 1e30 blows the weights up after the first update: every
    later loss is NaN, each step is skipped, and the third in a row stops the run
    with exit code 2. The checkpoints written hold finite values only."""
    import jax
    import numpy as np

    from maxllm.hf import load_params

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "maxllm.train", "--config", str(TINY), f"run.output_dir={out}",
           "train.lr=1e30", "train.warmup_steps=0", "train.clip_grad_norm=null", "train.steps=20",
           "train.max_bad_steps=3", "checkpoint.enabled=true", "checkpoint.every_steps=2", "mesh.fsdp=8"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    print("\n" + message)
    assert message.startswith("error: step ") and "NaN or Inf for 3 steps in a row" in message
    stopped = int(message.split("error: step ")[1].split(":")[0])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in rows if r.get("skipped")]
    assert skipped == list(range(stopped - 2, stopped + 1))
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= stopped - 2  # checkpoints were written during the bad steps too
    params = load_params(out, tiny().model)  # the newest checkpoint
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))


def test_resuming_with_another_optimizer_structure_is_a_mismatch_not_damage(tiny, tmp_path):
    """Turning clipping off changes the optimizer state's leaves: a clear config
    error, and the checkpoint is not set aside as damaged."""
    from maxllm.checkpoint import CheckpointMismatch

    common = [f"run.output_dir={tmp_path}", "checkpoint.enabled=true", "checkpoint.async_save=false"]
    train(tiny(*common, "train.steps=2"))
    with pytest.raises(CheckpointMismatch, match="other leaves than this config's"):
        train(tiny(*common, "train.steps=3", "train.clip_grad_norm=null"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]
