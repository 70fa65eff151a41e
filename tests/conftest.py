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
