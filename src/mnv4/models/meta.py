"""What a set of weights is: one record per model, attached in one place and read in one place.

Like timm's ``pretrained_cfg`` or torchvision's ``Weights.meta``: the eval preprocessing the weights
expect, their class names, where they came from, their published tag, whether they are a random
initialisation, what was done to them (BatchNorm statistics re-estimated) and, for weights a run
made, that run's summary. :func:`mnv4.create_model` attaches it, :func:`mnv4.deploy.zoo.build` and
:func:`mnv4.models.recalibrate_batchnorm` update it, and export, inference and the CLI read it through
:func:`weights_meta`. On :class:`~mnv4.models.MobileNetV4` the familiar attributes (``preprocess``,
``class_names``, ``weights_source``, ``pretrained_tag``) are properties over this record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .registry import Preprocess

__all__ = ["WeightsMeta", "weights_meta", "set_weights_meta", "update_weights_meta"]

_ATTR = "weights_meta"


@dataclass(frozen=True)
class WeightsMeta:
    preprocess: Preprocess = Preprocess()
    class_names: tuple[str, ...] | None = None
    source: str | None = None  # checkpoint path or hub id the weights were read from
    tag: str | None = None  # published weight tag (timm), when they are one
    random: bool = False  # known to be a random initialisation (built without weights)
    bn_images: int | None = None  # BatchNorm statistics re-estimated on this many inputs
    bn_batches: int | None = None  # ... in this many batches
    bn_inputs: str = ""  # ... of this kind (e.g. "seeded N(0,1) noise")
    training: Mapping[str, Any] | None = None  # summary of the run that made them, when one did

    def describe(self) -> str:
        """One phrase for reports: where the weights came from and what was done to them."""
        what = f"from {self.source}" if self.source else "random init" if self.random else "as given"
        if self.bn_images is not None:
            kind = f" ({self.bn_inputs})" if self.bn_inputs else ""
            what += f"; BatchNorm statistics re-estimated on {self.bn_images} inputs{kind}"
        return what


def weights_meta(model: Any) -> WeightsMeta:
    """The record of ``model``'s weights; a model that carries none is taken as given (no source)."""
    meta = getattr(model, _ATTR, None)
    return meta if isinstance(meta, WeightsMeta) else WeightsMeta()


def set_weights_meta(model: Any, meta: WeightsMeta) -> None:
    """Attach ``meta`` to ``model`` (any nn.Module), replacing its record."""
    setattr(model, _ATTR, meta)


def update_weights_meta(model: Any, **changes: Any) -> WeightsMeta:
    """Replace some fields of ``model``'s record; returns the new record."""
    meta = dataclasses.replace(weights_meta(model), **changes)
    set_weights_meta(model, meta)
    return meta
