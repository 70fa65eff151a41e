"""Two or four JAX processes (8 CPU devices in all) run one job: the same command
on each, each reading only its own rows and its own part of the data, checkpoints
written together; the losses equal a single-device run, and a checkpoint resumes
on another mesh and another number of processes."""

import collections
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from maxllm.data import DataError
from maxllm.train import train

from conftest import FAST_COMPILE, QUICKSTART, ROOT, TINY, free_port

pytestmark = pytest.mark.slow


def _launch(out, port, *extra, processes=2):
    """`processes` processes with 8 devices in all, mesh fsdp=4 x data=2 unless
    `extra` overrides it."""
    procs = []
    for rank in range(processes):
        env = {
            **os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes} {FAST_COMPILE}",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": str(processes),
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
    _wait(_launch(out, free_port(), "checkpoint.every_steps=5"))
    rows = _rows(out)
    assert [r["step"] for r in rows] == sorted(expected)  # written once, by process 0
    for row in rows:
        assert row["loss"] == pytest.approx(expected[row["step"]], rel=1e-5)
    assert (out / "checkpoints" / "5").is_dir()


def test_four_processes_equal_one_device(tiny, tmp_path):
    expected = train(tiny(f"run.output_dir={tmp_path / 'single'}"), devices=jax.devices()[:1]).losses

    out = tmp_path / "multi"
    errs = _wait(_launch(out, free_port(), "checkpoint.every_steps=5", "mesh.fsdp=4", "mesh.data=1",
                         "mesh.tensor=2", processes=4))
    assert all(f"jax.distributed: process {i} of 4" in e for i, e in enumerate(errs))
    rows = _rows(out)
    print("\n4 processes:", [round(r["loss"], 6) for r in rows], "one device:", [round(expected[s], 6) for s in sorted(expected)])
    assert [r["step"] for r in rows] == sorted(expected)
    for row in rows:
        assert row["loss"] == pytest.approx(expected[row["step"]], rel=1e-5)
    assert (out / "checkpoints" / "5").is_dir()


def test_two_processes_evaluate_tasks_during_training_like_one(tmp_path):
    """eval.tasks with two processes: the batch of examples is sharded across them,
    so each gathers the scores; the logged metrics equal evaluating the checkpoint
    in this one process."""
    from maxllm.eval import LanguageModel, evaluate

    docs = tmp_path / "docs.txt"
    docs.write_text(gzip.open(QUICKSTART / "valid.jsonl.gz", "rt").readline()[:2000])
    tasks = ["docs_mc", "docs_qa", str(docs)]
    out = tmp_path / "multi"
    _wait(_launch(out, free_port(), "data.source=tokens", f"data.path={QUICKSTART / 'tokens' / 'valid'}",
                  "model.vocab_size=4096", "train.steps=2", "eval.every_steps=2", f"eval.tasks={json.dumps(tasks)}",
                  "eval.limit=8", "eval.num_fewshot=1", "eval.batch_size=4"))
    row = _rows(out)[-1]
    expected = evaluate(LanguageModel.load(out, batch_size=4), tasks, num_fewshot=1, limit=8)
    print(f"\ntwo processes: {row['eval/docs_mc/acc']} {row['eval/docs_mc/acc_norm']} "
          f"{row['eval/docs_qa/exact_match']}; one: {expected['docs_mc']}")
    assert row["eval/docs_mc/acc"] == expected["docs_mc"]["acc"]
    assert row["eval/docs_mc/acc_norm"] == expected["docs_mc"]["acc_norm"]
    assert row["eval/docs_qa/exact_match"] == expected["docs_qa"]["exact_match"]
    assert row["eval/docs/bits_per_byte"] == pytest.approx(expected["docs"]["bits_per_byte"], rel=1e-5)


def test_checkpoint_of_two_processes_resumes_on_four_with_another_mesh(tiny, tmp_path):
    """Written by 2 processes on fsdp=4 x tensor=2, resumed by 4 processes on
    fsdp=8: every parameter and moment is resharded on restore, and steps 6-10
    equal the uninterrupted single-device run."""
    constant = "train.schedule=constant"
    expected = train(tiny(f"run.output_dir={tmp_path / 'single'}", "train.steps=10", constant),
                     devices=jax.devices()[:1]).losses
    out = tmp_path / "run"
    _wait(_launch(out, free_port(), "train.steps=5", constant, "mesh.fsdp=4", "mesh.data=1", "mesh.tensor=2"))
    errs = _wait(_launch(out, free_port(), "train.steps=10", constant, "mesh.fsdp=8", "mesh.data=1",
                         processes=4))
    assert all("resumed from checkpoint step 5" in e for e in errs)
    rows = {r["step"]: r["loss"] for r in _rows(out)}
    print("\nresumed on 4 processes, fsdp=8:", [round(rows[s], 6) for s in range(6, 11)],
          "uninterrupted:", [round(expected[s], 6) for s in range(6, 11)])
    for step in range(1, 11):
        assert rows[step] == pytest.approx(expected[step], rel=1e-5), step


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    slow = ["checkpoint.every_steps=1000", "logging.every_steps=1", "model.d_model=256",
            "model.mlp_dim=512", "data.seq_len=128", "train.global_batch_size=16"]
    procs = _launch(out, free_port(), "train.steps=1000", *slow)
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

    errs = _wait(_launch(out, free_port(), f"train.steps={step + 2}", *slow))
    assert all(f"resumed from checkpoint step {step}" in e for e in errs)


def test_two_processes_read_disjoint_parts_whose_union_is_the_epoch(tmp_path):
    from test_data import VALID, _docs, _pieces

    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, str(ROOT / "tests" / "two_process_data.py"), str(port), str(rank),
                          str(tmp_path / f"{rank}.json")], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    _wait(procs)
    parts = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert [p["layout"] for p in parts] == [{"rows": 4, "shard_index": i, "shard_count": 2} for i in range(2)]
    assert all(p["global_shape"] == [8, 32] for p in parts)
    assert [p["local_rows"] for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # its own rows
    counts = [collections.Counter((tuple(i), tuple(t)) for i, t in p["segments"]) for p in parts]
    epoch = collections.Counter(piece for doc in _docs(VALID) for piece in _pieces(doc, 32))
    assert not (counts[0] & counts[1])
    assert counts[0] + counts[1] == epoch


def test_resuming_with_another_process_count(tiny, tmp_path):
    """Synthetic data resumes on one process from a two-process checkpoint (every
    row is a function of the step); a Grain iterator saved by two processes stops
    a one-process resume with a clear error."""
    constant = "train.schedule=constant"  # the same learning rates whatever train.steps
    expected = train(tiny(f"run.output_dir={tmp_path / 'single'}", "train.steps=12", constant),
                     devices=jax.devices()[:1]).losses
    out = tmp_path / "synthetic"
    _wait(_launch(out, free_port(), "checkpoint.every_steps=5", "train.steps=10", constant))
    resumed = train(tiny(f"run.output_dir={out}", "train.steps=12", "checkpoint.enabled=true", constant),
                    devices=jax.devices()[:1])
    assert resumed.start_step == 10
    for step in (11, 12):
        assert resumed.losses[step] == pytest.approx(expected[step], rel=1e-5)

    from test_data import VALID

    grain_run = ["data.source=tokens", f"data.path={VALID}", "model.vocab_size=4096"]
    out = tmp_path / "tokens"
    _wait(_launch(out, free_port(), "checkpoint.every_steps=5", "train.steps=5", *grain_run))
    with pytest.raises(DataError, match=r"saved with \{'process_count': 2.*this run has \{'process_count': 1"):
        train(tiny(f"run.output_dir={out}", "train.steps=7", "checkpoint.enabled=true", *grain_run))


def test_two_process_dpo_equals_one_device(tiny, tmp_path):
    """DPO with precomputed reference log-probs over two processes: each process
    reads every other pair, the reference pass runs on the sharded model, and the
    losses and metrics equal a single-device run (a step's pairs are the same set)."""
    dpo = ["train.objective=dpo", "data.source=text", f"data.path={ROOT / 'data' / 'posttrain' / 'preferences.jsonl'}",
           f"data.tokenizer={ROOT / 'data' / 'quickstart' / 'tokenizer.model'}", "model.vocab_size=4096",
           "data.seq_len=128", "posttrain.chat_template=chatml", "dpo.precompute_ref=true", "train.steps=4",
           "train.global_batch_size=8", "train.lr=1e-3", "logging.every_steps=1", "logging.tensorboard=false"]
    single = train(tiny(f"run.output_dir={tmp_path / 'single'}", *dpo), devices=jax.devices()[:1]).history

    out = tmp_path / "multi"
    _wait(_launch(out, free_port(), "checkpoint.every_steps=1000", *dpo))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert row[key] == pytest.approx(single[row["step"]][key], rel=1e-5, abs=1e-6), (row["step"], key)
    print("\n2-process DPO losses:", [round(r["loss"], 6) for r in rows],
          "single device:", [round(single[s]["loss"], 6) for s in (1, 2, 3, 4)])
