"""Pretrained weights from the Hugging Face hub (timm's MNv4 checkpoints, ``timm/<arch>.<tag>``).

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

__all__ = ["download_weights"]

_CONNECT_TIMEOUT_S = 5.0


def download_weights(hub_id: str, filename: str = "model.safetensors") -> Path:
    """Fetch (or reuse from the local cache) one weights file of ``hub_id``."""
    try:
        from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    except ImportError:
        raise missing_extra("huggingface_hub", "hub") from None
    cached = try_to_load_from_cache(repo_id=hub_id, filename=filename)
    if isinstance(cached, str):
        return Path(cached)
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise MNv4Error(_no_weights(hub_id, filename, "HF_HUB_OFFLINE is set and they are not in the local cache"))
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise MNv4Error(_no_weights(hub_id, filename, f"{host} cannot be reached ({reason})")) from None
    try:
        return Path(hf_hub_download(repo_id=hub_id, filename=filename))
    except Exception as e:  # unknown repo, proxy errors, a connection lost mid-way
        raise MNv4Error(_no_weights(hub_id, filename, f"the download failed ({type(e).__name__})")) from None


def _no_weights(hub_id: str, filename: str, why: str) -> str:
    return (
        f"cannot get the pretrained weights {hub_id}: {why}. Download {filename} from "
        f"https://huggingface.co/{hub_id} on a machine with internet and pass it as `checkpoint`, "
        "or copy that machine's Hugging Face cache (~/.cache/huggingface) here"
    )
