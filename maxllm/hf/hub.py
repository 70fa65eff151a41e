"""Upload an exported folder to the Hugging Face Hub: create the repository (or
reuse it), then upload the folder in one commit. The folder's README.md is the
model card `export` wrote (training config and data)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Upload model exported by maxllm") -> str:
    """Returns the URL of the commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    log.info("uploading %s to %s", folder, getattr(repo, "repo_id", repo_id))
    commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                               commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))
