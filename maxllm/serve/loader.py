"""From a path to a ready server: load (run directory or HF folder), cast or
quantize the weights, build the engine (compiled and warmed up) and the API."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from maxllm.serve.engine import Engine
from maxllm.serve.server import Server, ServerConfig

log = logging.getLogger(__name__)


def load_engine(path: str | Path, *, quantize: str | None = None, dtype: str = "bfloat16", slots: int = 8,
                max_total_tokens: int | None = None, warmup: bool = True, scan_layers: bool = False,
                max_prefill_tokens: int = 4096):
    """(engine, tokenizer, config, chat template) for the model at `path`.

    Layers run unrolled unless `scan_layers`: each layer then reads its weights
    and its cache buffers in place (a scanned stack slices, i.e. copies, them
    every token), at the price of a compile time that grows with depth."""
    from maxllm.data import open_tokenizer
    from maxllm.hf import load_pretrained
    from maxllm.models import build_model
    from maxllm.serve.quantize import quantize_params, weight_bytes

    overrides = ["model.remat=none", f"model.scan_layers={str(scan_layers).lower()}"]  # no gradients when serving
    loaded = load_pretrained(path, overrides)
    cfg = loaded.config
    tokenizer = open_tokenizer(cfg.data, cfg.model.vocab_size)
    if tokenizer is None:
        raise ValueError(f"{path}: no tokenizer (data.tokenizer, a tokens/ manifest, or tokenizer.json in the folder)")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16 if dtype == "bfloat16" else jnp.float32), loaded.params)
    if quantize == "int8":
        params = quantize_params(params)
    log.info("weights: %.1f MB (%s%s)", weight_bytes(params) / 1e6, dtype, ", int8 matrices" if quantize else "")
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg.model, 0)))
    max_len = min(cfg.model.max_seq_len, max_total_tokens or 2048)
    engine = Engine(graphdef, params, tokenizer, slots=slots, max_len=max_len, max_prefill_tokens=max_prefill_tokens)
    if warmup:
        engine.warmup()
    return engine, tokenizer, cfg, _chat_template(path, tokenizer.path)


def _chat_template(path: str | Path, tokenizer_path: str) -> str | None:
    """A fine-tuned run's own template (chat_template.jinja), else the tokenizer's."""
    from maxllm import storage
    from maxllm.posttrain.chat import TEMPLATE_FILE, tokenizer_template

    template_file = storage.join(str(path), TEMPLATE_FILE)  # local or gs://
    if storage.isfile(template_file):
        return storage.read_text(template_file)
    return tokenizer_template(tokenizer_path)


def build_server(path: str | Path, *, quantize: str | None = None, dtype: str = "bfloat16", slots: int = 8,
                 max_total_tokens: int | None = None, max_input_tokens: int | None = None,
                 max_concurrent_requests: int = 128, api_key: str | None = None,
                 model_name: str | None = None, warmup: bool = True, scan_layers: bool = False,
                 max_prefill_tokens: int = 4096) -> Server:
    engine, tokenizer, cfg, template = load_engine(path, quantize=quantize, dtype=dtype, slots=slots,
                                                   max_total_tokens=max_total_tokens, warmup=warmup,
                                                   scan_layers=scan_layers, max_prefill_tokens=max_prefill_tokens)
    server_cfg = ServerConfig(
        model_name=model_name or Path(path).resolve().name,
        max_input_tokens=min(max_input_tokens or engine.max_len - 1, engine.max_len - 1),
        max_total_tokens=engine.max_len,
        max_concurrent_requests=max_concurrent_requests,
        api_key=api_key,
        chat_template=template,
        dtype="int8" if quantize else dtype,
    )
    return Server(engine, tokenizer, server_cfg)
