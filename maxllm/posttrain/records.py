"""Fine-tuning records: JSONL read, checked and tokenized with per-token loss masks.

SFT records (one JSON object per line) are either
- `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}`:
  rendered with the chat template; the model learns the assistant turns;
- `{"prompt": ..., "completion": ...}`: strings (the text is prompt + completion),
  or message lists (rendered together; the model learns the completion's turns).

DPO records are `{"prompt": ..., "chosen": ..., "rejected": ...}`: three strings,
or a message list for the prompt and assistant message lists for the answers.

Every sequence ends with the tokenizer's EOS (appended unless the text already
ends with it), learned whenever the text ends with a learned span, so the model
learns to stop. Nothing is truncated: a record that is malformed, has nothing to
learn, or does not fit in `data.seq_len` is reported with its file and line (and
the run stops, unless `posttrain.skip_bad_records` is set: then it is left out and
counted).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from maxllm.data.sources import DataError
from maxllm.posttrain.chat import ChatTemplate, TemplateError
from maxllm.tokenizer import HFTokenizer, Tokenizer

log = logging.getLogger("maxllm.posttrain")

ROLES = ("system", "user", "assistant", "tool")
SHOWN_PROBLEMS = 20


class RecordError(ValueError):
    """One record that cannot be used; the message says why (the caller adds where)."""


@functools.lru_cache(maxsize=4)
def _converted(sentencepiece_path: str) -> str:
    from maxllm.hf.tokenizer_files import sentencepiece_to_tokenizer_json

    return sentencepiece_to_tokenizer_json(sentencepiece_path)


class TextEncoder:
    """Token ids of a text and which of them fall in given character spans.

    Uses a `tokenizers` tokenizer (special tokens matched in the text, character
    offsets per token); a sentencepiece model is converted as the export does."""

    def __init__(self, tokenizer: Tokenizer):
        from tokenizers import Tokenizer as Fast

        if isinstance(tokenizer, HFTokenizer):
            self.fast = tokenizer.tok
        else:
            self.fast = Fast.from_str(_converted(tokenizer.path))
        self.eos_id = tokenizer.eos_id
        self.bos_id = tokenizer.bos_id
        self.eos_token = self.fast.id_to_token(tokenizer.eos_id) or ""
        self.bos_token = self.fast.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else ""

    def encode(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        """(ids, learned): a token is learned when it starts inside a span."""
        encoding = self.fast.encode(text, add_special_tokens=False)
        starts = np.array([start for start, _ in encoding.offsets], np.int64)
        learned = np.zeros(len(starts), bool)
        for lo, hi in spans:
            learned |= (starts >= lo) & (starts < hi)
        return list(encoding.ids), learned.tolist()


@dataclasses.dataclass
class Sequence:
    """One tokenized sequence: ids with EOS, and which ids are learned."""

    ids: list[int]
    learned: list[bool]
    prompt_tokens: int  # tokens before the first learned one

    def arrays(self) -> dict[str, np.ndarray]:
        ids = np.asarray(self.ids, np.int32)
        return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": np.asarray(self.learned[1:], np.int32)}


class Reader:
    """Turns records into sequences with one template and tokenizer, checked
    against the row length `seq_len` (a row holds seq_len + 1 tokens)."""

    def __init__(self, encoder: TextEncoder, template: ChatTemplate | None, seq_len: int,
                 missing_template: str | None = None):
        self.encoder = encoder
        self.template = template
        self.seq_len = seq_len
        self.missing_template = missing_template or "message lists need a chat template (posttrain.chat_template)"

    # -- one record -----------------------------------------------------------------

    def sft(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        if "messages" in record:
            messages = self._messages(record, "messages")
            if not any(m["role"] == "assistant" for m in messages):
                raise RecordError("the conversation has no assistant turn: nothing to learn")
            text, spans = self._chat().spans(messages)
        elif "prompt" in record or "completion" in record:
            text, spans = self._prompt_completion(record, "completion")
        else:
            raise RecordError(f"no `messages`, nor `prompt` and `completion` (keys: {', '.join(record) or 'none'})")
        return self._sequence(text, spans).arrays()

    def preference(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
        if missing:
            raise RecordError(f"missing {', '.join(f'`{k}`' for k in missing)} (keys: {', '.join(record) or 'none'})")
        out = {}
        for answer in ("chosen", "rejected"):
            text, spans = self._prompt_completion(record, answer)
            for key, value in self._sequence(text, spans).arrays().items():
                out[f"{answer}_{key}"] = value
        return out

    # -- pieces ---------------------------------------------------------------------

    def _chat(self) -> ChatTemplate:
        if self.template is None:
            raise RecordError(self.missing_template)
        return self.template

    def _messages(self, record: dict[str, Any], key: str) -> list[dict[str, str]]:
        messages = record[key]
        if not isinstance(messages, list) or not messages:
            raise RecordError(f"`{key}` must be a non-empty list of messages, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise RecordError(
                    f"`{key}[{i}]` must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}}, got {m!r:.80}"
                )
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    def _prompt_completion(self, record: dict[str, Any], answer: str) -> tuple[str, list[tuple[int, int]]]:
        for key in ("prompt", answer):
            if key not in record:
                raise RecordError(f"missing `{key}` (keys: {', '.join(record) or 'none'})")
        prompt, completion = record["prompt"], record[answer]
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion:
                raise RecordError(f"`{answer}` is empty: nothing to learn")
            return prompt + completion, [(len(prompt), len(prompt) + len(completion))]
        if isinstance(prompt, list) and isinstance(completion, list):
            before, after = self._messages(record, "prompt"), self._messages(record, answer)
            if any(m["role"] != "assistant" for m in after):
                raise RecordError(f"`{answer}` may hold assistant messages only")
            text, spans = self._chat().spans(before + after)
            return text, spans[len([m for m in before if m["role"] == "assistant"]):]
        raise RecordError(
            f"`prompt` and `{answer}` must both be strings or both message lists, "
            f"got {type(prompt).__name__} and {type(completion).__name__}"
        )

    def _sequence(self, text: str, spans: list[tuple[int, int]]) -> Sequence:
        ids, learned = self.encoder.encode(text, spans)
        if not ids or ids[-1] != self.encoder.eos_id:
            ids.append(self.encoder.eos_id)
            learned.append(bool(spans) and spans[-1][1] == len(text))
        if not any(learned[1:]):
            raise RecordError("no token to learn (the learned text is empty once tokenized)")
        prompt_tokens = learned.index(True)
        if prompt_tokens > self.seq_len:
            raise RecordError(
                f"the prompt alone is {prompt_tokens} tokens; data.seq_len={self.seq_len} leaves no room for the answer"
            )
        if len(ids) > self.seq_len + 1:
            raise RecordError(
                f"{len(ids)} tokens (prompt {prompt_tokens}) do not fit data.seq_len={self.seq_len} "
                f"(a row holds seq_len + 1 tokens); raise data.seq_len or shorten the record"
            )
        return Sequence(ids, learned, prompt_tokens)


# ---------------------------------------------------------------------------------
# Files


def jsonl_files(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    if not files or not all(Path(f).is_file() for f in files):
        raise DataError(f"{pattern}: no such file (fine-tuning records are JSONL files)")
    return files


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line); a line that is not UTF-8, or a file that cannot be
    read on (a truncated gzip), is a DataError naming the line."""
    opener = gzip.open if path.endswith(".gz") else open
    number = 0
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{number}: cannot be read (UnicodeDecodeError: {e})") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}:{number + 1}: cannot be read ({type(e).__name__}: {e})") from None


def read_records(pattern: str, convert, *, skip_bad: bool) -> list[dict[str, np.ndarray]]:
    """`convert(record)` over every non-blank line of the files `pattern` names.
    Problems are gathered with file:line; any stops the run unless `skip_bad`."""
    examples, problems = [], []
    for path in jsonl_files(pattern):
        for number, line in _lines(path):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise RecordError(f"expected a JSON object, got {type(record).__name__}")
                example = convert(record)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            except (RecordError, TemplateError) as e:
                problems.append(f"{where}: {e}")
                continue
            example["index"] = np.int32(len(examples))
            examples.append(example)
    if problems:
        shown = "\n  ".join(problems[:SHOWN_PROBLEMS])
        more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        summary = f"{len(problems)} of {len(problems) + len(examples)} records in {pattern} cannot be used:\n  {shown}{more}"
        if not skip_bad:
            raise DataError(f"{summary}\n(fix them, or set posttrain.skip_bad_records=true to leave them out)")
        log.warning("%s\nleft out (posttrain.skip_bad_records=true)", summary)
    if not examples:
        raise DataError(f"{pattern}: no usable records")
    return examples
