"""The JPEG encode/decode round trip of the paper's offline recipe (docs/distillation.md).

The teacher labels the *decoded* JPEG, and the student later decodes the same stored bytes with the
same decoder, so both see identical pixels; JPEG artefacts are part of what the teacher labels.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

__all__ = ["encode_jpeg", "decode_jpeg", "jpeg_roundtrip"]


def encode_jpeg(image: torch.Tensor, quality: int) -> bytes:
    """uint8 [3, H, W] -> JPEG bytes (PIL's encoder, 4:2:0 chroma subsampling like TF's encode_jpeg)."""
    arr = image.permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def decode_jpeg(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 [3, H, W]; the one decoder both the labeller and the student use."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def jpeg_roundtrip(image: torch.Tensor, quality: int) -> tuple[bytes, torch.Tensor]:
    data = encode_jpeg(image, quality)
    return data, decode_jpeg(data)
