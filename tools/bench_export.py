"""Peak host memory of `python -m maxllm.export` on a model of >= 1B parameters.

    python tools/bench_export.py [--preset llama3.2-1b] [--dtype bfloat16] [--work /tmp/bench_export]

Makes a run directory holding a randomly initialized model of the preset's shape
(float32, parameters only, the checkpoint `maxllm.import_hf` writes), then runs the
export under `/usr/bin/time -v` and prints its maximum resident set size next to
the size of the exported weights. The export reads one parameter leaf at a time
(cast to the target dtype while reading) and writes each tensor as it is made, so
the peak should stay near one leaf plus the runtime, well under the 1.5x-the-model
bound the HF issue sets.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_run(preset: str, run: Path) -> int:
    """A params-only checkpoint of a random model (in a subprocess, so its memory
    is gone before the measured export starts). Returns the parameter count."""
    code = f"""
import jax, jax.numpy as jnp, orbax.checkpoint as ocp
from flax import nnx
from pathlib import Path
from maxllm.config import load_config
from maxllm.models import build_model
cfg = load_config([{str(ROOT / 'configs' / 'base.yml')!r}, {str(ROOT / 'configs' / 'models' / f'{preset}.yml')!r}],
                  ["run.output_dir={run}", "run.name={preset}-random"])
params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build_model(cfg.model, 0))))()
n = sum(x.size for x in jax.tree.leaves(params))
run = Path({str(run)!r})
with ocp.CheckpointManager(run / "checkpoints", options=ocp.CheckpointManagerOptions(create=True),
                           item_handlers={{"state": ocp.StandardCheckpointHandler()}}) as m:
    m.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({{"params": params}})))
    m.wait_until_finished()
(run / "config.yml").write_text(cfg.to_yaml())
print(n)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama3.2-1b")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--work", default="/tmp/bench_export")
    parser.add_argument("--keep", action="store_true", help="keep the run and export folders")
    args = parser.parse_args()

    work = Path(args.work)
    run, out = work / "run", work / "hf"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    n = make_run(args.preset, run)
    print(f"# {args.preset}: {n:,} parameters, random float32 checkpoint written in {time.perf_counter() - t0:.0f}s")
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "maxllm.export", "--run", str(run), "--out", str(out),
         "--dtype", args.dtype],
        cwd=ROOT, capture_output=True, text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    expected = n * (2 if args.dtype == "bfloat16" else 4)
    index = json.loads((out / "model.safetensors.index.json").read_text()) if (out / "model.safetensors.index.json").exists() else None
    print(f"export ({args.dtype}) wall time        {wall:,.1f} s")
    print(f"weights written                {weights / 1e9:,.3f} GB in {len(index and set(index['weight_map'].values()) or [1])} file(s)"
          f" (parameters x {expected // n} bytes = {expected / 1e9:,.3f} GB)")
    print(f"peak RSS (/usr/bin/time -v)    {peak_kb * 1024 / 1e9:,.3f} GB")
    print(f"peak RSS / model size          {peak_kb * 1024 / expected:.2f}  (bound 1.5)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
