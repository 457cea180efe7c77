"""Lay a checkpoint into a Hugging Face cache folder exactly as huggingface_hub does, for offline resolution."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def put_in_hf_cache(hf_home: Path, repo_id: str, source: Path, revision: str = "main") -> Path:
    """Copy `source` into HF_HOME/hub/models--owner--name/snapshots/<commit>/ with refs/<revision>."""
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot
