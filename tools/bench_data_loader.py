"""Tokens per second the Grain input pipeline delivers to the device.

    python tools/bench_data_loader.py [--tokens data/quickstart/tokens/train]
        [--seq-len 2048] [--batch 64] [--batches 40] [--workers 0 1 2]

Reads data_pipelines shards through `maxllm.data.TrainInput` (shuffle, repeat,
chunk, pack, batch, prefetch, then `jax.make_array_from_process_local_data` and a
wait until the arrays are on the device), so the figure is what a training step
would be fed. For each packing mode and worker count it prints tokens/s (every
position of a batch counts, as the train step's throughput does), the share of
positions holding real tokens, and the ratio to the 1,000,000 tokens/s goal. The
first batches (pool start-up, first reads) are excluded.

A reference row times the same shards read and concatenated with plain numpy
(no shuffle, packing or prefetch), the floor any loader pays.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1_000_000


def _config(tokens: str, seq_len: int, batch: int, packing: str, workers: int):
    from maxllm.config import load_config

    return load_config(ROOT / "configs" / "base.yml", [
        "data.source=tokens", f"data.path={tokens}", f"data.seq_len={seq_len}", f"model.max_seq_len={seq_len}",
        f"data.packing={packing}", f"data.num_workers={workers}", f"train.global_batch_size={batch}",
        "model.vocab_size=65536",
    ])


def bench_train_input(tokens: str, seq_len: int, batch: int, packing: str, workers: int, batches: int, warmup: int):
    import jax
    import numpy as np

    from maxllm.data import TrainInput
    from maxllm.mesh import batch_sharding, make_mesh

    cfg = _config(tokens, seq_len, batch, packing, workers)
    mesh = make_mesh(cfg.mesh)
    sharding = batch_sharding(cfg.mesh.rules.activations, mesh, (batch, seq_len))
    data = TrainInput(cfg, sharding)
    real = 0
    for i in range(warmup + batches):
        if i == warmup:
            start, real = time.perf_counter(), 0
        out = data.next()
        jax.block_until_ready(out)
        real += int(np.asarray(out["loss_mask"]).sum())
    elapsed = time.perf_counter() - start
    if workers:
        data.iterator.close()
    return batches * batch * seq_len / elapsed, real / (batches * batch * seq_len)


def bench_numpy_floor(tokens: str, seq_len: int, batch: int, batches: int) -> float:
    """Sequential read + concatenate + reshape of the same records."""
    import numpy as np
    from array_record.python.array_record_module import ArrayRecordReader

    from maxllm.data.sources import Manifest

    manifest = Manifest.read(tokens)
    need = batches * batch * (seq_len + 1)
    start = time.perf_counter()
    got, parts = 0, []
    while got < need:
        for shard in manifest.shards:
            reader = ArrayRecordReader(str(shard))
            for record in reader.read_all():
                ids = np.frombuffer(record, "<u4")
                parts.append(ids)
                got += len(ids)
            reader.close()
            if got >= need:
                break
    flat = np.concatenate(parts)[:need].astype(np.int32).reshape(batches, batch, seq_len + 1)
    _ = flat[..., :-1].copy(), flat[..., 1:].copy()
    return batches * batch * seq_len / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default=str(ROOT / "data" / "quickstart" / "tokens" / "train"))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--packing", nargs="+", default=["first_fit", "concat_split"])
    args = parser.parse_args()

    import absl.flags

    absl.flags.FLAGS.mark_as_parsed()
    import jax

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
          f"on {jax.devices()[0].platform}; seq {args.seq_len} x batch {args.batch}, {args.batches} batches timed")
    print(f"{'loader':<34} {'tokens/s':>12} {'real tokens':>12} {'vs goal':>8}")
    floor = bench_numpy_floor(args.tokens, args.seq_len, args.batch, args.batches)
    print(f"{'numpy read+concat (floor)':<34} {floor:>12,.0f} {'100.0%':>12} {floor / GOAL:>7.2f}x")
    for packing in args.packing:
        for workers in args.workers:
            rate, real = bench_train_input(args.tokens, args.seq_len, args.batch, packing, workers,
                                           args.batches, args.warmup)
            name = f"TrainInput {packing}, workers={workers}"
            print(f"{name:<34} {rate:>12,.0f} {real:>11.1%} {rate / GOAL:>7.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
