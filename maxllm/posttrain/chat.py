"""Chat templates: which one a run uses, rendering, and the tokenizer that reads
the rendered text.

A template is Jinja, as in Hugging Face's `tokenizer_config.json`: it sees
`messages` (dicts with `role` and `content`), `add_generation_prompt`,
`bos_token` and `eos_token`. `posttrain.chat_template` names one:
- null: the template of the run being fine-tuned (`chat_template.jinja` in the
  `train.init_from` run directory), else the tokenizer's own (`chat_template` in
  the `tokenizer_config.json` beside its tokenizer.json);
- `chatml`, `llama3`, `zephyr`: the built-ins below;
- a path to a `.jinja` file.

The template a run trained with is saved as `<run.output_dir>/chat_template.jinja`;
the export writes it into the HF folder's `tokenizer_config.json`, so
`transformers` and the server render prompts exactly as training did.

Training reads the rendered text with a `tokenizers` tokenizer whose special tokens
(`</s>`, `<|im_end|>`, ...) are matched in the text: a sentencepiece model is
converted (as the export converts it), so the ids are the ones the exported
tokenizer produces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox

BUILTIN_TEMPLATES = {
    # SmolLM2-Instruct, Qwen: <|im_start|>role\n...<|im_end|>\n
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama 3 Instruct.
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Zephyr: every turn ends with the tokenizer's EOS, so answers end with it.
    "zephyr": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}

TEMPLATE_FILE = "chat_template.jinja"  # in a run directory


class TemplateError(ValueError):
    """A chat template that cannot be found or used; the message says which."""


def resolve_template(spec: str | None, *, tokenizer_path: str | None, init_from: str | None) -> tuple[str, str]:
    """(template source, where it came from) for `posttrain.chat_template`."""
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec], f"built-in {spec}"
    if spec is not None:
        path = Path(spec)
        if not path.is_file():
            raise TemplateError(
                f"posttrain.chat_template={spec!r}: not a file, nor one of {', '.join(BUILTIN_TEMPLATES)}"
            )
        return path.read_text(), str(path)
    if init_from is not None:
        run_dir = find_run_dir(init_from)
        if run_dir is not None and (run_dir / TEMPLATE_FILE).is_file():
            return (run_dir / TEMPLATE_FILE).read_text(), str(run_dir / TEMPLATE_FILE)
    template = tokenizer_template(tokenizer_path)
    if template is not None:
        return template, f"{Path(tokenizer_path).parent / 'tokenizer_config.json'}"
    raise TemplateError(
        "records with `messages` need a chat template, and neither the tokenizer "
        f"({tokenizer_path}) nor train.init_from brings one: set posttrain.chat_template to "
        f"{', '.join(BUILTIN_TEMPLATES)} or a .jinja file"
    )


def find_run_dir(path: str | Path) -> Path | None:
    """The run directory `path` is, or holds a checkpoint of (checkpoints/ or checkpoints/N)."""
    path = Path(path)
    return next((p for p in (path, *path.parents[:2]) if (p / "config.yml").is_file()), None)


def tokenizer_template(tokenizer_path: str | None) -> str | None:
    """The `chat_template` of the tokenizer_config.json beside a tokenizer file."""
    if tokenizer_path is None:
        return None
    folder = Path(tokenizer_path)
    config = (folder if folder.is_dir() else folder.parent) / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _raise(message: str):
    raise TemplateError(f"the chat template refuses this conversation: {message}")


class ChatTemplate:
    """A compiled template with the tokenizer's BOS and EOS strings bound."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise  # what HF templates call on a conversation they refuse
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template does not compile: {e}") from None
        self.source = source
        self.special = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special)
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template failed: {e}") from None

    def spans(self, messages: list[dict[str, Any]], trained_roles: tuple[str, ...] = ("assistant",)) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation's text and the character spans the model learns:
        each assistant turn as the template writes it after the generation prompt
        (its content and end-of-turn marker).

        Found by rendering prefixes of the conversation, so the template must
        render a prefix of a conversation as a prefix of its text (every common
        template does; one that rewrites earlier turns is refused)."""
        text = self.render(messages)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] not in trained_roles:
                continue
            before, through = self.render(messages[:k], add_generation_prompt=True), self.render(messages[: k + 1])
            if not through.startswith(before) or not text.startswith(through):
                raise TemplateError(
                    "the chat template renders an earlier part of a conversation differently from the "
                    "whole, so the assistant's tokens cannot be told apart; use a template that only appends"
                )
            spans.append((len(before), len(through)))
        return text, spans
