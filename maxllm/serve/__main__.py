"""Serve a model over HTTP (OpenAI and TGI APIs).

    python -m maxllm.serve --model PATH [--quantize int8] [--port 8000] [--host 127.0.0.1]
        [--slots 8] [--max-total-tokens 2048] [--max-input-tokens N] [--max-concurrent-requests 128]
        [--dtype bfloat16|float32] [--api-key KEY] [--served-model-name NAME]
        [--max-batch-prefill-tokens 4096] [--scan-layers]

PATH is a maxllm run directory (newest checkpoint) or a Hugging Face folder.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maxllm.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run directory or Hugging Face folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--quantize", choices=["int8"], default=None, help="weight-only int8 at load time")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weight dtype in memory")
    parser.add_argument("--slots", type=int, default=8, help="decode slots (requests decoded together)")
    parser.add_argument("--max-total-tokens", type=int, default=None, help="prompt + generation (default: model max, at most 2048)")
    parser.add_argument("--max-input-tokens", type=int, default=None, help="longest prompt (default: max-total-tokens - 1)")
    parser.add_argument("--max-concurrent-requests", type=int, default=128, help="in flight at once; more get 429")
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    parser.add_argument("--served-model-name", default=None, help="the model name clients send (default: folder name)")
    parser.add_argument("--max-batch-prefill-tokens", type=int, default=4096,
                        help="most prompt tokens (padded) in one batched prefill")
    parser.add_argument("--scan-layers", action="store_true",
                        help="scan the layer stack: compiles faster for deep models, decodes slower")
    args = parser.parse_args(argv)
    if args.max_batch_prefill_tokens < 1:
        parser.error("--max-batch-prefill-tokens must be positive")

    import os
    from pathlib import Path

    import jax

    # Start-up compiles every prefill shape; keep the executables on disk so a
    # restart loads them (MaxText does the same with its jax_cache_dir).
    cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(Path.home() / ".cache" / "maxllm" / "jax")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    from maxllm.cli import log_to_stderr
    from maxllm.serve.loader import build_server

    log_to_stderr("maxllm")
    import uvicorn

    try:
        server = build_server(args.model, quantize=args.quantize, dtype=args.dtype, slots=args.slots,
                              max_total_tokens=args.max_total_tokens, max_input_tokens=args.max_input_tokens,
                              max_concurrent_requests=args.max_concurrent_requests, api_key=args.api_key,
                              model_name=args.served_model_name, scan_layers=args.scan_layers,
                              max_prefill_tokens=args.max_batch_prefill_tokens)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from maxllm.serve.server import create_app

    server.engine.start()
    try:
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    finally:
        server.engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
