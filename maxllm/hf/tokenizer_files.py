"""Tokenizer files of an exported model folder.

A sentencepiece model (what data_pipelines trains) is exported as `tokenizer.model`
plus a `tokenizer.json` built here from the model's own settings (normalizer,
dummy prefix, whitespace splitting, byte fallback, user-defined symbols), so the
fast tokenizer gives the same ids as sentencepiece; transformers' generic Llama
conversion assumes Llama's settings and differs on, e.g., repeated spaces. A
`tokenizer.json` that came with an imported model is copied as it is, with its
`tokenizer_config.json` (chat template included).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# sentencepiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6
_BPE, _UNIGRAM = 2, 1


def sentencepiece_to_tokenizer_json(model_path: str | Path) -> str:
    """A `tokenizers` JSON equivalent to the sentencepiece model at `model_path`."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if trainer.model_type == _BPE:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        model = BPE(vocab, _bpe_merges(proto), unk_token=trainer.unk_piece, fuse_unk=True,
                    byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == _UNIGRAM:
        model = Unigram(pieces, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    else:
        raise ValueError(f"{model_path}: sentencepiece model type {trainer.model_type} is not BPE or unigram")
    tok = Tokenizer(model)

    # sentencepiece cuts out user-defined symbols before anything else, normalizes
    # the rest, writes spaces as "▁", adds one "▁" in front of the text, and splits
    # it into units that start at the first "▁" of a run (a run of "▁" stays with
    # the word after it); BPE or unigram runs within each unit.
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    prepend = "first" if norm.add_dummy_prefix else "never"
    splits = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)]
    if trainer.split_by_whitespace:
        splits.append(pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    parts = [decoders.Replace("▁", " ")]
    if trainer.byte_fallback:
        parts.append(decoders.ByteFallback())
    parts.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        parts.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(parts)
    # Control pieces (<s>, </s>) are special added tokens; user-defined symbols are
    # added tokens matched in the raw text, before normalization, as sentencepiece does.
    tok.add_tokens([
        AddedToken(p.piece, normalized=False, special=p.type == _CONTROL)
        for p in proto.pieces if p.type in (_CONTROL, _USER_DEFINED)
    ])
    return tok.to_str(pretty=True)


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """Merges ranked like sentencepiece's BPE picks them: by the merged piece's
    score, best first (then by the halves' ids, for a stable order)."""
    ids = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == _NORMAL or p.type == _USER_DEFINED}
    merges = []
    for piece, i in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((-proto.pieces[i].score, i, ids[left], ids[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def write_tokenizer(
    out: Path,
    tokenizer_path: str | Path,
    *,
    bos_id: int | None,
    eos_id: int,
    max_length: int,
    chat_template: str | None,
) -> list[str]:
    """Writes the tokenizer files into `out`; returns their names."""
    src = Path(tokenizer_path)
    written: list[str] = []
    if src.suffix == ".json" or src.is_dir():
        folder = src if src.is_dir() else src.parent
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out / name)
                written.append(name)
        config = json.loads((out / "tokenizer_config.json").read_text()) if "tokenizer_config.json" in written else {}
    else:
        shutil.copyfile(src, out / "tokenizer.model")
        (out / "tokenizer.json").write_text(sentencepiece_to_tokenizer_json(src))
        written += ["tokenizer.model", "tokenizer.json"]
        config = _sentencepiece_config(src, bos_id, eos_id, max_length)
    if chat_template is not None:
        config["chat_template"] = chat_template
    if config:
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if "tokenizer_config.json" not in written:
            written.append("tokenizer_config.json")
    return written


def _sentencepiece_config(path: Path, bos_id: int | None, eos_id: int, max_length: int) -> dict[str, Any]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "eos_token": sp.id_to_piece(eos_id),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if bos_id is not None:
        config["bos_token"] = sp.id_to_piece(bos_id)
    if sp.unk_id() >= 0:
        config["unk_token"] = sp.id_to_piece(sp.unk_id())
    return config
