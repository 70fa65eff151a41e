"""Test setup: 8 CPU devices and a persistent compilation cache, both set before
JAX is imported anywhere."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tests' programs are tiny, so compiling them costs more than running them:
# LLVM's optimization passes are skipped (about 40% less time on tests/test_sharding.py
# and test_model.py with a cold compilation cache). Subprocesses inherit the flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8 {FAST_COMPILE}"
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
def gcs(tmp_path_factory):
    """A GCS emulator on localhost; yields a gs:// bucket URL. Set for this process
    and its children: gcsfs (and google-cloud-storage) reach it through
    STORAGE_EMULATOR_HOST, tensorstore (Orbax's checkpoints) through
    TENSORSTORE_GCS_HTTP_URL with a dummy token; local copies of gs:// data go to a
    temporary MAXLLM_CACHE_DIR."""
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # no gRPC bucket probing (read at import)
    pytest.importorskip("gcsfs")
    from gcp_storage_emulator.server import create_server

    _serve_generations()
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="maxllm-test")
    server.start()
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = f"http://127.0.0.1:{port}"
    os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"
    os.environ["MAXLLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("maxllm-cache"))
    yield "gs://maxllm-test"
    server.stop()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_generations() -> None:
    """What tensorstore's reads need and gcp_storage_emulator's downloads leave out,
    as GCS does it: an x-goog-generation header, 304 for ifGenerationNotMatch the
    current generation, 412 for an ifGenerationMatch that fails (0: only if absent).
    Without them Orbax's checkpoint writes fail at random with "Malformed
    StorageGeneration"."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    download = objects.download
    if getattr(download, "serves_generations", False):
        return

    def with_generations(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            obj = None
        generation = obj["generation"] if obj else "0"
        match, not_match = (request.query.get(k, [None])[0] for k in ("ifGenerationMatch", "ifGenerationNotMatch"))
        if match is not None and match != generation:
            response.status = HTTPStatus.PRECONDITION_FAILED
        elif obj and not_match == generation:
            response.status = HTTPStatus.NOT_MODIFIED
        else:
            download(request, response, storage, *args, **kwargs)
            if obj:
                response["x-goog-generation"] = generation
                response["x-goog-metageneration"] = obj["metageneration"]

    with_generations.serves_generations = True
    objects.download = with_generations  # objects.get calls it for ?alt=media
    for _, handlers in server.HANDLERS:
        if handlers.get("GET") is download:
            handlers["GET"] = with_generations


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


def model_logits(pretrained, tokens):
    """Our float32 logits (B, T, V) for `tokens` from a `maxllm.hf.Pretrained`."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from maxllm.models import build_model

    model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: build_model(pretrained.config.model, 0))), pretrained.params)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    logits, _, _ = model(jnp.asarray(tokens), jnp.asarray(positions))
    return np.asarray(logits)


def exported_vs_transformers(run: Path, out: Path, prompt: list[int], new_tokens: int = 20):
    """Exports run directory `run` to `out` (float32) and loads it with transformers.
    Returns (transformers model, loading info, max |logit difference| on random
    tokens, our greedy continuation of `prompt`, transformers' greedy continuation)."""
    import numpy as np
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from maxllm.hf import export_run, load_pretrained
    from maxllm.models import build_model
    from maxllm.sample import greedy_generate

    folder = export_run(run, out, dtype="float32")
    hf, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    hf.eval()
    ours = load_pretrained(run)
    tokens = np.random.default_rng(5).integers(0, ours.config.model.vocab_size, (2, 24)).astype(np.int32)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens).long()).logits.numpy()
    diff = float(np.abs(model_logits(ours, tokens) - theirs).max())
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(ours.config.model, 0)))
    mine = greedy_generate(graphdef, ours.params, [prompt], new_tokens, ours.config.model.max_seq_len)[0]
    with torch.no_grad():
        gen = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return hf, info, diff, mine, gen[0, len(prompt):].tolist()


def check_export(run: Path, out: Path, prompt: list[int], hf_class: str, label: str) -> None:
    """The export of `run` loads in transformers as `hf_class` with every tensor
    used, its logits within 1e-4 of ours, and the same (non-trivial) greedy text."""
    hf, info, diff, mine, theirs = exported_vs_transformers(run, out, prompt)
    assert type(hf).__name__ == hf_class
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    print(f"\n{label} exported: max |logit difference| vs transformers {diff:.2e}")
    assert diff <= 1e-4, diff
    assert theirs == mine
    assert len(set(mine)) > 3, mine


def quickstart_prompts(*texts: str) -> list[list[int]]:
    """`texts` encoded with the quickstart tokenizer."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(QUICKSTART / "tokenizer.model"))
    return [sp.encode(t) for t in texts]
