"""Mobile-ready artefact inputs: NHWC layout, uint8 pixels with the normalisation in the graph, fixed
or dynamic batch.

A phone camera hands over HWC uint8 pixels; an artefact that takes them directly saves the app a
transpose and a float pass over every frame. :class:`InputFormat` describes what the artefact's
input is, :func:`InputFormat.wrap` puts the conversion in front of the network (a transpose, a cast
and one multiply-add per channel: ``x * 1/(255 std) - mean/std``, which is ``ToDtype(scale=True)``
followed by ``Normalize(mean, std)`` of :mod:`mnv4.data.transforms`), and :func:`InputFormat.to_raw`
/ :func:`InputFormat.to_model` map check inputs between the two sides, so parity compares the
artefact given raw pixels with the float model given the normalised pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .requests import INPUT_DTYPES, LAYOUTS, parse_batch  # torch-free: the CLI builds its flags from them

__all__ = ["LAYOUTS", "INPUT_DTYPES", "InputFormat", "RawInputModel", "parse_batch"]


@dataclass(frozen=True)
class InputFormat:
    layout: str = "nchw"
    dtype: str = "float32"
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)

    @property
    def plain(self) -> bool:
        """The artefact takes the model's own input (NCHW, normalised float)."""
        return self.layout == "nchw" and self.dtype == "float32"

    def describe(self) -> str:
        what = "uint8 pixels 0-255, normalisation in the graph" if self.dtype == "uint8" else "normalised float32"
        return f"{self.layout.upper()} {what}"

    def _affine(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean[:channels], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std[:channels], dtype=torch.float32).view(1, -1, 1, 1)
        return 1.0 / (255.0 * std), -mean / std

    def to_raw(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised NCHW float -> what the artefact takes (uint8 rounds to the nearest pixel value)."""
        if self.dtype == "uint8":
            scale, shift = self._affine(x.shape[1])
            x = ((x - shift) / scale).round().clamp(0, 255).to(torch.uint8)
        return x.permute(0, 2, 3, 1).contiguous() if self.layout == "nhwc" else x

    def to_model(self, raw: torch.Tensor) -> torch.Tensor:
        """What the artefact takes -> the model's NCHW float input, by the arithmetic the graph does."""
        x = raw.permute(0, 3, 1, 2) if self.layout == "nhwc" else raw
        if self.dtype == "uint8":
            scale, shift = self._affine(x.shape[1])
            x = x.float() * scale + shift
        return x.contiguous()

    def wrap(self, model: nn.Module, channels: int) -> nn.Module:
        """``model`` behind the conversion (``model`` itself for the plain format)."""
        return model if self.plain else RawInputModel(model, self, channels)


class RawInputModel(nn.Module):
    """The conversion of :class:`InputFormat` in front of a model, as graph ops every exporter traces."""

    def __init__(self, model: nn.Module, fmt: InputFormat, channels: int) -> None:
        super().__init__()
        self.model, self.nhwc, self.uint8 = model, fmt.layout == "nhwc", fmt.dtype == "uint8"
        scale, shift = fmt._affine(channels)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        for attr in ("spec", "weights_meta"):  # what the exporters name the artefact by and read its weights from
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        if self.uint8:
            x = x.to(self.scale.dtype) * self.scale + self.shift
        return self.model(x)
