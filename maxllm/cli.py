"""Shared pieces of the command-line entry points."""

from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each record, not as it was when the
    handler was made (a test's captured stream is closed after the test)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def log_to_stderr(package: str) -> None:
    """INFO lines of `package` on stderr, with a timestamp. Set on the package's own
    logger: some dependencies already configure the root logger."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger(package)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
