"""Typed, frozen run configuration.

A run is described by one YAML file that inherits from others with `base:` (a path or
a list of paths, relative to the file), plus dotted command-line overrides such as
`train.steps=200`. `configs/base.yml` sets every key, with a comment; the classes
below give each key a type and no default, so a value has exactly one home.

Errors name the key path: an unknown key comes with the closest valid keys, a bad
value with what is allowed. They are raised as `ConfigError`, whose message is meant
to be printed as is.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, model_validator

MESH_AXES = ("data", "fsdp", "tensor", "sequence", "expert", "stage")


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the file or key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------
# Sections


class RunConfig(Section):
    name: str
    output_dir: str


class LlamaRopeScaling(Section):
    type: Literal["llama3"]
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: PositiveInt


RematPolicy = Literal["none", "full", "save_dots", "save_dots_no_batch", "minimal"]


class LlamaConfig(Section):
    """Llama 2/3 dense decoder: GQA, RoPE, SwiGLU, RMSNorm."""

    family: Literal["llama"]
    vocab_size: PositiveInt
    d_model: PositiveInt
    num_layers: PositiveInt
    num_heads: PositiveInt
    num_kv_heads: PositiveInt
    head_dim: PositiveInt | None  # None: d_model // num_heads
    mlp_dim: PositiveInt
    max_seq_len: PositiveInt
    rope_theta: float
    rope_scaling: LlamaRopeScaling | None
    norm_eps: float
    tie_embeddings: bool
    init_std: float
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    attention: Literal["xla", "cudnn", "splash"]
    context_parallel: Literal["all_gather", "ring"]  # attention when mesh.sequence > 1
    scan_layers: bool
    remat: RematPolicy

    @model_validator(mode="after")
    def _check_heads(self) -> "LlamaConfig":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads};"
                " set head_dim"
            )
        return self

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


class MoEConfig(Section):
    """The mixture-of-experts feed-forward of the `mixtral` family (docs/moe.md)."""

    num_experts: PositiveInt  # E, experts per layer (each a SwiGLU of width model.mlp_dim)
    top_k: PositiveInt  # experts each token goes to
    dispatch: Literal["auto", "dropless", "capacity"]
    capacity_factor: float  # capacity: slots per expert = ceil(top_k * tokens * factor / E)
    aux_loss_coef: float  # load-balancing loss weight (Switch: E * sum_e f_e * P_e)
    z_loss_coef: float  # router z-loss weight (ST-MoE: mean logsumexp(router logits)^2)

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        return self


class MixtralConfig(LlamaConfig):
    """Mixtral: the Llama decoder with a routed mixture of SwiGLU experts as its MLP."""

    family: Literal["mixtral"]  # type: ignore[assignment]
    moe: MoEConfig


class MambaConfig(Section):
    """Mamba-1 (`MambaForCausalLM`): selective state-space blocks, no attention."""

    family: Literal["mamba"]
    vocab_size: PositiveInt
    d_model: PositiveInt
    num_layers: PositiveInt
    ssm_inner: PositiveInt | None  # I, inner width; None: 2 * d_model (Mamba's expand=2)
    ssm_state: PositiveInt  # G, state size per inner channel (16)
    conv_kernel: PositiveInt  # width of the depthwise causal convolution (4)
    dt_rank: PositiveInt | None  # rank of the step-size projection; None: ceil(d_model / 16)
    dt_min: float  # initial step sizes are log-uniform in [dt_min, dt_max]
    dt_max: float
    dt_init_floor: float
    scan_chunk: PositiveInt  # training scan: sequential over chunks, parallel within one
    max_seq_len: PositiveInt
    norm_eps: float
    tie_embeddings: bool
    init_std: float
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    scan_layers: bool
    remat: RematPolicy

    @property
    def inner(self) -> int:
        return self.ssm_inner or 2 * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank or -(-self.d_model // 16)


FAMILY_CONFIGS: dict[str, type[Section]] = {"llama": LlamaConfig, "mixtral": MixtralConfig, "mamba": MambaConfig}

ModelConfig = typing.Annotated[LlamaConfig | MixtralConfig | MambaConfig, Field(discriminator="family")]

AxisSpec = str | list[str] | None


class ShardingRules(Section):
    params: dict[str, AxisSpec]
    activations: dict[str, AxisSpec]

    @model_validator(mode="after")
    def _known_axes(self) -> "ShardingRules":
        for table_name in ("params", "activations"):
            for logical, axes in getattr(self, table_name).items():
                names = [axes] if isinstance(axes, str) else list(axes or [])
                for axis in names:
                    if axis not in MESH_AXES:
                        raise ValueError(
                            f"rule {table_name}.{logical} names mesh axis {axis!r}; "
                            f"mesh axes are {', '.join(MESH_AXES)}"
                        )
        return self


class MeshConfig(Section):
    data: int
    fsdp: int
    tensor: int
    sequence: int
    expert: int
    stage: int
    rules: ShardingRules

    @model_validator(mode="after")
    def _sizes(self) -> "MeshConfig":
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        fills = [a for a, s in sizes.items() if s == -1]
        if len(fills) > 1:
            raise ValueError(f"only one axis may be -1, got {', '.join(fills)}")
        for axis, size in sizes.items():
            if size == 0 or size < -1:
                raise ValueError(f"mesh.{axis}={size}: a size is a positive int or -1")
        return self


class MixtureEntry(Section):
    path: str  # a data_pipelines tokens/ folder (or its manifest.json)
    weight: float

    @model_validator(mode="after")
    def _positive(self) -> "MixtureEntry":
        if not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")
        return self


class SeqioConfig(Section):
    task: str | None  # a registered seqio Task or Mixture
    split: str
    module: str | None  # imported first, to register the task
    feature: str  # the feature holding token ids
    add_eos: bool  # append EOS (the task's vocabulary's) when the task does not


class DataConfig(Section):
    source: Literal["synthetic", "tokens", "mixture", "text", "seqio"]
    seq_len: PositiveInt
    path: str | None  # tokens: a tokens/ folder; text: .jsonl[.gz]/.txt file or glob
    text_field: str
    tokenizer: str | None  # text (and override for others): sentencepiece .model or tokenizer.json
    add_eos: bool
    mixture: list[MixtureEntry]
    packing: Literal["first_fit", "concat_split"]
    packing_bins: PositiveInt | None  # first_fit: open rows; None: 4 x rows per process
    shuffle: bool
    shuffle_window: NonNegativeInt  # document pieces shuffled together before packing; 0: off
    num_workers: NonNegativeInt
    eval_path: str | None
    seqio: SeqioConfig

    @model_validator(mode="after")
    def _source_needs(self) -> "DataConfig":
        if self.source in ("tokens", "text") and not self.path:
            raise ValueError(f"source={self.source} needs data.path")
        if self.source == "mixture" and len(self.mixture) < 1:
            raise ValueError("source=mixture needs data.mixture: a list of {path, weight}")
        if self.source == "seqio" and not self.seqio.task:
            raise ValueError("source=seqio needs data.seqio.task")
        return self


class TrainConfig(Section):
    objective: Literal["pretrain", "sft", "dpo"]
    steps: PositiveInt
    seed: int
    init_from: str | None  # a run directory, a checkpoint directory or a Hugging Face folder
    global_batch_size: PositiveInt
    grad_accum_steps: PositiveInt
    microbatches: PositiveInt | None  # pipeline microbatches (mesh.stage > 1); None: mesh.stage
    pipeline_repeats: PositiveInt  # > 1: a circular pipeline, each stage holding this many chunks
    lr: float
    schedule: Literal["cosine", "wsd", "constant"]
    warmup_steps: NonNegativeInt
    decay_fraction: float  # wsd: last fraction of steps spent decaying
    min_lr_ratio: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    clip_grad_norm: float | None
    z_loss: float
    max_bad_steps: PositiveInt  # consecutive steps with a NaN/Inf loss or gradient before the run stops

    @model_validator(mode="after")
    def _accum(self) -> "TrainConfig":
        if self.global_batch_size % self.grad_accum_steps:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by "
                f"grad_accum_steps={self.grad_accum_steps}"
            )
        return self


class PosttrainConfig(Section):
    """Records and templates of the fine-tuning objectives (docs/finetuning.md)."""

    chat_template: str | None  # null: init_from's or the tokenizer's; chatml | llama3 | zephyr | a .jinja file
    packing: bool  # sft: several examples per row, never attending to each other
    skip_bad_records: bool  # leave out (and count) records that cannot be used, instead of stopping


class DPOConfig(Section):
    beta: float
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo"]
    label_smoothing: float  # sigmoid (conservative DPO) and robust: the assumed fraction of flipped labels
    precompute_ref: bool  # reference log-probs computed once before training, instead of a frozen model

    @model_validator(mode="after")
    def _check(self) -> "DPOConfig":
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        return self


class CheckpointConfig(Section):
    enabled: bool
    dir: str | None  # None: <run.output_dir>/checkpoints
    every_steps: PositiveInt
    max_to_keep: PositiveInt | None
    async_save: bool


class LoggingConfig(Section):
    every_steps: PositiveInt
    jsonl: bool
    tensorboard: bool


class SampleConfig(Section):
    prompts: list[str]
    max_new_tokens: PositiveInt


class EvalConfig(Section):
    every_steps: PositiveInt | None  # None: only after the last step
    tasks: list[str]  # as `python -m maxllm.eval --tasks` names them
    num_fewshot: NonNegativeInt
    limit: PositiveInt | None
    batch_size: PositiveInt
    seed: int


class Config(Section):
    run: RunConfig
    model: ModelConfig
    mesh: MeshConfig
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    eval: EvalConfig
    sample: SampleConfig
    posttrain: PosttrainConfig
    dpo: DPOConfig

    @model_validator(mode="after")
    def _lengths(self) -> "Config":
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        return self

    @model_validator(mode="after")
    def _objective_data(self) -> "Config":
        fine_tuning = self.train.objective != "pretrain"
        if fine_tuning and self.data.source != "text":
            raise ValueError(
                f"train.objective={self.train.objective} reads JSONL records: set data.source=text "
                f"and data.path (got data.source={self.data.source})"
            )
        if self.data.source == "text" and not self.data.tokenizer and not (fine_tuning and self.train.init_from):
            raise ValueError("source=text needs data.tokenizer (a sentencepiece .model or tokenizer.json)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------
# Loading


def load_config(
    path: str | Path | list[str | Path],
    overrides: list[str] | tuple[str, ...] = (),
    schema: type[BaseModel] = Config,
) -> Any:
    """Reads `path` with its `base:` chain, applies `a.b=value` overrides, validates
    against `schema` (the training `Config` unless another tool passes its own).

    A list of paths merges them in order, as a `base:` list does, e.g.
    `load_config(["configs/base.yml", "configs/models/smollm-135m.yml"])`.
    """
    raw: dict[str, Any] = {}
    for one in path if isinstance(path, list) else [path]:
        data = _read_with_bases(Path(one), seen=())
        _merge_model_family(raw, (data.get("model") or {}).get("family"))
        _deep_merge(raw, data)
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw, schema)


def config_from_dict(raw: dict[str, Any], schema: type[BaseModel] = Config) -> Any:
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e, schema)) from None


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"{path}: `base:` loops back on itself ({chain})")
    if not path.is_file():
        where = f" (named by `base:` in {seen[-1]})" if seen else ""
        raise ConfigError(f"{path}: config file not found{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in [*(_read_with_bases(path.parent / b, (*seen, path)) for b in bases), data]:
        _merge_model_family(merged, (base.get("model") or {}).get("family"))
        _deep_merge(merged, base)
    return merged


def _merge_model_family(raw: dict[str, Any], family: Any) -> None:
    """Before `model.family` changes to `family`, drops the inherited model keys
    that family does not have: base.yml's Llama defaults (num_heads, ...) do not
    reach a Mamba model, while the keys both share (d_model, dtype, ...) do. Keys
    set together with the new family are still checked."""
    model = raw.get("model")
    if not isinstance(model, dict) or family not in FAMILY_CONFIGS or model.get("family") in (None, family):
        return
    fields = FAMILY_CONFIGS[family].model_fields
    raw["model"] = {k: v for k, v in model.items() if k in fields}


def _deep_merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.path=value")
    if key == "model.family":
        _merge_model_family(raw, text.strip())
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section"
            )
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        node[parts[-1]] = text


def _describe(error: ValidationError, schema: type[BaseModel]) -> str:
    lines = []
    for err in error.errors():
        loc = [str(p) for p in err["loc"]]
        # Pydantic appends the union member or validator name for some errors.
        loc = [p for p in loc if not p.startswith(("function-", "str", "list[", "none"))]
        raw_loc, loc = loc, _drop_tags(schema, loc)
        path = ".".join(loc) or "<config>"
        kind = err["type"]
        if kind == "union_tag_invalid":
            ctx = err["ctx"]
            key = ".".join([*loc, ctx["discriminator"].strip("'")])
            lines.append(f"config key {key!r}: {ctx['tag']!r} is not one of {ctx['expected_tags']}")
        elif kind == "extra_forbidden":
            valid = _fields_at(schema, raw_loc[:-1])
            close = difflib.get_close_matches(loc[-1], valid, n=2, cutoff=0.6)
            parent = ".".join(loc[:-1])
            named = [f"'{parent}.{c}'" if parent else f"'{c}'" for c in close]
            hint = f"; did you mean {' or '.join(named)}?" if close else ""
            lines.append(
                f"unknown config key {path!r}{hint} (valid keys here: {', '.join(valid)})"
            )
        elif kind == "missing":
            hint = ", or inherit configs/base.yml with `base:`" if schema is Config else ""
            lines.append(f"config key {path!r} is missing: set it{hint}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"config key {path!r}: {msg} (got {err.get('input')!r})")
    return "\n".join(lines)


_TAGS = ("type", "family")  # fields that pick a member of a union of sections


def _drop_tags(schema: type[BaseModel], loc: list[str]) -> list[str]:
    """`loc` without the union tags pydantic inserts (model.mixtral.moe -> model.moe)."""
    out, node = [], schema
    for part in loc:
        child = _child(node, part) if node is not None else None
        if child is not None and child is not node and _is_tag_of(node, part):
            node = child
            continue
        out.append(part)
        node = child
    return out


def _is_tag_of(node: Any, part: str) -> bool:
    for member in _members(node):
        if isinstance(member, type) and issubclass(member, BaseModel) and part not in member.model_fields:
            for tag in _TAGS:
                field = member.model_fields.get(tag)
                if field is not None and part in getattr(field.annotation, "__args__", ()):
                    return True
    return False


def _fields_at(schema: type[BaseModel], loc: list[str]) -> list[str]:
    """Valid field names of the section at `loc`, for did-you-mean hints. Steps
    through optional sections, list items, and tagged unions (`type: ...`)."""
    node: Any = schema
    for part in loc:
        node = _child(node, part)
        if node is None:
            return []
    models = [m for m in _members(node) if isinstance(m, type) and issubclass(m, BaseModel)]
    return list(models[0].model_fields) if len(models) == 1 else []


def _child(node: Any, part: str) -> Any:
    for member in _members(node):
        if isinstance(member, type) and issubclass(member, BaseModel):
            if part in member.model_fields:
                return member.model_fields[part].annotation
            for tag_name in _TAGS:
                tag = member.model_fields.get(tag_name)
                if tag is not None and part in getattr(tag.annotation, "__args__", ()):
                    return member  # a tagged union member, named by its tag
        elif typing.get_origin(member) is list and part.isdigit():
            return typing.get_args(member)[0]
    return None


def _members(node: Any) -> list[Any]:
    """The alternatives of an Optional/Union/Annotated annotation (or the node)."""
    if typing.get_origin(node) is typing.Annotated:
        return _members(typing.get_args(node)[0])
    if typing.get_origin(node) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(node) for m in _members(arg)]
    return [node]
