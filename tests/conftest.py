"""Test setup: 8 CPU devices and a persistent compilation cache, both set before
JAX is imported anywhere."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

from maxllm.config import Config, load_config  # noqa: E402

TINY = ROOT / "tests" / "configs" / "tiny.yml"


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, "tests expect 8 CPU devices (XLA_FLAGS set too late?)"


@pytest.fixture(scope="session")
def gcs():
    """A GCS emulator on localhost; yields a gs:// bucket URL. gcsfs reaches it
    through STORAGE_EMULATOR_HOST (set for this process and its children)."""
    import socket

    pytest.importorskip("gcsfs")
    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="maxllm-test")
    server.start()
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # no gRPC bucket probing
    yield "gs://maxllm-test"
    server.stop()


@pytest.fixture
def tiny():
    """Factory: the tiny test config with `section.key=value` overrides."""

    def make(*overrides: str) -> Config:
        return load_config(TINY, list(overrides))

    return make


QUICKSTART = ROOT / "data" / "quickstart"


def prepare_tokens(out: Path, texts: list[str], shards: int = 2) -> Path:
    """Runs data_pipelines (tokenize with the quickstart tokenizer, in-process) over
    `texts`; returns the tokens/ folder it writes."""
    import gzip
    import json

    from data_pipelines.config import load_pipeline_config
    from data_pipelines.pipeline import run

    out.mkdir(parents=True, exist_ok=True)
    source = out / "input.jsonl.gz"
    with gzip.open(source, "wt") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": str(i), "text": text}) + "\n")
    cfg = load_pipeline_config(
        ROOT / "configs" / "data" / "quickstart.yml",
        [f"input.paths=[{source}]", f"output_dir={out}", "executor.workers=1",
         f"steps=[{{type: train_tokenizer, model: {QUICKSTART / 'tokenizer.model'}}}, {{type: tokenize, shards: {shards}}}]"],
    )
    run(cfg)
    return out / "tokens"


def train_on_quickstart(out: Path, *overrides: str):
    """Trains the tiny config on the quickstart valid shards into run directory
    `out` (overrides after the defaults); returns train()'s result."""
    from maxllm.train import train

    return train(load_config(TINY, [
        f"run.output_dir={out}", "data.source=tokens", f"data.path={QUICKSTART / 'tokens' / 'valid'}",
        "model.vocab_size=4096", "checkpoint.enabled=true", *overrides,
    ]))


def resume_input(cfg: Config, sharding, ckpt_dir: Path, before: int, after: int):
    """Reads `before` batches from a TrainInput, saves its state in a checkpoint,
    reads `after` more; restores a new TrainInput from the checkpoint and reads
    `after` from it. Returns (resumed input, uninterrupted batches, resumed batches)."""
    import jax.numpy as jnp
    import numpy as np

    from maxllm.checkpoint import Checkpointer
    from maxllm.data import TrainInput

    def read(data, n):
        return [{k: np.asarray(v) for k, v in data.next().items()} for _ in range(n)]

    whole = TrainInput(cfg, sharding)
    read(whole, before)
    ckpt = Checkpointer(str(ckpt_dir), cfg.checkpoint, cfg.to_dict(), TrainInput.handlers())
    ckpt.save(before, {"step": jnp.int32(before)}, extra=whole.save_args())
    ckpt.wait()
    expected = read(whole, after)
    resumed = TrainInput(cfg, sharding)
    resumed.restore(before, lambda name, args: ckpt.read_item(before, name, args))
    got = read(resumed, after)
    ckpt.close()
    return resumed, expected, got
