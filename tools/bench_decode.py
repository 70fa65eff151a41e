"""Decode speed: maxllm's serving engine vs transformers' `generate`, same model.

    python tools/bench_decode.py [--preset quickstart|smollm-135m] [--run RUN_DIR]
        [--prompt-len 32] [--new-tokens 64] [--batches 1 16]
    python tools/bench_decode.py --contexts 128 4096 --preset quickstart-mamba quickstart

The second form (maxllm only) measures one decode step's speed after a prefill of
each context length, per preset: a Mamba's step reads a fixed-size state, a
transformer's reads a KV cache that grows with the context.

Exports one model (a random one of the preset's shape, or --run) to a Hugging
Face folder in float32, then in this one process measures, for each batch size:
generated tokens per second (greedy, no EOS stop, every row generating
--new-tokens) and the time to first token (one request, a --prompt-len prompt),
for maxllm's engine (jitted prefill + one decode step for all slots; slots = the
batch size) and for transformers + PyTorch on this CPU (`generate`, KV cache,
`torch.set_num_threads` = the cores). Prints the ratios. Both run float32 (PyTorch
has no fast bfloat16 matmul on this CPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    "quickstart": [str(ROOT / "configs" / "quickstart.yml")],
    "quickstart-mamba": [str(ROOT / "configs" / "quickstart-mamba.yml")],
    "quickstart-moe": [str(ROOT / "configs" / "quickstart-moe.yml")],
    "smollm-135m": [str(ROOT / "configs" / "base.yml"), str(ROOT / "configs" / "models" / "smollm-135m.yml")],
}


def export_random(preset: str, out: Path) -> Path:
    import jax
    from flax import nnx

    from maxllm.config import load_config
    from maxllm.hf import ExportInfo, export_params
    from maxllm.models import build_model

    tokenizer = ROOT / "data" / "quickstart" / "tokenizer.model"
    cfg = load_config(PRESETS[preset], ["model.max_seq_len=512", f"data.tokenizer={tokenizer}"])
    params = nnx.to_pure_dict(nnx.state(build_model(cfg.model, 0)))
    flat = {tuple(str(k.key) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    from maxllm.data import open_tokenizer

    tok = open_tokenizer(cfg.data, cfg.model.vocab_size)
    return export_params(ExportInfo(cfg), lambda path: flat[path], out, dtype="float32",
                         tokenizer_path=tok.path, bos_id=tok.bos_id, eos_id=tok.eos_id)


def bench_maxllm(hf: Path, batch: int, prompt_len: int, new: int) -> tuple[float, float]:
    from maxllm.serve.engine import SamplingParams
    from maxllm.serve.loader import load_engine

    engine, *_ = load_engine(hf, dtype="float32", slots=batch, max_total_tokens=prompt_len + new + 16, warmup=True)
    engine.start()
    prompt = [5 + (i % 50) for i in range(prompt_len)]
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    engine.generate(prompt, params)  # warm: every path compiled and run once
    ttft = min(engine.generate(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True)).time_to_first_token
               for _ in range(3))
    done = threading.Barrier(batch + 1)
    results = []

    def one(i):
        results.append(engine.generate([*prompt[:-1], 5 + i], params))
        done.wait()

    start = time.perf_counter()
    for i in range(batch):
        threading.Thread(target=one, args=(i,), daemon=True).start()
    done.wait()
    elapsed = time.perf_counter() - start
    engine.stop()
    assert all(len(r.tokens) == new for r in results)
    return batch * new / elapsed, ttft


def bench_transformers(hf: Path, batch: int, prompt_len: int, new: int) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = torch.tensor([[5 + (i % 50) for i in range(prompt_len)]] * batch)
    ids[:, -1] = torch.arange(batch) + 5
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm
        ttft = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            model.generate(ids[:1], max_new_tokens=1, min_new_tokens=1, **{**kwargs, "attention_mask": torch.ones_like(ids[:1])})
            ttft = min(ttft, time.perf_counter() - t)
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
        elapsed = time.perf_counter() - t
    assert out.shape[1] == prompt_len + new
    return batch * new / elapsed, ttft


def bench_context(preset: str, context: int, batch: int, steps: int) -> float:
    """Decode tokens/s (batch rows x steps) after a `context`-token prefill: a
    random model of the preset, float32, greedy steps jitted with the cache donated."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from maxllm.config import load_config
    from maxllm.models import build_model

    cfg = load_config(PRESETS[preset], ["model.dtype=float32", f"model.max_seq_len={context + steps + 1}"])
    model = build_model(cfg.model, 0)
    graphdef, params = nnx.split(model)

    @jax.jit
    def prefill(params, tokens, cache):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits, cache, _ = nnx.merge(graphdef, params)(tokens, positions, cache=cache)
        return jnp.argmax(logits[:, -1:], -1), cache

    def step(params, token, cache):
        logits, cache, _ = nnx.merge(graphdef, params)(token, cache["index"][:, None], cache=cache)
        return jnp.argmax(logits, -1), cache

    step = jax.jit(step, donate_argnums=2)
    tokens = jax.random.randint(jax.random.key(0), (batch, context), 0, cfg.model.vocab_size)
    token, cache = prefill(params, tokens, model.init_cache(batch, context + steps + 1))
    token, cache = step(params, token, cache)  # compile
    jax.block_until_ready(token)
    t0 = time.perf_counter()
    for _ in range(steps):
        token, cache = step(params, token, cache)
    jax.block_until_ready(token)
    return batch * steps / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=["quickstart"], nargs="+", choices=sorted(PRESETS))
    parser.add_argument("--contexts", type=int, nargs="+", help="decode speed after prefills of these lengths")
    parser.add_argument("--run", default=None, help="export this run directory instead of a random model")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()

    import jax

    if args.contexts:
        print(f"# decode step after a prefill; {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}; "
              f"float32; {args.new_tokens} steps")
        print(f"{'preset':<18} {'batch':>5} " + " ".join(f"{'ctx ' + str(c) + ' tok/s':>16}" for c in args.contexts))
        for preset in args.preset:
            for batch in args.batches:
                rates = [bench_context(preset, c, batch, args.new_tokens) for c in args.contexts]
                print(f"{preset:<18} {batch:>5} " + " ".join(f"{r:>16,.1f}" for r in rates), flush=True)
        return 0
    args.preset = args.preset[0]
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        if args.run:
            from maxllm.hf import export_run

            export_run(args.run, hf, dtype="float32")
        else:
            export_random(args.preset, hf)
        name = args.run or args.preset
        print(f"# {name}; {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}; float32; "
              f"prompt {args.prompt_len}, {args.new_tokens} new tokens per row")
        print(f"{'batch':>5} {'maxllm tok/s':>13} {'transformers tok/s':>19} {'ratio':>6} "
              f"{'maxllm TTFT ms':>15} {'transformers TTFT ms':>21}")
        for batch in args.batches:
            ours, our_ttft = bench_maxllm(hf, batch, args.prompt_len, args.new_tokens)
            theirs, their_ttft = bench_transformers(hf, batch, args.prompt_len, args.new_tokens)
            print(f"{batch:>5} {ours:>13,.1f} {theirs:>19,.1f} {ours / theirs:>6.2f} "
                  f"{our_ttft * 1e3:>15.1f} {their_ttft * 1e3:>21.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
