"""DPO step speed and memory: the frozen reference model against reference
log-probs precomputed once (`dpo.precompute_ref`), same model, data and batch.

    python tools/bench_dpo.py [--preset quickstart|smollm-135m] [--steps 20]
        [--pairs 8] [--seq-len 256] [--out bench_results/dpo.json]

Each variant runs in its own process (so that peak memory is its own) on the
team's preference set (data/posttrain/preferences.jsonl, ChatML, the quickstart
tokenizer), from a random model of the preset's shape, on one device. Reported:

  steps/s        warm steps (the first, which compiles, excluded)
  step memory    what XLA's memory analysis of the compiled step says it needs:
                 arguments (the train state, with the reference's copy of the
                 weights when frozen, and the batch) plus temporaries
  state          the train state's bytes (params, Adam moments, frozen reference)
  peak RSS       the process's peak resident memory (everything: Python, XLA, data)
  reference pass the once-per-run pass over all pairs (precomputed only)

Prints a table with the ratios precomputed/frozen and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"quickstart": ROOT / "configs" / "quickstart.yml", "smollm-135m": ROOT / "configs" / "models" / "smollm-135m.yml"}


def config(preset: str, precompute: bool, steps: int, pairs: int, seq_len: int, out: str):
    from maxllm.config import load_config

    files = [ROOT / "configs" / "base.yml", PRESETS[preset]]
    return load_config([str(f) for f in files], [
        f"run.output_dir={out}", "train.objective=dpo", "data.source=text",
        f"data.path={ROOT / 'data' / 'posttrain' / 'preferences.jsonl'}", "data.eval_path=null",
        f"data.tokenizer={ROOT / 'data' / 'quickstart' / 'tokenizer.model'}", f"data.seq_len={seq_len}",
        "posttrain.chat_template=chatml", f"dpo.precompute_ref={str(precompute).lower()}",
        f"train.steps={steps}", f"train.global_batch_size={pairs}", "train.warmup_steps=0", "train.init_from=null",
        "checkpoint.enabled=false", f"logging.every_steps={steps}", "logging.tensorboard=false",
        "eval.tasks=[]", "sample.prompts=[]", "model.dtype=float32", "mesh.fsdp=1",
    ])


def child(args) -> dict:
    """One variant, in this process: compile the step for its memory analysis, then train."""
    import jax

    from maxllm import train as train_lib
    from maxllm.mesh import activation_rules, batch_sharding, make_mesh

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args.preset, args.precompute, args.steps, args.pairs, args.seq_len, tmp)
        reference_seconds = []

        class Catch(logging.Handler):
            def emit(self, record):
                if "reference log-probs" in record.getMessage():
                    reference_seconds.append(float(record.args[1]))

        logging.getLogger("maxllm.posttrain").addHandler(Catch())
        logging.getLogger("maxllm.posttrain").setLevel(logging.INFO)
        mesh = make_mesh(cfg.mesh, jax.devices()[:1])
        sharding = batch_sharding(cfg.mesh.rules.activations, mesh, (cfg.train.global_batch_size, cfg.data.seq_len))
        with jax.set_mesh(mesh), activation_rules(cfg.mesh.rules.activations, mesh):
            spec = train_lib.train_state_spec(cfg, mesh)
            data = train_lib._train_input(cfg, sharding)
            shardings = train_lib._batch_shardings(data)
            step = train_lib.make_train_step(cfg, spec.graphdef, spec.tx, spec.shardings, shardings)
            B, T = cfg.train.global_batch_size, cfg.data.seq_len
            batch = {k: jax.ShapeDtypeStruct((B, 2, T), "float32" if k == "loss_mask" else "int32", sharding=s)
                     for k, s in shardings.items() if k != "ref_logps"}
            if "ref_logps" in shardings:
                batch["ref_logps"] = jax.ShapeDtypeStruct((B, 2), "float32", sharding=shardings["ref_logps"])
            stats = step.lower(spec.abstract, batch).compile().memory_analysis()
        state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(spec.abstract))
        start = time.perf_counter()
        result = train_lib.train(cfg, jax.devices()[:1])
        wall = time.perf_counter() - start
        last = json.loads((Path(tmp) / "metrics.jsonl").read_text().splitlines()[-1])
    tokens_per_sec = last["tokens_per_sec"]  # over steps 2..N
    return {
        "steps_per_sec": tokens_per_sec / (2 * B * T),
        "step_memory_bytes": stats.argument_size_in_bytes + stats.temp_size_in_bytes,
        "argument_bytes": stats.argument_size_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
        "state_bytes": state_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "reference_pass_seconds": reference_seconds[0] if reference_seconds else None,
        "final_loss": result.history[args.steps]["loss"],
        "wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quickstart")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "dpo.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    results = {}
    for name, flag in (("frozen", []), ("precomputed", ["--precompute"])):
        cmd = [sys.executable, __file__, "--child", *flag, "--preset", args.preset, "--steps", str(args.steps),
               "--pairs", str(args.pairs), "--seq-len", str(args.seq_len)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    f, p = results["frozen"], results["precomputed"]
    mb = 1 / 2**20
    print(f"\nDPO, preset {args.preset}: {args.pairs} pairs x 2 x {args.seq_len} tokens per step, {args.steps} steps, "
          f"1 device ({platform.processor() or platform.machine()})")
    print("| reference | steps/s | step memory (MiB) | state (MiB) | peak RSS (MiB) | reference pass (s) | final loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        ref = f"{r['reference_pass_seconds']:.1f}" if r["reference_pass_seconds"] is not None else "-"
        print(f"| {name} | {r['steps_per_sec']:.2f} | {r['step_memory_bytes'] * mb:.1f} | {r['state_bytes'] * mb:.1f} "
              f"| {r['peak_rss_bytes'] * mb:.0f} | {ref} | {r['final_loss']:.4f} |")
    print(f"| precomputed / frozen | {p['steps_per_sec'] / f['steps_per_sec']:.2f}x | "
          f"{p['step_memory_bytes'] / f['step_memory_bytes']:.2f}x | {p['state_bytes'] / f['state_bytes']:.2f}x | "
          f"{p['peak_rss_bytes'] / f['peak_rss_bytes']:.2f}x | | |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "steps": args.steps, "pairs": args.pairs, "seq_len": args.seq_len,
                               "date": time.strftime("%Y-%m-%d"), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
