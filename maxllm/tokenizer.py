"""One tokenizer interface over sentencepiece models (what data_pipelines trains)
and Hugging Face `tokenizer.json` files (imported models)."""

from __future__ import annotations

import abc
import json
from pathlib import Path


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names it."""


class Tokenizer(abc.ABC):
    """encode/decode plus the ids training and sampling need."""

    path: str
    vocab_size: int
    eos_id: int
    bos_id: int | None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @staticmethod
    def load(path: str | Path) -> "Tokenizer":
        """A sentencepiece `.model`, or a `tokenizer.json` (or a folder holding one);
        on gs://, read from a local copy."""
        from maxllm import storage

        if storage.is_remote(str(path)):
            url = str(path)
            path = storage.local_copy(storage.join(url, "tokenizer.json") if storage.isdir(url) else url)
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file not found")
        if path.suffix == ".json":
            return HFTokenizer(path)
        return SentencePieceTokenizer(path)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from None
        self.path = str(path)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


# Names end-of-sequence tokens go by in published tokenizers, most specific first.
_EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|im_end|>")


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json; EOS from tokenizer_config.json beside it when
    present, else the first of the usual EOS token names in the vocabulary."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _HF

        try:
            self.tok = _HF.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception on parse errors
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        self.path = str(path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        config = _read_json(path.parent / "tokenizer_config.json")
        self.eos_id = self._id(_token_name(config.get("eos_token")), path) if config.get("eos_token") else self._guess_eos(path)
        bos = _token_name(config.get("bos_token"))
        self.bos_id = self.tok.token_to_id(bos) if bos else None

    def _id(self, token: str, path: Path) -> int:
        token_id = self.tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{path}: eos token {token!r} from tokenizer_config.json is not in the vocabulary")
        return token_id

    def _guess_eos(self, path: Path) -> int:
        for name in _EOS_NAMES:
            token_id = self.tok.token_to_id(name)
            if token_id is not None:
                return token_id
        raise TokenizerError(f"{path}: no EOS token (none of {', '.join(_EOS_NAMES)}); add tokenizer_config.json")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def _token_name(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return json.loads(path.read_text())
