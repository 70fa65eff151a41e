"""gs:// for run directories, checkpoints, data and exports, against a GCS emulator
on localhost (the `gcs` fixture): a run on gs:// that is killed resumes to the
uninterrupted run's losses, an unfinished gs:// checkpoint is skipped, a gs:// run
exports (to disk and to gs://) and loads in transformers, tokens and text read from
gs:// train as the same files on disk, and bad URLs are errors that name them."""

import json
import os
import signal
import struct
import subprocess
import time
import uuid

import jax
import numpy as np
import pytest

from maxllm.hf.convert import run_config
from maxllm.train import train

from conftest import QUICKSTART, ROOT, check_export, quickstart_prompts
from test_checkpoint import _command, _finish

pytestmark = pytest.mark.slow

STEPS = 30  # checkpoints every 10 (test_checkpoint.RUN); each step ~0.1 s
WIDE = ["model.init_std=0.2"]  # large: the exported model's greedy tokens vary (test_hf)


def _fs():
    import fsspec

    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()  # another process wrote the bucket
    return fs


def _bucket_losses(url: str) -> dict[int, float]:
    """Loss by step from the run's metrics.jsonl on gs://, which must hold each step once."""
    rows = [json.loads(line) for line in _fs().cat(f"{url}/metrics.jsonl").decode().splitlines()]
    steps = [row["step"] for row in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {row["step"]: row["loss"] for row in rows}


def _complete_checkpoints(url: str) -> list[int]:
    """Steps whose checkpoint is finalized on gs:// (Orbax writes commit_success.txt last)."""
    found = _fs().glob(f"{url}/checkpoints/*/commit_success.txt")
    return sorted(int(path.split("/")[-2]) for path in found)


@pytest.fixture(scope="module")
def killed_run(gcs, tmp_path_factory):
    """A run with run.output_dir on gs:// killed (SIGKILL) once a checkpoint is
    complete in the bucket, then run again to the end; and the same run on disk,
    uninterrupted. Returns (URL, the uninterrupted losses, the rerun's stderr)."""
    whole = tmp_path_factory.mktemp("whole")
    _finish(_command(whole, STEPS, *WIDE))
    expected = {row["step"]: row["loss"] for row in map(json.loads, (whole / "metrics.jsonl").read_text().splitlines())}

    url = f"{gcs}/killed-{uuid.uuid4().hex[:8]}"
    log = tmp_path_factory.mktemp("logs") / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_command(url, STEPS, *WIDE), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not _complete_checkpoints(url):
        assert proc.poll() is None, f"run ended before its first checkpoint: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "no complete checkpoint within 240 s"
        time.sleep(0.05)  # polling for progress; no result depends on this delay
    assert proc.poll() is None and max(_complete_checkpoints(url)) < STEPS, "the run finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    rerun = _finish(_command(url, STEPS, *WIDE))
    return url, expected, rerun.stderr


def test_killed_gcs_run_resumes_to_the_uninterrupted_losses(killed_run):
    url, expected, stderr = killed_run
    resumed = [line for line in stderr.splitlines() if "resumed from checkpoint step" in line]
    assert resumed, stderr[-2000:]
    assert f"in {url}/checkpoints" in resumed[0]
    step = int(resumed[0].split("resumed from checkpoint step ")[1].split()[0])
    assert 10 <= step < STEPS
    got = _bucket_losses(url)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert {s: got[s] for s in range(step + 1, STEPS + 1)} == {s: expected[s] for s in range(step + 1, STEPS + 1)}
    assert run_config(url).run.output_dir == url  # config.yml, read back from the bucket
    assert _complete_checkpoints(url)[-1] == STEPS


def test_gcs_run_exports_to_disk_and_to_gcs(killed_run, tmp_path, capsys):
    pytest.importorskip("torch")
    from maxllm.export import main as export_main
    from maxllm.hf import load_pretrained

    url, _, _ = killed_run
    prompt = quickstart_prompts("To create a table in PostgreSQL, use")[0]
    check_export(url, tmp_path / "hf", prompt, "LlamaForCausalLM", "gs:// run")  # reads the run from gs://

    assert export_main(["--run", url, "--out", f"{url}/hf", "--dtype", "float32"]) == 0
    fs = _fs()
    local = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    remote = {path.rsplit("/", 1)[-1]: fs.cat(path) for path in fs.find(f"{url}/hf")}
    assert remote.keys() == local.keys() and "model.safetensors" in local
    assert remote == local
    run, folder = load_pretrained(url), load_pretrained(f"{url}/hf")  # a run and an HF folder, both on gs://
    assert jax.tree.all(jax.tree.map(np.array_equal, run.params, folder.params))
    assert export_main(["--run", url, "--out", f"{url}/hf"]) == 2  # exists: needs --overwrite
    assert export_main(["--run", url, "--out", "gs://no-such-bucket/hf"]) == 2
    assert "gs://no-such-bucket/hf: bucket gs://no-such-bucket does not exist" in capsys.readouterr().err


def test_unfinished_gcs_checkpoint_is_skipped_and_metrics_keep_each_step_once(gcs, tiny, caplog):
    import logging

    url = f"{gcs}/unfinished-{uuid.uuid4().hex[:8]}"
    common = [f"run.output_dir={url}", "checkpoint.enabled=true", "checkpoint.every_steps=2",
              "checkpoint.async_save=false", "checkpoint.max_to_keep=2", "logging.tensorboard=true"]
    first = train(tiny(*common, "train.steps=6"))
    assert _complete_checkpoints(url) == [4, 6]  # max_to_keep on gs:// too
    _fs().rm(f"{url}/checkpoints/6/commit_success.txt")  # a save cut short: not finalized
    with caplog.at_level(logging.INFO):
        result = train(tiny(*common, "train.steps=7"))
    assert "skipping unfinished checkpoint" in caplog.text
    assert result.start_step == 4
    assert _complete_checkpoints(url) == [6, 7]  # step 6 saved again, complete
    got = _bucket_losses(url)
    assert sorted(got) == list(range(1, 8))
    assert {s: got[s] for s in range(1, 5)} == {s: first.losses[s] for s in range(1, 5)}
    assert {s: got[s] for s in range(5, 8)} == result.losses
    first_events, resumed_events = sorted(_fs().glob(f"{url}/tensorboard/events.out.tfevents.*"))
    assert _scalars(_fs().cat(first_events), "loss") == {s: np.float32(v) for s, v in first.losses.items()}
    assert _scalars(_fs().cat(resumed_events), "loss") == {s: np.float32(v) for s, v in result.losses.items()}


def _scalars(data: bytes, tag: str) -> dict[int, float]:
    """Step -> value of `tag` in a TensorBoard event file (TFRecord framing: length,
    its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    out, i = {}, 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        event = Event.FromString(data[i + 12 : i + 12 + n])
        out.update({event.step: v.simple_value for v in event.summary.value if v.tag == tag})
        i += 12 + n + 4
    return out


def test_tokens_and_text_on_gcs_train_as_the_same_files_on_disk(gcs, tiny, tmp_path):
    fs = _fs()
    url = f"{gcs}/data-{uuid.uuid4().hex[:8]}"
    fs.put(str(QUICKSTART / "tokens" / "valid") + "/", f"{url}/tokens", recursive=True)
    fs.put_file(str(QUICKSTART / "valid.jsonl.gz"), f"{url}/text/valid.jsonl.gz")
    fs.put_file(str(QUICKSTART / "tokenizer.model"), f"{url}/tokenizer.model")
    common = ["model.vocab_size=4096", "train.steps=4"]
    tokens = [f"data.path={QUICKSTART / 'tokens' / 'valid'}", "data.source=tokens"]
    text = [f"data.path={QUICKSTART / 'valid.jsonl.gz'}", f"data.tokenizer={QUICKSTART / 'tokenizer.model'}",
            "data.source=text"]

    def losses(data: list[str], name: str) -> dict[int, float]:
        return train(tiny(*common, *data, f"run.output_dir={tmp_path / name}")).losses

    assert losses([f"data.path={url}/tokens", "data.source=tokens"], "tokens-gcs") == losses(tokens, "tokens")
    assert losses([f"data.path={url}/text/*.jsonl.gz", f"data.tokenizer={url}/tokenizer.model", "data.source=text"],
                  "text-gcs") == losses(text, "text")


def test_local_copy_fetches_once_and_again_when_a_file_changes(gcs, caplog):
    import logging

    from maxllm import storage

    fs = _fs()
    url = f"{gcs}/mirror-{uuid.uuid4().hex[:8]}"
    fs.pipe({f"{url}/a.txt": b"one", f"{url}/sub/b.txt": b"two"})
    with caplog.at_level(logging.INFO, logger="maxllm.storage"):
        local = storage.local_copy(url)
        assert (local / "a.txt").read_bytes() == b"one" and (local / "sub" / "b.txt").read_bytes() == b"two"
        assert storage.local_copy(url) == local
        assert caplog.text.count("copied") == 1  # the second call found every file current
        fs.pipe(f"{url}/a.txt", b"ONE")  # the same size: only the modification time tells
        os.utime(local / "a.txt", (0, 0))  # stands for "the object is newer than the copy", without waiting
        storage.local_copy(url)
    assert (local / "a.txt").read_bytes() == b"ONE"
    assert caplog.text.count("copied") == 2


def test_object_log_rewrites_at_most_every_few_seconds_and_on_close(gcs, caplog):
    import logging

    from maxllm import storage

    url = f"{gcs}/log-{uuid.uuid4().hex[:8]}.jsonl"
    log = storage.ObjectLog(url, "a\n")
    log.write("b\n")
    log.flush()
    log.write("c\n")
    log.flush()  # within SYNC_SECONDS of the last upload: kept for later
    assert _fs().cat(url) == b"a\nb\n"
    log.close()
    assert _fs().cat(url) == b"a\nb\nc\n"

    broken = storage.ObjectLog("gs://no-such-bucket/metrics.jsonl", "a\n")
    with caplog.at_level(logging.WARNING, logger="maxllm.storage"):
        broken.flush()  # the run goes on
    assert "gs://no-such-bucket/metrics.jsonl: upload failed, retried at the next flush" in caplog.text
    with pytest.raises(FileNotFoundError):
        broken.close()


def test_bad_gcs_urls_are_errors_that_name_them(gcs, tiny, tmp_path):
    from maxllm.data import DataError
    from maxllm.export import main as export_main
    from maxllm.storage import StorageError

    with pytest.raises(StorageError, match="gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist"):
        train(tiny("run.output_dir=gs://no-such-bucket/run"))
    with pytest.raises(StorageError, match="gs://no-such-bucket/ckpt: bucket gs://no-such-bucket does not exist"):
        train(tiny(f"run.output_dir={tmp_path}", "checkpoint.enabled=true", "checkpoint.dir=gs://no-such-bucket/ckpt"))
    with pytest.raises(StorageError, match="gs://no-such-bucket/tokens: bucket gs://no-such-bucket does not exist"):
        train(tiny(f"run.output_dir={tmp_path}", "data.source=tokens", "data.path=gs://no-such-bucket/tokens"))
    with pytest.raises(DataError, match=f"{gcs}/no-tokens: no tokens folder here"):
        train(tiny(f"run.output_dir={tmp_path}", "data.source=tokens", f"data.path={gcs}/no-tokens"))
    assert export_main(["--run", f"{gcs}/no-run", "--out", f"{gcs}/no-run-hf"]) == 2
