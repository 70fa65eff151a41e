"""Export a run to a Hugging Face folder.

    python -m maxllm.export --run RUN_DIR [--step N] --out HF_DIR   (either may be gs://)
        [--dtype bfloat16|float32] [--max-shard-size 5GB] [--chat-template FILE]
        [--overwrite] [--push-to-hub REPO_ID [--private]]

Writes config.json (LlamaForCausalLM as transformers 5.x reads it),
generation_config.json, model.safetensors (or shards and an index), the tokenizer
(tokenizer.model + tokenizer.json + tokenizer_config.json) and a model card.
Tensors are read from the checkpoint and written one leaf at a time.
"""

from __future__ import annotations

import argparse
import sys

from maxllm.cli import log_to_stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maxllm.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory (holds config.yml and checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    parser.add_argument("--chat-template", default=None, help="a Jinja chat template file for tokenizer_config.json "
                        "(default: the run's chat_template.jinja, when it was fine-tuned with one)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    args = parser.parse_args(argv)
    log_to_stderr("maxllm")

    from maxllm import storage
    from maxllm.config import ConfigError
    from maxllm.data import DataError
    from maxllm.hf import HFError, export_run, push_to_hub

    try:
        if args.push_to_hub and storage.is_remote(args.out):
            raise HFError(f"--push-to-hub uploads a local folder; {args.out} is not one (export to a local --out)")
        template = None
        if args.chat_template:
            if not storage.isfile(args.chat_template):
                raise HFError(f"{args.chat_template}: chat template file not found")
            template = storage.read_text(args.chat_template)
        out = export_run(args.run, args.out, step=args.step, dtype=args.dtype, max_shard_size=args.max_shard_size,
                         chat_template=template, overwrite=args.overwrite)
        print(f"wrote {out}")
        if args.push_to_hub:
            print(f"uploaded: {push_to_hub(out, args.push_to_hub, private=args.private)}")
    except (HFError, ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
