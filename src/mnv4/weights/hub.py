"""Weights from the Hugging Face hub: timm's MNv4 checkpoints (``timm/<arch>.<tag>``) and whole model
repositories in the hub layout (``hf-hub:OWNER/REPO``, see :mod:`mnv4.weights.hub_config`)."""

from __future__ import annotations

from pathlib import Path

from ..errors import MNv4Error, missing_extra

__all__ = ["download_weights", "download_repo", "HUB_PREFIX", "REPO_FILES"]

HUB_PREFIX = "hf-hub:"
# What a model repository needs: the weights and the config that names the architecture.
REPO_FILES = ("config.json", "model.safetensors")


def _hf_hub_download():
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise missing_extra("huggingface_hub", "hub") from None
    return hf_hub_download


def _fetch(hub_id: str, filename: str, revision: str | None = None) -> Path:
    download = _hf_hub_download()
    try:
        return Path(download(repo_id=hub_id, filename=filename, revision=revision))
    except Exception as e:  # offline, unknown repo, proxy errors: all end the same way for the user
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise MNv4Error(
            f"could not fetch {filename} of {hub_id!r} from the Hugging Face hub ({type(e).__name__}: {reason}); "
            f"if you are offline, download it from https://huggingface.co/{hub_id} elsewhere "
            "and pass checkpoint=PATH"
        ) from None


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
