"""Import a Hugging Face model folder as a maxllm run directory.

    python -m maxllm.import_hf --hf HF_DIR --out RUN_DIR [--config BASE.yml] [key=value ...]

Writes RUN_DIR/config.yml (the base config with the model section read from
config.json and the tokenizer copied to RUN_DIR/tokenizer/) and an Orbax checkpoint
RUN_DIR/checkpoints/0 holding the parameters (float32). Training continues from it
with `train.init_from=RUN_DIR` (or by training in RUN_DIR itself); evaluation and
serving load the run directory or the HF folder directly.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from maxllm.cli import log_to_stderr

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def import_hf(hf_dir: str | Path, out: str | Path, *, base: str | Path | None = None,
              overrides: list[str] | None = None) -> Path:
    import jax
    import orbax.checkpoint as ocp

    from maxllm.hf.adapters import HFError
    from maxllm.hf.convert import BASE_CONFIG, hf_run_config, load_params, read_hf_model

    hf_dir, out = Path(hf_dir), Path(out).absolute()
    if (out / "checkpoints").exists():
        raise HFError(f"{out}: already holds checkpoints; import into a new directory")
    hf = read_hf_model(hf_dir)
    tokenizer = None
    names = [n for n in TOKENIZER_FILES if (hf_dir / n).is_file()]
    if names:
        (out / "tokenizer").mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(hf_dir / name, out / "tokenizer" / name)
        main = "tokenizer.model" if "tokenizer.model" in names else "tokenizer.json"
        tokenizer = str(out / "tokenizer" / main) if main in names else None
    cfg = hf_run_config(hf, base or BASE_CONFIG, [f"run.output_dir={out}", f"run.name={out.name}", *(overrides or [])],
                        tokenizer=tokenizer)
    hf.tensors.close()
    params = load_params(hf_dir, cfg.model)
    out.mkdir(parents=True, exist_ok=True)
    with ocp.CheckpointManager(out / "checkpoints", options=ocp.CheckpointManagerOptions(create=True),
                               item_handlers={"state": ocp.StandardCheckpointHandler(),
                                              "config": ocp.JsonCheckpointHandler()}) as manager:
        manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params}),
                                                config=ocp.args.JsonSave(cfg.to_dict())))
        manager.wait_until_finished()
    (out / "config.yml").write_text(cfg.to_yaml())
    del params
    jax.clear_caches()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maxllm.import_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf", required=True, help="Hugging Face model folder (config.json, *.safetensors)")
    parser.add_argument("--out", required=True, help="run directory to create")
    parser.add_argument("--config", default=None, help="base config for the non-model sections (default configs/base.yml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.remat=none")
    args = parser.parse_args(argv)
    log_to_stderr("maxllm")

    from maxllm.config import ConfigError
    from maxllm.hf import HFError

    try:
        out = import_hf(args.hf, args.out, base=args.config, overrides=args.overrides)
    except (HFError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (config.yml, checkpoints/0); train from it with train.init_from={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
