"""DPO step speed and memory: maxllm with a frozen reference model and with
reference log-probs precomputed once (`dpo.precompute_ref`), beside TRL's
DPOTrainer (transformers + PyTorch) doing the same two ways, same model shape,
data and batch.

    python tools/bench_dpo.py [--preset quickstart|smollm-135m] [--steps 20]
        [--pairs 8] [--seq-len 96] [--no-trl] [--out bench_results/dpo.json]

Each variant runs in its own process (so that peak memory is its own) on the
team's preference set (data/posttrain/preferences.jsonl, ChatML, the quickstart
tokenizer; the longest sequence is 90 tokens), from a random model of the
preset's shape, float32, on one CPU device (PyTorch with as many threads as
cores). maxllm pads every row to --seq-len (fixed shapes, one compilation); TRL
pads each batch to its longest sequence. Reported:

  steps/s        warm steps (the first excluded)
  step memory    maxllm: XLA's memory analysis of the compiled step (arguments,
                 i.e. the train state with the frozen reference's weights, and
                 the batch, plus temporaries)
  state          maxllm: the train state's bytes (params, Adam moments, frozen reference)
  peak RSS       the process's peak resident memory (everything: Python, runtime, data)
  before step 1  maxllm: the once-per-run reference pass (precomputed); TRL:
                 everything from building the DPOTrainer (tokenizing the pairs,
                 loading the reference, its pass when precomputed) to the first step

TRL (`pip install trl`) is optional: without it, or with --no-trl, only maxllm runs.
Prints a table with the ratios and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
        f"train.steps={steps}", f"train.global_batch_size={pairs}", "train.warmup_steps=0", "train.schedule=constant", "train.init_from=null",
        "checkpoint.enabled=false", f"logging.every_steps={steps}", "logging.tensorboard=false",
        "eval.tasks=[]", "sample.prompts=[]", "model.dtype=float32", "mesh.fsdp=1",
    ])


def child(args) -> dict:
    """One variant, in this process: compile the step for its memory analysis, then train."""
    import jax

    from maxllm import train as train_lib
    from maxllm.plan import plan

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args.preset, args.precompute, args.steps, args.pairs, args.seq_len, tmp)
        reference_seconds = []

        class Catch(logging.Handler):
            def emit(self, record):
                if "reference log-probs" in record.getMessage():
                    reference_seconds.append(float(record.args[1]))

        logging.getLogger("maxllm.posttrain").addHandler(Catch())
        logging.getLogger("maxllm.posttrain").setLevel(logging.INFO)
        step = plan(cfg, jax.devices()[:1])  # the dry run: compiles the step and reads XLA's memory analysis
        start = time.perf_counter()
        result = train_lib.train(cfg, jax.devices()[:1])
        wall = time.perf_counter() - start
        last = json.loads((Path(tmp) / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "steps_per_sec": last["tokens_per_sec"] / step.tokens_per_step,  # tokens/s over steps 2..N
        "step_memory_bytes": step.argument_bytes + step.temp_bytes,
        "argument_bytes": step.argument_bytes,
        "temp_bytes": step.temp_bytes,
        "state_bytes": step.state_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "reference_pass_seconds": reference_seconds[0] if reference_seconds else None,
        "final_loss": result.history[args.steps]["loss"],
        "wall_seconds": wall,
    }


def trl_child(args) -> dict:
    """TRL's DPOTrainer on the same shape, data, batch, learning rate and β."""
    import datasets
    import torch
    from tokenizers import Tokenizer as Fast
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from maxllm.hf.adapters import adapter_for_family
    from maxllm.hf.tokenizer_files import sentencepiece_to_tokenizer_json
    from maxllm.posttrain import BUILTIN_TEMPLATES

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args.preset, args.precompute, args.steps, args.pairs, args.seq_len, tmp)
        hf_config = adapter_for_family("llama").to_hf_config(cfg.model, bos_id=1, eos_id=2, dtype="float32")
        # Saved and named by path, as TRL users start: TRL then loads its own reference copy.
        LlamaForCausalLM(LlamaConfig.from_dict(hf_config)).save_pretrained(Path(tmp) / "model")
        sp = ROOT / "data" / "quickstart" / "tokenizer.model"
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Fast.from_str(sentencepiece_to_tokenizer_json(sp)),
                                            bos_token="<s>", eos_token="</s>", pad_token="</s>")
        tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"]
        records = [json.loads(line) for line in Path(cfg.data.path).read_text().splitlines()]
        marks: list[float] = []

        class Clock(TrainerCallback):
            def on_step_begin(self, *a, **k):
                if not marks:
                    marks.append(time.perf_counter())

            def on_step_end(self, *a, **k):
                marks.append(time.perf_counter())

        start = time.perf_counter()
        trainer = DPOTrainer(
            model=str(Path(tmp) / "model"), processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(records),
            callbacks=[Clock()],
            args=DPOConfig(
                output_dir=tmp, per_device_train_batch_size=args.pairs, max_steps=args.steps,
                learning_rate=cfg.train.lr, beta=cfg.dpo.beta, max_length=args.seq_len,
                precompute_ref_log_probs=args.precompute, logging_steps=args.steps, report_to="none",
                save_strategy="no", use_cpu=True, bf16=False, dataloader_num_workers=0, seed=0,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=cfg.train.weight_decay,
                adam_beta1=cfg.train.b1, adam_beta2=cfg.train.b2, max_grad_norm=cfg.train.clip_grad_norm,
            ),
        )
        trainer.train()
        wall = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "steps_per_sec": (len(marks) - 2) / (marks[-1] - marks[1]),  # steps 2..N
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "before_first_step_seconds": marks[0] - start,
        "final_loss": losses[-1] if losses else None,
        "wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quickstart")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--no-trl", action="store_true", help="maxllm only")
    parser.add_argument("--trl", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "dpo.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(trl_child(args) if args.trl else child(args)))
        return
    variants = [("frozen", []), ("precomputed", ["--precompute"])]
    if not args.no_trl:
        try:
            import trl

            print(f"TRL {trl.__version__}")

            variants += [("trl frozen", ["--trl"]), ("trl precomputed", ["--trl", "--precompute"])]
        except ImportError:
            print("TRL is not installed (pip install trl): maxllm only")
    results = {}
    for name, flag in variants:
        cmd = [sys.executable, __file__, "--child", *flag, "--preset", args.preset, "--steps", str(args.steps),
               "--pairs", str(args.pairs), "--seq-len", str(args.seq_len)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    mb = 1 / 2**20
    print(f"\nDPO, preset {args.preset}: {args.pairs} pairs x 2 x {args.seq_len} tokens per step, {args.steps} steps, "
          f"1 device ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    print("| trainer, reference | steps/s | step memory (MiB) | state (MiB) | peak RSS (MiB) | before step 1 (s) | final loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")

    def cell(r, key, fmt, scale=1.0):
        return fmt.format(r[key] * scale) if r.get(key) is not None else "-"

    for name, r in results.items():
        before = r.get("reference_pass_seconds", r.get("before_first_step_seconds"))
        print(f"| {'maxllm ' if not name.startswith('trl') else ''}{name} | {r['steps_per_sec']:.2f} | "
              f"{cell(r, 'step_memory_bytes', '{:.1f}', mb)} | {cell(r, 'state_bytes', '{:.1f}', mb)} | "
              f"{r['peak_rss_bytes'] * mb:.0f} | {'-' if before is None else f'{before:.1f}'} | {r['final_loss']:.4f} |")
    f, p = results["frozen"], results["precomputed"]
    print(f"| maxllm precomputed / frozen | {p['steps_per_sec'] / f['steps_per_sec']:.2f}x | "
          f"{p['step_memory_bytes'] / f['step_memory_bytes']:.2f}x | {p['state_bytes'] / f['state_bytes']:.2f}x | "
          f"{p['peak_rss_bytes'] / f['peak_rss_bytes']:.2f}x | | |")
    for mode in ("frozen", "precomputed"):
        if f"trl {mode}" in results:
            ours, theirs = results[mode], results[f"trl {mode}"]
            print(f"| maxllm / TRL, {mode} | {ours['steps_per_sec'] / theirs['steps_per_sec']:.2f}x | | | "
                  f"{ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f}x | | |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"preset": args.preset, "steps": args.steps, "pairs": args.pairs, "seq_len": args.seq_len,
                               "date": time.strftime("%Y-%m-%d"), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
