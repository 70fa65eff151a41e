"""Hugging Face folders in and out.

- `export_params`: our parameters (read leaf by leaf from a checkpoint, or held in
  memory) -> config.json, generation_config.json, model.safetensors (or shards and
  model.safetensors.index.json), tokenizer files, README.md (model card).
- `read_hf_model`: an HF folder -> our model config and a leaf reader.
- `load_pretrained`: a run directory or an HF folder -> config, parameters and
  tokenizer, for evaluation, serving and `train.init_from`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import yaml

from maxllm import storage
from maxllm.config import Config, LlamaConfig, config_from_dict, load_config
from maxllm.hf import safetensors_io as st
from maxllm.hf.adapters import Adapter, HFError, adapter_for_family, adapter_for_hf
from maxllm.hf.tokenizer_files import write_tokenizer

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG = ROOT / "configs" / "base.yml"

LeafPath = tuple[str, ...]
DTYPE_NAMES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}


def abstract_params(model_cfg: Any) -> dict:
    """Our parameter tree for `model_cfg` as float32 ShapeDtypeStructs, unallocated."""
    from flax import nnx

    from maxllm.models import build_model

    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(model_cfg, 0))))


def param_shapes(model_cfg: Any) -> dict[LeafPath, tuple[int, ...]]:
    """Our parameter leaves and shapes for `model_cfg`, by path."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(model_cfg))[0]
    return {tuple(str(k.key) for k in path): tuple(x.shape) for path, x in flat}


# ---------------------------------------------------------------------------------
# Export


@dataclasses.dataclass(frozen=True)
class ExportInfo:
    """What the exported folder says about where the model came from."""

    config: Config
    step: int | None = None
    tokens_seen: int | None = None


def export_params(
    info: ExportInfo,
    get_leaf: Callable[[LeafPath], np.ndarray],
    out: str | Path,
    *,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    tokenizer_path: str | Path | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
    chat_template: str | None = None,
    overwrite: bool = False,
) -> Path | str:
    """Writes an HF folder at `out` (local or gs://; returned as given: a URL stays a
    string). `get_leaf(path)` returns one of our parameter leaves; each is asked for
    once and dropped after its tensors are written.

    The folder is assembled in `<out>.partial` and renamed at the end, so `out`
    exists only complete. A gs:// `out` is assembled in a local temporary folder and
    uploaded with config.json last, so that it looks like an HF folder only complete."""
    if dtype not in DTYPE_NAMES:
        raise HFError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
    if storage.listdir(str(out)) and not overwrite:
        raise HFError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    max_bytes = st.parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)

    def write(work: Path) -> None:
        _write_folder(work, info, get_leaf, dtype, max_bytes, tokenizer_path, bos_id, eos_id, chat_template)

    if storage.is_remote(str(out)):
        storage.check_bucket(str(out))
        with tempfile.TemporaryDirectory(prefix="maxllm-export-") as tmp:
            write(Path(tmp))
            storage.remove(str(out))
            storage.upload_dir(Path(tmp), str(out), last="config.json")
        return out
    out = Path(out)
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write(work)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    return out


def _write_folder(work: Path, info: ExportInfo, get_leaf: Callable[[LeafPath], np.ndarray], dtype: str,
                  max_bytes: int, tokenizer_path: str | Path | None, bos_id: int | None, eos_id: int | None,
                  chat_template: str | None) -> None:
    """The files of the HF folder, into the (empty) local folder `work`."""
    cfg = info.config.model
    adapter = adapter_for_family(cfg.family)
    np_dtype = np.dtype(DTYPE_NAMES[dtype])
    _write_json(work / "config.json", adapter.to_hf_config(cfg, bos_id=bos_id, eos_id=eos_id, dtype=dtype))
    _write_json(work / "generation_config.json", _generation_config(bos_id, eos_id))
    if tokenizer_path is not None:
        write_tokenizer(work, tokenizer_path, bos_id=bos_id, eos_id=eos_id or 0, max_length=cfg.max_seq_len,
                        chat_template=chat_template)
    else:
        log.warning("no tokenizer in this run's config (data.tokenizer or a tokens/ manifest): "
                    "the folder has weights only")

    tensors = adapter.tensors(cfg, param_shapes(cfg))
    entries = [(name, shape, np_dtype) for name, _, _, shape in tensors]
    by_name = {name: (row, index) for name, row, index, _ in tensors}
    groups = st.plan_shards(entries, max_bytes)
    files = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))
    ]
    current: dict[str, Any] = {"path": None, "leaf": None}

    def produce(name: str) -> np.ndarray:
        row, index = by_name[name]
        if current["path"] != row.ours:  # tensors come leaf by leaf: one leaf in memory
            current["leaf"] = None
            current["leaf"] = np.asarray(get_leaf(row.ours))
            current["path"] = row.ours
        return row.transform.to_hf(current["leaf"][index]).astype(np_dtype, copy=False)

    weight_map = {}
    for file, group in zip(files, groups):
        st.write_file(work / file, [entries[i] for i in group], produce)
        weight_map.update({entries[i][0]: file for i in group})
    current["leaf"] = None
    if len(files) > 1:
        total = sum(int(np.prod(shape)) * np_dtype.itemsize for _, shape, _ in entries)
        _write_json(work / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    (work / "README.md").write_text(model_card(info, adapter, dtype))


def _generation_config(bos_id: int | None, eos_id: int | None) -> dict[str, Any]:
    return {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def model_card(info: ExportInfo, adapter: Adapter, dtype: str) -> str:
    """README.md: what the model is and how it was trained (config and data)."""
    cfg = info.config
    m = cfg.model
    from maxllm.metrics import param_count

    data = cfg.data
    if data.source == "mixture":
        sources = ", ".join(f"`{e.path}` (weight {e.weight})" for e in data.mixture)
    elif data.source == "seqio":
        sources = f"seqio task `{data.seqio.task}`"
    else:
        sources = f"`{data.path}`" if data.path else "random rows (no corpus)"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- maxllm",
        f"- {adapter.model_type}",
        "---",
        "",
        f"# {cfg.run.name}",
        "",
        f"A {param_count(m) / 1e6:,.1f}M-parameter `{adapter.architecture}` trained with maxllm "
        f"(JAX) and exported to Hugging Face format ({dtype} weights).",
        "",
        "| | |",
        "| --- | --- |",
        *_shape_rows(m),
        f"| vocabulary | {m.vocab_size} |",
        f"| context | {m.max_seq_len} (trained at {data.seq_len}) |",
        f"| training steps | {info.step if info.step is not None else 'unknown'} of {cfg.train.steps} |",
        f"| batch | {cfg.train.global_batch_size} x {data.seq_len} tokens |",
    ]
    if info.tokens_seen is not None:
        lines.append(f"| tokens seen | {info.tokens_seen:,} |")
    lines += [
        f"| data | {data.source}: {sources} |",
        f"| optimizer | AdamW, peak lr {cfg.train.lr}, {cfg.train.schedule} schedule |",
        "",
        "## Training config",
        "",
        "```yaml",
        yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _shape_rows(m: Any) -> list[str]:
    """The model card's rows that describe the architecture, by family."""
    if m.family == "mamba":
        return [f"| layers x width | {m.num_layers} x {m.d_model} (inner {m.inner}) |",
                f"| state-space | state {m.ssm_state}, conv kernel {m.conv_kernel}, dt rank {m.rank} |"]
    rows = [f"| layers x width | {m.num_layers} x {m.d_model} (MLP {m.mlp_dim}) |",
            f"| heads (query / key-value) | {m.num_heads} / {m.num_kv_heads}, head dim {m.head_size} |"]
    if m.family == "mixtral":
        rows.append(f"| experts | {m.moe.num_experts}, top-{m.moe.top_k} per token |")
    return rows


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    step: int | None = None,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    chat_template: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Exports a run directory's checkpoint (the newest, or `step`)."""
    from maxllm.checkpoint import StateReader, check_param_shapes
    from maxllm.data import open_tokenizer
    from maxllm.posttrain.chat import TEMPLATE_FILE

    cfg = run_config(run_dir)
    ckpt = _checkpoint_root(run_dir, cfg)
    reader = StateReader(ckpt, step)
    check_param_shapes(str(reader.path), reader.param_shapes(), abstract_params(cfg.model))
    tokenizer = open_tokenizer(cfg.data, cfg.model.vocab_size)
    template_file = storage.join(str(run_dir), TEMPLATE_FILE)
    if chat_template is None and storage.isfile(template_file):
        chat_template = storage.read_text(template_file)  # the template fine-tuning used
    np_dtype = DTYPE_NAMES[dtype] if dtype in DTYPE_NAMES else None
    info = ExportInfo(cfg, reader.step, reader.step * cfg.train.global_batch_size * cfg.data.seq_len)
    return export_params(
        info, lambda path: reader.leaf(path, np_dtype), out, dtype=dtype, max_shard_size=max_shard_size,
        tokenizer_path=tokenizer.path if tokenizer else None,
        bos_id=tokenizer.bos_id if tokenizer else None, eos_id=tokenizer.eos_id if tokenizer else None,
        chat_template=chat_template, overwrite=overwrite,
    )


def run_config(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """A run directory's resolved config.yml, over configs/base.yml so that keys
    added to maxllm after the run was written take their defaults."""
    path = storage.join(str(run_dir), "config.yml")
    if not storage.isfile(path):
        raise HFError(f"{path}: not found (is {run_dir} a maxllm run directory?)")
    return load_config([BASE_CONFIG, _local(path)], overrides or [])


def _local(path: str | Path) -> Path:
    """`path`, or the local copy of a gs:// file or folder."""
    return storage.local_copy(str(path)) if storage.is_remote(str(path)) else Path(path)


def _checkpoint_root(run_dir: str | Path, cfg: Config) -> str:
    checkpoints = storage.join(str(run_dir), "checkpoints")
    if storage.isdir(checkpoints):
        return checkpoints
    if cfg.checkpoint.dir:
        return cfg.checkpoint.dir
    raise HFError(f"{checkpoints}: no checkpoints in this run directory")


# ---------------------------------------------------------------------------------
# Import


@dataclasses.dataclass
class HFModel:
    """An HF folder opened for reading: our model config section and a leaf reader."""

    folder: Path
    adapter: Adapter
    model_section: dict[str, Any]
    tensors: st.SafetensorsFolder

    @property
    def tokenizer_path(self) -> Path | None:
        for name in ("tokenizer.json", "tokenizer.model"):
            if (self.folder / name).is_file():
                return self.folder / name
        return None

    def leaf(self, model_cfg: Any, path: LeafPath, shape: tuple[int, ...]) -> np.ndarray:
        """Our leaf `path` (float32) assembled from the HF tensors that hold it."""
        rows = [r for r in self.adapter.rows_for(model_cfg) if r.ours == path]
        if not rows:
            raise HFError(f"{self.folder}: no tensor maps to our parameter {'/'.join(path)}")
        row = rows[0]
        n = row.stacked_dims
        if not n:
            return self._one(row.hf, row, shape)
        out = np.empty(shape, np.float32)
        for index in np.ndindex(*shape[:n]):
            out[index] = self._one(row.name(index), row, shape[n:])
        return out

    def _one(self, name: str, row, shape: tuple[int, ...]) -> np.ndarray:
        expected = row.transform.hf_shape(shape)
        got = self.tensors.shape(name)
        if got != expected:
            raise HFError(f"{self.folder}: tensor {name} has shape {got}, config.json implies {expected}")
        return row.transform.from_hf(self.tensors.get(name).astype(np.float32), shape)

    def check_tensors(self, model_cfg: Any) -> None:
        """Every tensor the config implies is present, and nothing else is."""
        expected = {name for name, *_ in self.adapter.tensors(model_cfg, param_shapes(model_cfg))}
        present = set(self.tensors.names())
        if model_cfg.tie_embeddings:
            present.discard("lm_head.weight")  # some tied checkpoints still store it
        present = {n for n in present if not n.endswith("rotary_emb.inv_freq")}
        if expected - present:
            raise HFError(f"{self.folder}: missing tensors {sorted(expected - present)[:5]}")
        if present - expected:
            raise HFError(f"{self.folder}: unexpected tensors {sorted(present - expected)[:5]} "
                          "(a different architecture, or a config.json that does not match the weights)")


def read_hf_model(folder: str | Path) -> HFModel:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HFError(f"{config_path}: not found (is {folder} a Hugging Face model folder?)")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{config_path}: not valid JSON ({e})") from None
    adapter = adapter_for_hf(hf_config, str(config_path))
    return HFModel(folder, adapter, adapter.from_hf_config(hf_config, str(config_path)), st.SafetensorsFolder(folder))


def hf_run_config(hf: HFModel, base: str | Path = BASE_CONFIG, overrides: list[str] | None = None,
                  tokenizer: str | None = None) -> Config:
    """A full config for an HF model: `base` with the model section from config.json
    and the folder's tokenizer."""
    from maxllm.config import _apply_override, _merge_model_family

    raw = load_config(base).to_dict()
    _merge_model_family(raw, hf.model_section["family"])
    raw["model"] = {**raw["model"], **hf.model_section}
    raw["data"]["tokenizer"] = tokenizer or (str(hf.tokenizer_path) if hf.tokenizer_path else None)
    raw["data"]["seq_len"] = min(raw["data"]["seq_len"], hf.model_section["max_seq_len"])
    for item in overrides or []:
        _apply_override(raw, item)
    return config_from_dict(raw)


# ---------------------------------------------------------------------------------
# Loading for training, evaluation and serving


@dataclasses.dataclass
class Pretrained:
    config: Config
    params: Any  # nested dict of jax.Arrays


def is_hf_folder(path: str | Path) -> bool:
    return storage.isfile(storage.join(str(path), "config.json"))


def load_params(path: str | Path, model_cfg: LlamaConfig, shardings: Any | None = None) -> Any:
    """Parameters for `model_cfg` from a run directory (newest checkpoint), a
    checkpoint directory (or one step of it), or an HF folder; placed with
    `shardings` when given (a tree like the parameters), else on the default device."""
    from maxllm.checkpoint import StateReader, check_param_shapes

    path = str(path).rstrip("/")
    abstract = abstract_params(model_cfg)
    if shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    if is_hf_folder(path):
        hf = read_hf_model(_local(path))
        check_param_shapes(path, param_shapes(type(model_cfg)(**{**model_cfg.model_dump(), **hf.model_section})), abstract)
        hf.check_tensors(model_cfg)
        flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
        leaves = []
        for p, a in flat:
            value = hf.leaf(model_cfg, tuple(str(k.key) for k in p), a.shape)
            leaves.append(jax.device_put(value, a.sharding) if a.sharding is not None else jax.numpy.asarray(value))
        hf.tensors.close()
        return jax.tree_util.tree_unflatten(treedef, leaves)
    step = None
    parent, _, name = path.rpartition("/")
    if name.isdigit():
        path, step = parent or ".", int(name)
    elif storage.isdir(storage.join(path, "checkpoints")):
        path = storage.join(path, "checkpoints")
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    return StateReader(path, step).params(abstract)


def load_pretrained(path: str | Path, overrides: list[str] | None = None) -> Pretrained:
    """A run directory or an HF folder (local or gs://), as (config, parameters)."""
    if is_hf_folder(path):
        hf = read_hf_model(_local(path))
        cfg = hf_run_config(hf, overrides=overrides)
        hf.tensors.close()
    else:
        cfg = run_config(path, overrides)
    return Pretrained(cfg, load_params(path, cfg.model))
