"""Two JAX processes (4 CPU devices each) run one job: the same command on both,
each reading only its own rows, checkpoints written together; the losses equal a
single-device run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from maxllm.train import train

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out, port, *extra):
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(rank),
        }
        cmd = [sys.executable, "-m", "maxllm.train", "--config", str(TINY), f"run.output_dir={out}",
               "mesh.fsdp=4", "mesh.data=2", "checkpoint.enabled=true", *extra]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs):
    errs = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        errs.append(err)
    return errs


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]


def test_two_processes_equal_one_device(tiny, tmp_path):
    expected = train(tiny(f"run.output_dir={tmp_path / 'single'}"), devices=jax.devices()[:1]).losses

    out = tmp_path / "multi"
    _wait(_launch(out, _free_port(), "checkpoint.every_steps=5"))
    rows = _rows(out)
    assert [r["step"] for r in rows] == sorted(expected)  # written once, by process 0
    for row in rows:
        assert row["loss"] == pytest.approx(expected[row["step"]], rel=1e-5)
    assert (out / "checkpoints" / "5").is_dir()


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    slow = ["checkpoint.every_steps=1000", "logging.every_steps=1", "model.d_model=256",
            "model.mlp_dim=512", "data.seq_len=128", "train.global_batch_size=16"]
    procs = _launch(out, _free_port(), "train.steps=1000", *slow)
    deadline = time.monotonic() + 240
    while not ((out / "metrics.jsonl").exists() and len(_rows(out)) >= 5):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)  # polling for progress; no result depends on this delay
    procs[1].send_signal(signal.SIGTERM)  # one host preempted
    errs = _wait(procs)
    stopped = {int(e.split("stopped by SIGTERM after step ")[1].split(";")[0]) for e in errs}
    assert len(stopped) == 1, errs  # both processes stopped after the same step
    step = stopped.pop()
    assert 5 <= step < 1000 and (out / "checkpoints" / str(step)).is_dir()

    errs = _wait(_launch(out, _free_port(), f"train.steps={step + 2}", *slow))
    assert all(f"resumed from checkpoint step {step}" in e for e in errs)
