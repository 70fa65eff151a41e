"""Training throughput: maxllm against transformers' LlamaForCausalLM or
MixtralForCausalLM (PyTorch), same model shape, batch, sequence length and dtype,
in one run.

    python tools/bench_train.py                       # CPU: quickstart and SmolLM-135M shapes
    python tools/bench_train.py --presets quickstart-moe  # CPU: MoE, dropless and capacity dispatch
    python tools/bench_train.py --presets llama3.2-1b --dtype bfloat16 \
        --attention cudnn --seq-len 4096 --batch 8 --no-torch    # one GPU: MFU
    python tools/bench_train.py --presets moe-3b --dtype bfloat16 --remat full \
        --seq-len 2048 --batch 8 --no-torch           # one GPU: MoE MFU, both dispatch paths
    python tools/bench_train.py --stages 1,2,4 --microbatches 8   # pipeline bubble, 8 devices

With `--stages`, maxllm alone runs the quickstart shape deepened to 8 layers on
8 devices (on a CPU, 8 host-platform devices) once per stage count S, with
mesh.stage=S, the rest fsdp, and the same global batch, and prints each step
time beside the bubble a pipeline of M microbatches should have, (S-1)/(M+S-1).
The measured bubble is 1 - t(S=1)/t(S): at equal global batch every layout does
the same useful work per device, and a pipeline adds S-1 idle ticks of M+S-1.
(On a CPU the 8 devices share the cores, so an idle tick is not idle: the bubble
is computed on garbage and costs the same time, which measures it just as well.)

A preset of the mixtral family runs once per `--dispatch` mode (default both).

Each side runs in its own subprocess (no shared thread pools or allocator), steps
`--warmup` times, then times `--steps` full optimizer steps (forward, backward,
clipping, AdamW) on random tokens. Prints a table and writes JSON (`--out`).
Throughput is tokens/s; MFU uses maxllm.metrics' FLOPs formula for both sides.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Model shapes measured by default on CPU, with the batch and length that keep one
# step under ~20 s on two cores.
DEFAULTS = {"quickstart": (32, 128), "smollm-135m": (4, 512), "quickstart-moe": (32, 128), "tiny-moe": (8, 128),
            "quickstart-mamba": (32, 128)}
PIPELINE_LAYERS = 8  # --stages: the quickstart shape with this many layers (divides 1, 2, 4 and 8 stages)
TOP_LEVEL = {"quickstart", "quickstart-moe", "quickstart-mamba"}  # configs/<name>.yml; the others are configs/models/


def _model_config(preset: str, args) -> object:
    from maxllm.config import load_config

    paths = [ROOT / "configs" / "base.yml"]
    paths.append(ROOT / "configs" / (f"{preset}.yml" if preset in TOP_LEVEL else f"models/{preset}.yml"))
    overrides = [f"model.dtype={args.dtype}", f"model.remat={args.remat}"]
    if getattr(args, "stage", None):
        overrides += [f"mesh.stage={args.stage}", "mesh.fsdp=-1", f"model.num_layers={PIPELINE_LAYERS}",
                      f"train.microbatches={args.microbatches}"]
    if "attention" in type(load_config(paths).model).model_fields:  # not Mamba's
        overrides.append(f"model.attention={args.attention}")
    if getattr(args, "mode", None):
        overrides.append(f"model.moe.dispatch={args.mode}")
    if args.scan is not None:
        overrides.append(f"model.scan_layers={args.scan}")
    return load_config(paths, overrides)


def run_maxllm(preset: str, batch: int, seq: int, args) -> dict:
    import jax
    import numpy as np

    from maxllm import train as train_lib
    from maxllm.mesh import make_mesh

    cfg = _model_config(preset, args)
    cfg = cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"seq_len": seq, "source": "synthetic"}),
        "train": cfg.train.model_copy(update={"global_batch_size": batch}),
    })
    mesh = make_mesh(cfg.mesh)
    sharding = train_lib.input_layout(cfg, mesh)
    with train_lib.step_context(cfg, mesh):
        spec = train_lib.train_state_spec(cfg, mesh)
        state = spec.init()
        step_fn = train_lib.make_train_step(cfg, spec.graphdef, spec.tx, spec.shardings,
                                            dict.fromkeys(train_lib.BATCH_KEYS, sharding))
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, cfg.model.vocab_size, (batch, seq + 1))
        host = {
            "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(seq), (batch, seq)),
            "segment_ids": np.ones((batch, seq)), "loss_mask": np.ones((batch, seq)),
        }
        batch_arrays = {
            k: jax.device_put(v.astype(np.float32 if k == "loss_mask" else np.int32), sharding)
            for k, v in host.items()
        }
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            state, metrics = step_fn(state, batch_arrays)
        jax.block_until_ready(metrics)
        compile_and_warmup = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step_fn(state, batch_arrays)
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - t0) / args.steps
    from maxllm.metrics import peak_flops
    from maxllm.models.layers import compute_dtype

    peak = peak_flops(jax.devices()[0], compute_dtype(cfg.model.dtype))
    return _result(cfg, batch, seq, seconds, jax.device_count(), jax.devices()[0].device_kind, peak,
                   loss=float(metrics["loss"]), warmup_s=compile_and_warmup)


def run_torch(preset: str, batch: int, seq: int, args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM, MixtralConfig, MixtralForCausalLM

    cfg = _model_config(preset, args)
    m = cfg.model
    torch.manual_seed(0)
    if m.family == "mamba":
        return _run_torch_model(cfg, MambaForCausalLM(MambaConfig(
            vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.inner, expand=m.inner / m.d_model,
            state_size=m.ssm_state, num_hidden_layers=m.num_layers, conv_kernel=m.conv_kernel,
            time_step_rank=m.rank, tie_word_embeddings=m.tie_embeddings)), batch, seq, args)
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling is not None:
        s = m.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": m.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    shape = dict(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.mlp_dim,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, head_dim=m.head_size, rms_norm_eps=m.norm_eps,
        max_position_embeddings=m.max_seq_len, tie_word_embeddings=m.tie_embeddings,
        rope_parameters=rope,
    )
    if m.family == "mixtral":  # router aux loss on, as in maxllm's step
        hf_cfg = MixtralConfig(**shape, num_local_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
                               router_aux_loss_coef=m.moe.aux_loss_coef, output_router_logits=True)
        model_cls = MixtralForCausalLM
    else:
        hf_cfg, model_cls = LlamaConfig(**shape), LlamaForCausalLM
    return _run_torch_model(cfg, model_cls(hf_cfg), batch, seq, args)


def _run_torch_model(cfg, model, batch: int, seq: int, args) -> dict:
    import torch

    m = cfg.model
    torch.set_num_threads(os.cpu_count())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": torch.float32}[args.dtype]
    model = model.to(dtype).train()
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.b1, t.b2), eps=t.eps, weight_decay=t.weight_decay)
    tokens = torch.randint(0, m.vocab_size, (batch, seq))

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    seconds = (time.perf_counter() - t0) / args.steps
    return _result(cfg, batch, seq, seconds, 1, f"cpu ({torch.get_num_threads()} threads)", None,
                   loss=float(loss), warmup_s=warmup, attn=model.config._attn_implementation)


def _result(cfg, batch, seq, seconds, devices, device_kind, peak, **extra) -> dict:
    from maxllm.metrics import flops_per_token, param_count

    tokens_per_sec = batch * seq / seconds
    flops = tokens_per_sec * flops_per_token(cfg.model, seq) / devices
    moe = getattr(cfg.model, "moe", None)
    return {
        "params": param_count(cfg.model), "active_params": param_count(cfg.model, active=True),
        "dispatch": moe.dispatch if moe else None, "batch": batch, "seq_len": seq, "dtype": cfg.model.dtype,
        "step_seconds": seconds, "tokens_per_sec": tokens_per_sec,
        "tflops_per_sec_per_device": flops / 1e12, "mfu": flops / peak if peak else None,
        "device": device_kind, **extra,
    }


def _child(args) -> None:
    fn = run_maxllm if args.child == "maxllm" else run_torch
    print("RESULT " + json.dumps(fn(args.preset, args.batch, args.seq_len, args)))


def _spawn(side: str, preset: str, batch: int, seq: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--preset", preset, "--batch", str(batch),
           "--seq-len", str(seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--dtype", args.dtype, "--attention", args.attention, "--remat", args.remat]
    if args.mode:
        cmd += ["--mode", args.mode]
    if args.scan is not None:
        cmd += ["--scan", args.scan]
    env = None
    if args.stage:
        cmd += ["--stage", str(args.stage), "--microbatches", str(args.microbatches)]
        if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{side} {preset} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(DEFAULTS))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention", default="xla")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--scan", choices=["true", "false"], help="override model.scan_layers")
    parser.add_argument("--dispatch", default="dropless,capacity", help="MoE presets: dispatch modes to time")
    parser.add_argument("--no-torch", action="store_true", help="maxllm only (e.g. on a GPU)")
    parser.add_argument("--out", default="bench_results/bench_train.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # one MoE dispatch mode, for a child
    parser.add_argument("--stages", help="pipeline bubble: comma-separated stage counts, e.g. 1,2,4")
    parser.add_argument("--microbatches", type=int, default=8, help="--stages: pipeline microbatches")
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)  # one stage count, for a child
    args = parser.parse_args()
    if args.child:
        return _child(args)
    if args.stages:
        return _pipeline_bubble(args)

    rows = []
    for preset in args.presets.split(","):
        batch, seq = DEFAULTS.get(preset, (8, 2048))
        batch, seq = args.batch or batch, args.seq_len or seq
        is_moe = getattr(_model_config(preset, args).model, "moe", None) is not None
        torch_side = None
        for mode in args.dispatch.split(",") if is_moe else [None]:
            args.mode = mode
            row = {"preset": preset if mode is None else f"{preset}[{mode}]",
                   "maxllm": _spawn("maxllm", preset, batch, seq, args)}
            if not args.no_torch:
                args.mode = None
                torch_side = torch_side or _spawn("torch", preset, batch, seq, args)
                row["pytorch"] = torch_side
                row["ratio"] = row["maxllm"]["tokens_per_sec"] / row["pytorch"]["tokens_per_sec"]
            rows.append(row)
            _print_row(row)
    report = {
        "date": datetime.date.today().isoformat(),
        "host": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


def _pipeline_bubble(args) -> None:
    """Step time against stage count at equal global batch (see the docstring)."""
    batch, seq = args.batch or 32, args.seq_len or 128
    M = args.microbatches
    rows = []
    for S in (int(s) for s in args.stages.split(",")):
        args.stage = S
        result = _spawn("maxllm", "quickstart", batch, seq, args)
        rows.append({"stages": S, "microbatches": M, "estimate": (S - 1) / (M + S - 1), **result})
    base = next((r for r in rows if r["stages"] == 1), None)
    print(f"quickstart shape, {PIPELINE_LAYERS} layers, B={batch} T={seq}, M={M} microbatches, "
          f"{rows[0]['device']}")
    print(f"{'stages':>6} {'step s':>8} {'vs S=1':>7} {'bubble':>7} {'(S-1)/(M+S-1)':>14}")
    for r in rows:
        ratio = r["step_seconds"] / base["step_seconds"] if base else None
        r["measured"] = 1 - 1 / ratio if ratio else None
        print(f"{r['stages']:>6} {r['step_seconds']:8.3f} " + (f"{ratio:7.2f} {r['measured']:7.1%}" if ratio else " " * 15)
              + f" {r['estimate']:14.1%}", flush=True)
    report = {"date": datetime.date.today().isoformat(), "host": f"{platform.machine()}, {os.cpu_count()} cores",
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "pipeline": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


def _print_row(row) -> None:
    m = row["maxllm"]
    line = (f"{row['preset']:<26} {m['params'] / 1e6:7.1f}M  B={m['batch']} T={m['seq_len']} {m['dtype']}"
            f"  maxllm {m['tokens_per_sec']:9,.0f} tok/s {m['tflops_per_sec_per_device']:.3f} TFLOP/s/dev")
    if m["mfu"] is not None:
        line += f" MFU {m['mfu']:.1%}"
    if "pytorch" in row:
        p = row["pytorch"]
        line += f"  |  pytorch {p['tokens_per_sec']:9,.0f} tok/s  |  ratio {row['ratio']:.2f}"
    print(line, flush=True)


if __name__ == "__main__":
    main()
