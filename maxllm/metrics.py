"""Training FLOPs per token, MFU, and the metric writers (stdout, JSONL, TensorBoard).

FLOPs are counted analytically, as model FLOPs (recomputation from remat is not
counted), per trained token, forward and backward (x3 the forward):

    matmul:    6 * P_matmul, where P_matmul counts every weight matrix that
               multiplies activations (attention q/k/v/o, MLP, LM head; not the
               embedding lookup, not norms). For a mixture of experts only the
               active parameters count: the router and top_k of the E experts.
               Capacity slots left empty and the dense matmuls a backend may run
               for `ragged_dot` are not counted, so MFU stays honest.
    attention: 6 * L * T * N * H, i.e. QK^T and AV (2 * 2 * T * N * H forward per
               token and layer), x3 for the backward, halved for the causal mask

T is the training sequence length. The causal halving follows MaxText: a flash
kernel skips the masked half, so counting it would overstate MFU.

Mamba has no attention term; its scan costs, per token and layer forward,
2 * W * I (the depthwise convolution) + 8 * I * G (discretize A and B u, update
the state, read it out with C), x3 for training: linear in the sequence length.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

import jax

from maxllm import storage
from maxllm.config import LlamaConfig


def matmul_params(cfg: LlamaConfig, active: bool = True) -> int:
    """Weights that multiply activations; for an MoE, those one token uses
    (`active`) or all of them."""
    if cfg.family == "mamba":
        D, I, G, R = cfg.d_model, cfg.inner, cfg.ssm_state, cfg.rank
        return cfg.num_layers * (D * 2 * I + I * (R + 2 * G) + R * I + I * D) + D * cfg.vocab_size
    D, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.mlp_dim
    per_layer = D * N * H * 2 + D * K * H * 2
    moe = getattr(cfg, "moe", None)
    if moe is None:
        per_layer += 3 * D * F
    else:
        per_layer += D * moe.num_experts + (moe.top_k if active else moe.num_experts) * 3 * D * F
    return cfg.num_layers * per_layer + D * cfg.vocab_size


def param_count(cfg: LlamaConfig, active: bool = False) -> int:
    """Parameters in the model (`active`: those one token uses, for an MoE)."""
    embed = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    if cfg.family == "mamba":  # per layer: norm; conv weight and bias, dt bias, A_log, D
        I, W, G = cfg.inner, cfg.conv_kernel, cfg.ssm_state
        norms = (cfg.num_layers + 1) * cfg.d_model + cfg.num_layers * (I * W + 3 * I + I * G)
    else:
        norms = (2 * cfg.num_layers + 1) * cfg.d_model
    return matmul_params(cfg, active) - cfg.d_model * cfg.vocab_size + embed + head + norms


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token; see the module docstring."""
    if cfg.family == "mamba":  # the scan instead of attention: independent of the sequence length
        scan = 3 * cfg.num_layers * (2 * cfg.conv_kernel * cfg.inner + 8 * cfg.inner * cfg.ssm_state)
        return 6.0 * matmul_params(cfg) + scan
    attn = 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_size
    return 6.0 * matmul_params(cfg) + attn


# Dense peak FLOP/s per chip, (bfloat16, float32). GPU float32 matmuls run as TF32
# on tensor cores; TPU float32 matmuls run as bfloat16 passes at default precision.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "h200": (989e12, 494.5e12),
    "h100 pcie": (756e12, 378e12),
    "h100": (989e12, 494.5e12),  # SXM
    "a100": (312e12, 156e12),
    "tpu v6 lite": (918e12, 918e12),  # v6e
    "tpu v5 lite": (197e12, 197e12),  # v5e
    "tpu v5p": (459e12, 459e12),
    "tpu v5": (459e12, 459e12),
    "tpu v4": (275e12, 275e12),
}


def peak_flops(device: jax.Device, dtype: Any) -> float | None:
    """Peak FLOP/s of one device for the compute dtype, or None where unknown (CPU)."""
    kind = device.device_kind.lower()
    for name, (bf16, fp32) in PEAK_FLOPS.items():
        if name in kind:
            return fp32 if str(dtype) == "float32" else bf16
    return None


class MetricsWriter:
    """One stdout line, `metrics.jsonl` and TensorBoard scalars per logged step,
    written by process 0. On a resume from `resume_step`, rows of later steps (from
    the interrupted run) are dropped first, so each step appears once. In a gs://
    `output_dir` both files are objects rewritten every few seconds and at the end
    (`storage.ObjectLog`)."""

    def __init__(
        self,
        output_dir: str | Path,
        jsonl: bool,
        tensorboard: bool,
        resume_step: int = 0,
        stream: TextIO | None = None,  # None: the sys.stdout of each write (not of the first import)
    ):
        self.stream = stream
        self.jsonl = None
        self.tb = None
        if jax.process_index() != 0:
            return
        out = str(output_dir)
        storage.makedirs(out)
        if jsonl:
            path = storage.join(out, "metrics.jsonl")
            self.jsonl = storage.open_log(path, _rows_up_to(path, resume_step))
        if tensorboard:
            from tensorboardX import SummaryWriter
            from tensorboardX.record_writer import register_writer_factory

            register_writer_factory("gs", _EventObjects())
            # purge_step hides events of steps >= it left by an interrupted run.
            purge = resume_step + 1 if resume_step else None
            self.tb = SummaryWriter(storage.join(out, "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if jax.process_index() != 0:
            return
        stream = self.stream or sys.stdout
        stream.write(_format_line(step, metrics) + "\n")
        stream.flush()
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                # A non-finite value (an expert with no load: max/min is inf) stays in the JSONL only.
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _EventObjects:
    """tensorboardX's writer factory for gs:// event files: `storage.ObjectLog`, which
    uploads at most every few seconds. (tensorboardX's own GCS writer uploads the
    whole file on every flush, and again when it is garbage collected.)"""

    def open(self, path: str) -> storage.ObjectLog:
        return storage.ObjectLog(path)

    def directory_check(self, path: str) -> None:
        pass  # an object store has no directories


def _rows_up_to(path: str, step: int) -> str | None:
    """The text of `path` without rows of steps after `step` (None: no file); a torn
    last line from a killed run goes too."""
    if not storage.exists(path):
        return None
    kept = []
    for line in storage.read_text(path).splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    return "".join(line + "\n" for line in kept)


def _format_line(step: int, m: dict[str, Any]) -> str:
    parts = [f"step {step:>6d}"]
    for key, fmt in (
        ("loss", "loss {:.4f}"),
        ("grad_norm", "grad_norm {:.3f}"),
        ("lr", "lr {:.2e}"),
        ("tokens_per_sec", "tok/s {:,.0f}"),
        ("tokens_per_sec_per_device", "tok/s/dev {:,.0f}"),
        ("mfu", "mfu {:.1%}"),
        ("tflops_per_sec_per_device", "TFLOP/s/dev {:.3f}"),
        ("rewards/accuracies", "reward acc {:.2f}"),  # DPO
        ("rewards/margins", "margin {:.3f}"),
        ("eval_loss", "eval_loss {:.4f}"),
        ("eval_rewards/accuracies", "eval reward acc {:.2f}"),
        ("eval_rewards/margins", "eval margin {:.3f}"),
        ("eval_perplexity", "eval_ppl {:.2f}"),
        ("moe_load_balance_loss", "moe_lb {:.3f}"),
        ("moe_load_max_min", "load max/min {:.2f}"),
        ("moe_dropped_fraction", "dropped {:.1%}"),
    ):
        value = m.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(fmt.format(value))
    if m.get("skipped"):
        parts.append("update SKIPPED (loss or gradient not finite)")
    for key, value in m.items():  # task metrics: eval/<task>/<metric>
        if key.count("/") == 2 and key.startswith("eval/") and math.isfinite(value):
            parts.append(f"{key[5:]} {value:.4f}")
    return " | ".join(parts)
