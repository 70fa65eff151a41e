"""Two JAX processes (4 CPU devices each) run one job: the same command on both,
each reading only its own rows, checkpoints written together; the losses equal a
single-device run."""

import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from maxllm.train import train

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_device(tiny, tmp_path):
    expected = train(tiny(f"run.output_dir={tmp_path / 'single'}"), devices=jax.devices()[:1]).losses

    out = tmp_path / "multi"
    port = _free_port()
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
               "mesh.fsdp=4", "mesh.data=2", "checkpoint.enabled=true", "checkpoint.every_steps=5"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == sorted(expected)  # written once, by process 0
    for row in rows:
        assert row["loss"] == pytest.approx(expected[row["step"]], rel=1e-5)
    assert (out / "checkpoints" / "5").is_dir()
