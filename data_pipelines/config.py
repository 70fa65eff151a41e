"""The corpus pipeline's config: YAML (with `base:`) plus `key=value` overrides, the
same loader and error messages as training (`maxllm.config.load_config`).

Stable keys: `input.paths`, `input.text_field`, `input.id_field`, `output_dir`,
`executor.kind`, `executor.workers`, and `steps`, a list of `{type: ..., <params>}`
whose types are those in `STEP_TYPES` (the order of the list is the order they run).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from data_pipelines.document import StepConfig
from data_pipelines.filters.language import LanguageConfig
from data_pipelines.filters.pii import PIIConfig
from data_pipelines.filters.quality import (
    C4QualityConfig,
    FineWebQualityConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
)
from data_pipelines.filters.url import URLFilterConfig
from maxllm.config import Section, load_config


class ExactDedupConfig(StepConfig):
    """Drops documents whose normalized text (lowercased, numbers, punctuation and
    whitespace normalized, accents stripped) equals an earlier document's."""

    type: Literal["exact_dedup"]
    partitions: PositiveInt = 16  # hash-range partitions of the on-disk buckets


class MinhashDedupConfig(StepConfig):
    """MinHash LSH near-dedup: word n-gram shingles of the normalized text, `bands`
    bands of `rows` 64-bit hashes, union-find over colliding documents, the first
    document (in input order) of each cluster kept. Defaults are datatrove's."""

    type: Literal["minhash_dedup"]
    n_grams: PositiveInt = 5
    bands: PositiveInt = 14
    rows: PositiveInt = 8
    seed: int = 1
    partitions: PositiveInt = 16  # hash-range partitions of each band's bucket files


class TrainTokenizerConfig(StepConfig):
    """Trains a sentencepiece model on the kept text (or takes an existing one)."""

    type: Literal["train_tokenizer"]
    model: str | None = None  # an existing .model: skip training and use it
    vocab_size: PositiveInt = 32000
    model_type: Literal["bpe", "unigram"] = "bpe"
    byte_fallback: bool = True
    character_coverage: float = 0.9995
    special_tokens: list[str] = []  # user-defined symbols, e.g. ["<|im_start|>", "<|im_end|>"]
    max_documents: PositiveInt = 200_000  # documents sampled (by seed) to train on
    max_document_chars: PositiveInt = 100_000


class TokenizeConfig(StepConfig):
    """Tokenizes kept documents into ArrayRecord shards: one record per document
    (uint32 little-endian ids, EOS appended), globally shuffled by `seed`."""

    type: Literal["tokenize"]
    shards: PositiveInt = 8
    add_eos: bool = True
    seed: int = 0


StepUnion = Annotated[
    Union[
        URLFilterConfig,
        LanguageConfig,
        GopherQualityConfig,
        GopherRepetitionConfig,
        C4QualityConfig,
        FineWebQualityConfig,
        PIIConfig,
        ExactDedupConfig,
        MinhashDedupConfig,
        TrainTokenizerConfig,
        TokenizeConfig,
    ],
    Field(discriminator="type"),
]

STEP_TYPES = (
    "url_filter", "language", "gopher_quality", "gopher_repetition", "c4_quality",
    "fineweb_quality", "pii", "exact_dedup", "minhash_dedup", "train_tokenizer", "tokenize",
)


class InputConfig(Section):
    paths: list[str]  # globs: .jsonl[.gz|.zst], .parquet, .warc[.gz], .txt files or directories; local or gs://
    text_field: str = "text"
    id_field: str = "id"  # missing ids become "<file>:<line>"
    format: Literal["auto", "jsonl", "parquet", "text", "warc"] = "auto"
    max_doc_chars: PositiveInt = 1_000_000  # longer documents are rejected as read/too_large
    parts_per_file: PositiveInt | None = None  # None: enough parts to give every worker a task


class RayConfig(Section):
    address: str | None = None  # None: start a local Ray instance


class ExecutorConfig(Section):
    kind: Literal["local", "ray"] = "local"
    workers: PositiveInt | None = None  # None: one per CPU core
    ray: RayConfig = RayConfig()

    @property
    def num_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


class PipelineConfig(Section):
    input: InputConfig
    output_dir: str
    executor: ExecutorConfig = ExecutorConfig()
    steps: list[StepUnion]
    write_rejected: bool = True
    progress: bool = True
    seed: NonNegativeInt = 0  # shuffles documents for tokenizer training samples

    @model_validator(mode="after")
    def _order(self) -> "PipelineConfig":
        types = [s.type for s in self.steps]
        if "tokenize" in types:
            after = types[types.index("tokenize") + 1 :]
            if after:
                raise ValueError(f"tokenize must be the last step, found {after} after it")
            trainers = [s for s in self.steps if s.type == "train_tokenizer"]
            if not trainers:
                raise ValueError("tokenize needs a train_tokenizer step before it (it may name an existing model)")
        if len(set(types)) != len(types):
            raise ValueError(f"a step type appears twice: {types}")
        return self


def load_pipeline_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    return load_config(path, overrides, schema=PipelineConfig)


def step_params(step: StepConfig) -> dict[str, Any]:
    return step.model_dump(exclude={"type"})
