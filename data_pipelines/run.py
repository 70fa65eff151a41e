"""Corpus preparation entry point.

    python -m data_pipelines.run --config configs/data/web.yml [key=value ...]

Runs the steps the config lists over the input files with the configured executor
(a local process pool, or Ray), then prints a summary table. Rerunning the same
command resumes: finished tasks are skipped.
"""

from __future__ import annotations

import argparse
import sys

from data_pipelines.config import load_pipeline_config
from data_pipelines.pipeline import run, summary_table
from maxllm.cli import log_to_stderr
from maxllm.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="pipeline YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. executor.workers=4")
    args = parser.parse_args(argv)
    log_to_stderr("data_pipelines")
    try:
        cfg = load_pipeline_config(args.config, args.overrides)
        stats = run(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_table(stats))
    print(f"outputs in {cfg.output_dir}: kept/, rejected/, stats.json" + (", tokens/" if "tokenize" in stats else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
