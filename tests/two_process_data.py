"""One of two JAX processes reading the training data (run by test_multiprocess.py):

    python tests/two_process_data.py PORT PROCESS_ID OUT_JSON

Each process reads one epoch of its own part of data/quickstart/tokens/valid, as
TrainInput lays it out on a data=2 x fsdp=4 mesh over both processes, and writes
the packed segments it read, plus its layout and the first global batch's shape."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402


def main(port: str, process_id: str, out: str) -> None:
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id))
    from pathlib import Path

    import numpy as np

    from maxllm.config import load_config
    from maxllm.data import TrainInput
    from maxllm.data import pipeline as pl
    from maxllm.data.sources import Manifest, token_shards
    from maxllm.mesh import batch_sharding, make_mesh

    root = Path(__file__).resolve().parents[1]  # (not conftest: it would add 8 devices)
    valid = root / "data" / "quickstart" / "tokens" / "valid"
    cfg = load_config(root / "tests" / "configs" / "tiny.yml", ["data.source=tokens", f"data.path={valid}", "model.vocab_size=4096",
                             "mesh.data=2", "mesh.fsdp=4"])
    mesh = make_mesh(cfg.mesh)
    shape = (cfg.train.global_batch_size, cfg.data.seq_len)
    data = TrainInput(cfg, batch_sharding(cfg.mesh.rules.activations, mesh, shape))
    batch = data.next()  # a global array built from both processes' rows
    local_rows = sorted({s.index[0].start or 0 for s in batch["inputs"].addressable_shards})

    stream = pl.document_stream([token_shards(Manifest.read(valid))], None, layout=data.layout,
                                seed=cfg.train.seed, shuffle=True, num_epochs=1)
    segments = []
    for packed in pl.packed_batches(stream, seq_len=cfg.data.seq_len, rows=data.layout.rows, seed=cfg.train.seed,
                                    packing="first_fit", packing_bins=None, shuffle=True, drop_remainder=False,
                                    num_workers=0):
        b = pl.to_model_batch(packed)
        for r in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][r]
            for s in np.unique(seg[seg != 0]):
                where = seg == s
                segments.append([b["inputs"][r][where].tolist(), b["targets"][r][where].tolist()])
    with open(out, "w") as f:
        json.dump({"layout": data.layout.to_json(), "global_shape": list(batch["inputs"].shape),
                   "local_rows": local_rows, "segments": segments}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
