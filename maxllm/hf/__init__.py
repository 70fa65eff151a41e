"""Hugging Face formats: export a run to a folder `transformers` loads, import an
HF folder as a checkpoint, load either for training, evaluation and serving, and
upload to the Hub. One adapter table per model family (`maxllm.hf.adapters`)."""

from maxllm.hf.adapters import ADAPTERS, HFError
from maxllm.hf.convert import (
    ExportInfo,
    Pretrained,
    export_params,
    export_run,
    hf_run_config,
    is_hf_folder,
    load_params,
    load_pretrained,
    read_hf_model,
)
from maxllm.hf.hub import push_to_hub

__all__ = [
    "ADAPTERS", "HFError", "ExportInfo", "Pretrained", "export_params", "export_run", "hf_run_config",
    "is_hf_folder", "load_params", "load_pretrained", "read_hf_model", "push_to_hub",
]
