"""The unit every pipeline step sees."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict


@dataclass(slots=True)
class Document:
    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


class StepConfig(BaseModel):
    """Base of every step's config: frozen, unknown keys rejected. Each step config
    declares `type: Literal["<name>"]` and its parameters with datatrove's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DocumentStep(Protocol):
    """A per-document step (a filter, a formatter, language id).

    `__call__` returns None to keep the document (which it may edit in place, e.g.
    C4 drops lines, PII replaces spans, language id adds metadata) or a short rule
    name (e.g. "gopher_short_doc") to reject it; the pipeline records
    "<step type>/<rule>" as the reason.
    """

    type: ClassVar[str]

    def __call__(self, doc: Document) -> str | None: ...
