"""Shared pieces of the command-line entry points."""

from __future__ import annotations

import logging
import sys


def log_to_stderr(package: str) -> None:
    """INFO lines of `package` on stderr, with a timestamp. Set on the package's own
    logger: some dependencies already configure the root logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger(package)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
