"""Pretrained weights from the Hugging Face hub (timm's MNv4 checkpoints, ``timm/<arch>.<tag>``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import MNv4Error, missing_extra

__all__ = ["download_weights"]


def download_weights(hub_id: str, filename: str = "model.safetensors") -> Path:
    """Fetch (or reuse from the local cache) one weights file of ``hub_id``."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise missing_extra("huggingface_hub", "hub") from None
    try:
        return Path(hf_hub_download(repo_id=hub_id, filename=filename))
    except Exception as e:  # offline, unknown repo, proxy errors: all end the same way for the user
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise MNv4Error(
            f"could not fetch weights {hub_id!r} from the Hugging Face hub ({type(e).__name__}: {reason}); "
            f"if you are offline, download {filename} from https://huggingface.co/{hub_id} elsewhere "
            "and pass checkpoint=PATH"
        ) from None
