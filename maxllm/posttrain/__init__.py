"""Fine-tuning objectives for `maxllm.train`: supervised fine-tuning (`train.objective:
sft`) and direct preference optimization (`dpo`), with chat templates and the
records they read (docs/finetuning.md)."""

from maxllm.posttrain.chat import BUILTIN_TEMPLATES, ChatTemplate, TemplateError, resolve_template
from maxllm.posttrain.dpo import LOSS_TYPES, METRICS, dpo_losses, sequence_logps
from maxllm.posttrain.records import Reader, RecordError, TextEncoder, read_records

__all__ = [
    "BUILTIN_TEMPLATES", "ChatTemplate", "TemplateError", "resolve_template", "LOSS_TYPES", "METRICS",
    "dpo_losses", "sequence_logps", "Reader", "RecordError", "TextEncoder", "read_records",
]
