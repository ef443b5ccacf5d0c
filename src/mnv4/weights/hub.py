"""Weights from the Hugging Face hub: timm's MNv4 checkpoints (``timm/<arch>.<tag>``) and whole model
repositories in the hub layout (``hf-hub:OWNER/REPO``, see :mod:`mnv4.weights.hub_config`).

The local cache is looked at first; a file not in it needs the network, which is checked once (one
connection, a few seconds at most) before downloading, because the hub client retries an unreachable
host for about 25 s before failing.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from ..errors import MNv4Error, missing_extra

__all__ = ["download_weights", "download_repo", "HUB_PREFIX", "REPO_FILES"]

HUB_PREFIX = "hf-hub:"
# What a model repository needs: the weights and the config that names the architecture.
REPO_FILES = ("config.json", "model.safetensors")
_CONNECT_TIMEOUT_S = 5.0


def _fetch(hub_id: str, filename: str, revision: str | None = None) -> Path:
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise missing_extra("huggingface_hub", "hub") from None
    try:
        return Path(hf_hub_download(repo_id=hub_id, filename=filename, revision=revision, local_files_only=True))
    except Exception:  # not in the cache (or the cache is unreadable): the network decides
        pass
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise MNv4Error(_not_fetched(hub_id, filename, "HF_HUB_OFFLINE is set and it is not in the local cache"))
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise MNv4Error(_not_fetched(hub_id, filename, f"{host} cannot be reached ({reason})")) from None
    try:
        return Path(hf_hub_download(repo_id=hub_id, filename=filename, revision=revision))
    except Exception as e:  # unknown repo, proxy errors, a connection lost mid-way
        raise MNv4Error(_not_fetched(hub_id, filename, f"the download failed ({type(e).__name__})")) from None


def _not_fetched(hub_id: str, filename: str, why: str) -> str:
    return (
        f"cannot get {filename} of {hub_id} from the Hugging Face hub: {why}. Download it from "
        f"https://huggingface.co/{hub_id} on a machine with internet and pass checkpoint=PATH (--checkpoint), "
        "or copy that machine's Hugging Face cache (~/.cache/huggingface) here"
    )


def download_weights(hub_id: str, filename: str = "model.safetensors") -> Path:
    """Fetch (or reuse from the local cache) one weights file of ``hub_id``."""
    return _fetch(hub_id, filename)


def download_repo(repo: str) -> Path:
    """Fetch ``config.json`` and ``model.safetensors`` of ``OWNER/REPO[@REVISION]``; returns the local
    folder holding both (the hub cache's snapshot), which ``create_model(checkpoint=...)`` reads."""
    repo_id, _, revision = repo.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise MNv4Error(f"hf-hub:{repo} is not a hub model id; write hf-hub:OWNER/REPO (optionally @REVISION)")
    paths = [_fetch(repo_id, name, revision or None) for name in REPO_FILES]
    return paths[0].parent
