"""One builder for every MobileNetV4-style network: :class:`ModelSpec` in, ``nn.Module`` out."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import UIB, AttentionBlock, ConvBN, FusedIB, init_weights
from .meta import WeightsMeta
from .registry import Preprocess
from .specs import AttentionSpec, BlockSpec, ConvBNSpec, FusedIBSpec, ModelSpec, UIBSpec

__all__ = ["MobileNetV4", "drop_path_rates", "DROP_PATH_SCHEDULES", "FEATURE_LOCATIONS"]

DROP_PATH_SCHEDULES = ("tf", "linear", "flat")


def drop_path_rates(spec: ModelSpec, peak: float, schedule: str = "tf") -> list[float]:
    """Stochastic-depth rate of every stage block, in order (docs/architecture.md "Stochastic depth").

    ``tf`` is the reference schedule: block i of the full TF spec list (stem, stage blocks, 960 conv,
    pooling, 1280 conv: N entries) gets ``peak * (i + 1) / N``, except attention blocks, which TF
    always gives the un-scaled peak. ``linear`` is timm's ramp: stage block i (0-based) gets
    ``peak * i / (B + 1)`` with B stage blocks plus the 960 conv, which timm's builder counts as a block.
    ``flat`` gives every block ``peak`` (TF's ``flat_stochastic_depth_drop_rate``, used by Conv-L).
    """
    if schedule not in DROP_PATH_SCHEDULES:
        raise ValueError(f"unknown drop-path schedule {schedule!r}; choose one of {DROP_PATH_SCHEDULES}")
    blocks = spec.blocks
    if schedule == "flat":
        return [peak] * len(blocks)
    if schedule == "linear":
        n = len(blocks) + 1
        return [peak * i / n for i in range(len(blocks))]
    n = len(blocks) + 4  # stem + blocks + 960 conv + pooling + 1280 conv
    return [peak if isinstance(b, AttentionSpec) else peak * (i + 2) / n for i, b in enumerate(blocks)]


def _tracing() -> bool:
    from torch.fx import _symbolic_trace as fx

    fx_tracing = getattr(fx, "is_fx_symbolic_tracing", fx.is_fx_tracing)  # older torch: only the latter
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return bool(
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or fx_tracing()
        or torch.compiler.is_compiling()
        or exporting()
    )


# Where features_only levels are read: the stage ends (TF endpoints) or SSDLite's expansion maps.
FEATURE_LOCATIONS = ("stage", "expansion")


class MobileNetV4(nn.Module):
    """A MobileNetV4 network built from a :class:`ModelSpec`.

    Shapes: ``forward_features`` returns the 960-channel (``num_features``) stride-32 map;
    ``forward_head(x, pre_logits=True)`` returns the pooled 1280-d embedding (``head_hidden_size``).

    Feature levels (``features_only=True``, ``out_indices`` index into these):
    0 = stem output (stride 2), 1..4 = the ends of the four stages (strides 4, 8, 16, 32), i.e. the
    TF ``is_output`` endpoints. Level 4 is the last stage (128/256/512 channels), *not* the 960-channel
    1x1 conv that timm reports as its stride-32 level.

    ``feature_location="expansion"`` (features_only) moves levels 1-3 to the widest map at their stride:
    the 1x1 expansion of the next stage's first block, before its middle DW downsamples (SSDLite's
    taps; conv_small's stride-16 level becomes 576 channels, not 96), and level 4 to the 960-channel
    1x1 conv (``final_conv``, loaded from classification checkpoints). The stem stays level 0.
    """

    def __init__(
        self,
        spec: ModelSpec,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_path_schedule: str = "tf",
        output_stride: int = 32,
        features_only: bool = False,
        out_indices: Sequence[int] = (1, 2, 3, 4),
        feature_location: str = "stage",
        act: str | None = None,
        bn_eps: float | None = None,
        bn_momentum: float | None = None,
        layer_scale_init: float | None | str = "spec",
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        self.spec = spec
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.features_only = features_only
        # What the weights are (mnv4.models.meta): a random initialisation until create_model loads some.
        self.weights_meta = WeightsMeta(random=True)
        # Eval on CPU runs the convs in channels_last (oneDNN's native layout): 5-25% faster at batch 1
        # (benchmarks/latency.py), same values to float rounding; outputs are returned in the caller's layout.
        self.cpu_channels_last = True
        self.grad_checkpointing = False  # set_grad_checkpointing
        act = act or spec.act
        ls_init = spec.layer_scale_init if layer_scale_init == "spec" else layer_scale_init
        bn_kwargs = {k: v for k, v in (("eps", bn_eps), ("momentum", bn_momentum)) if v is not None}

        self.stem = _build_block(spec.stem, in_chans, act, 1, None, 0.0, bn_kwargs)
        chs, stride, dilation = spec.stem.out, spec.stem.stride, 1
        levels = [dict(module="stem", num_chs=chs, reduction=stride, stage=0)]
        rates = iter(drop_path_rates(spec, drop_path_rate, drop_path_schedule))
        stages = []
        for si, stage_spec in enumerate(spec.stages):
            blocks = []
            for b in stage_spec:
                block_stride = b.stride
                if block_stride > 1 and stride * block_stride > output_stride:
                    dilation *= block_stride  # trade stride for dilation (dense prediction)
                    block_stride = 1
                else:
                    stride *= block_stride
                blocks.append(
                    _build_block(b, chs, act, dilation, ls_init, next(rates), bn_kwargs, block_stride, spec.downsample)
                )
                chs = chs if isinstance(b, AttentionSpec) else b.out
            stages.append(nn.Sequential(*blocks))
            levels.append(dict(module=f"stages.{si}", num_chs=chs, reduction=stride, stage=si + 1))
        self.stages = nn.ModuleList(stages)
        self._levels = levels

        if feature_location not in FEATURE_LOCATIONS:
            raise ValueError(f"feature_location must be one of {FEATURE_LOCATIONS}, got {feature_location!r}")
        if feature_location != "stage" and not features_only:
            raise ValueError("feature_location applies to features_only models; pass features_only=True")
        self.feature_location = feature_location
        if features_only:
            self.out_indices = tuple(out_indices)
            bad = [i for i in self.out_indices if not 0 <= i < len(levels)]
            if bad:
                raise ValueError(f"out_indices {bad} out of range; levels are 0..{len(levels) - 1}")
            if self.feature_location == "expansion":
                levels = self._expansion_levels(levels, spec, act, bn_kwargs)
                self._levels = levels
            self.feature_info = [levels[i] for i in self.out_indices]
            self.num_features = self.feature_info[-1]["num_chs"]
            self.head_hidden_size = self.num_features
        else:
            self.out_indices = ()
            self.feature_info = levels
            self.num_features = spec.num_features
            self.head_hidden_size = spec.head_hidden_size
            self.final_conv = ConvBN(chs, spec.num_features, 1, act=act, bn_kwargs=bn_kwargs)
            self.head_conv = ConvBN(spec.num_features, spec.head_hidden_size, 1, act=act, bn_kwargs=bn_kwargs)
            self.dropout = nn.Dropout(drop_rate)
            self.classifier = self._make_classifier(num_classes)
        init_weights(self)

    def _expansion_levels(self, levels: list[dict], spec: ModelSpec, act: str, bn_kwargs: dict) -> list[dict]:
        """Levels for ``feature_location="expansion"``; builds ``final_conv`` when level 4 is asked for."""
        out = [levels[0]]
        for level in range(1, len(self.stages)):
            first = self.stages[level][0]
            if not (isinstance(first, UIB) and first.taps_expansion):
                if level in self.out_indices:
                    raise ValueError(
                        f"level {level} has no expansion map: stage {level + 1} starts with a "
                        f"{type(first).__name__} whose stride is not after a 1x1 expansion"
                    )
                out.append(levels[level])
                continue
            chs = first.expand.conv.out_channels
            out.append({**levels[level], "module": f"stages.{level}.0.expand", "num_chs": chs})
        last = len(self.stages)
        out.append({**levels[last], "module": "final_conv", "num_chs": spec.num_features})
        if last in self.out_indices:
            self.final_conv = ConvBN(levels[last]["num_chs"], spec.num_features, 1, act=act, bn_kwargs=bn_kwargs)
        return out

    # The weights' record, under the names README and callers use (mnv4.models.meta is the one home).
    @property
    def preprocess(self) -> Preprocess:
        """The eval preprocessing the weights expect."""
        return self.weights_meta.preprocess

    @preprocess.setter
    def preprocess(self, value: Preprocess) -> None:
        self.weights_meta = dataclasses.replace(self.weights_meta, preprocess=value)

    @property
    def class_names(self) -> list[str] | None:
        names = self.weights_meta.class_names
        return list(names) if names is not None else None

    @class_names.setter
    def class_names(self, value: Sequence[str] | None) -> None:
        names = tuple(value) if value is not None else None
        self.weights_meta = dataclasses.replace(self.weights_meta, class_names=names)

    @property
    def weights_source(self) -> str | None:
        """Checkpoint path or hub id the weights were read from; None: not read from anywhere."""
        return self.weights_meta.source

    @property
    def pretrained_tag(self) -> str | None:
        return self.weights_meta.tag

    def _make_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    # -- the common model interface -------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier; ``num_classes=0`` makes ``forward`` return the 1280-d embedding."""
        self.num_classes = num_classes
        self.classifier = self._make_classifier(num_classes)
        if num_classes > 0:
            nn.init.normal_(self.classifier.weight, std=0.01)
            nn.init.zeros_(self.classifier.bias)

    def _channels_last_eval(self, x: torch.Tensor) -> bool:
        """Whether to run this call in channels_last: eager CPU inference only (never while tracing,
        compiling or exporting, so exported graphs stay layout-free)."""
        if self.training or not self.cpu_channels_last or _tracing():
            return False
        return x.dim() == 4 and x.device.type == "cpu" and not x.is_contiguous(memory_format=torch.channels_last)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        restore = self._channels_last_eval(x)
        if restore:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        for stage in self.stages:
            x = self._run_stage(stage, x)
        x = self.final_conv(x) if not self.features_only else x
        return x.contiguous() if restore else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_conv(x.mean((2, 3), keepdim=True)).flatten(1)
        if pre_logits:
            return x
        return self.classifier(self.dropout(x))

    def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All five feature levels (stem, then the end of each stage)."""
        return self.forward_intermediates(x, intermediates_only=True)

    # -- the hooks timm-based training code expects ------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Store only each stage block's input in training and recompute the block in backward: less
        activation memory (benchmarks/grad_checkpointing.py) for about one more forward pass of compute.
        Gradients are unchanged, and BN running statistics are updated once per step, not again by the
        recomputation."""
        self.grad_checkpointing = bool(enable)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups in timm's format, for layer-wise LR decay (mnv4.train.optim.layer_decay_groups):
        the stem, then every stage block (``coarse``: every stage), then the 960 conv as its own layer
        (ordinal (4, 0), where timm's MNv4 has it as ``blocks.4.0``); parameters no pattern matches (the
        1280 conv and the classifier) form the head, the last group."""
        blocks = r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)"
        return {"stem": r"^stem\.", "blocks": [(blocks, None), (r"^final_conv\.", (4, 0))]}

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's interface: the feature levels (``feature_info``: 0 = stem, 1..4 = stage ends) picked by
        ``indices`` (None: all; an int n: the last n; a sequence: those, negative from the end), in forward
        order, with ``forward_features``' output unless ``intermediates_only``. ``stop_early`` (only with
        ``intermediates_only``) skips the stages after the last level asked for. ``norm`` does nothing: MNv4
        has no final norm. mnv4's level 4 is the last stage (TF endpoint); timm's is the 960 conv after it."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        if stop_early and not intermediates_only:
            raise ValueError("stop_early needs intermediates_only=True")
        take = _take_indices(len(self._levels), indices)
        restore = self._channels_last_eval(x)
        if restore:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.feature_location == "expansion":
            x, out = self._expansion_intermediates(x, take, stop_early)
            out = [o.contiguous() for o in out] if restore else out
            return out if intermediates_only else ((x.contiguous() if restore else x), out)
        x = self.stem(x)
        out = [x] if 0 in take else []
        last = max(take) if stop_early else len(self.stages)
        for level, stage in enumerate(self.stages[:last], start=1):
            x = self._run_stage(stage, x)
            if level in take:
                out.append(x)
        out = [o.contiguous() for o in out] if restore else out
        if intermediates_only:
            return out
        x = self.final_conv(x) if not self.features_only else x
        return (x.contiguous() if restore else x), out

    def _expansion_intermediates(
        self, x: torch.Tensor, take: set[int], stop_early: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``forward_intermediates`` for ``feature_location="expansion"`` (features_only models only)."""
        n = len(self.stages)
        if n in take and not hasattr(self, "final_conv"):
            raise ValueError(f"level {n} (the 1x1 conv after the last stage) is built only when out_indices has it")
        x = self.stem(x)
        out = [x] if 0 in take else []
        last = min(max(take) + 1, n) if stop_early else n
        for si in range(last):
            stage = self.stages[si]
            first = stage[0]
            if si in take and si > 0 and not getattr(first, "taps_expansion", False):
                out.append(x)  # no expansion map at this stride: the stage end, as feature_info says
            elif si in take and si > 0:  # level si is stage si+1's first block, cut after its expansion
                y = first.expanded(x)
                out.append(y)
                x = first.from_expanded(y, x)
                stage = stage[1:]
            x = self._run_stage(stage, x)
        if n in take:
            out.append(self.final_conv(x))
        return x, out

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled() and not _tracing()):
            return stage(x)
        for block in stage:
            context = partial(_checkpoint_contexts, block)
            x = checkpoint(block, x, use_reentrant=False, context_fn=context)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            want = sorted(set(self.out_indices))
            maps = self.forward_intermediates(x, want, intermediates_only=True, stop_early=True)
            levels = dict(zip(want, maps))
            return [levels[i] for i in self.out_indices]
        return self.forward_head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"spec={self.spec.name}, num_classes={self.num_classes}"


def _take_indices(n: int, indices: int | Sequence[int] | None) -> set[int]:
    """timm's ``indices`` rule: None = all n levels, an int k = the last k, a sequence = those (negative
    from the end)."""
    if indices is None:
        return set(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices={indices} asks for the last {indices} levels; there are {n}")
        return set(range(n - indices, n))
    take = {i + n if i < 0 else i for i in indices}
    bad = sorted(i for i in take if not 0 <= i < n)
    if bad or not take:
        raise ValueError(f"indices {list(indices)} out of range; levels are 0..{n - 1}")
    return take


@contextlib.contextmanager
def _bn_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BN layers normalise with batch statistics but leave their running statistics as they were: the
    recomputation under gradient checkpointing must not count the same batch a second time."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, m.num_batches_tracked.clone()))
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _checkpoint_contexts(block: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    # (around the first forward, around the recomputation in backward)
    return contextlib.nullcontext(), _bn_stats_frozen(block)


def _build_block(
    b: BlockSpec,
    in_chs: int,
    act: str,
    dilation: int,
    layer_scale_init: float | None,
    drop_path: float,
    bn_kwargs: dict[str, Any],
    stride: int | None = None,
    downsample: str = "conv",
) -> nn.Module:
    stride = b.stride if stride is None else stride
    if isinstance(b, ConvBNSpec):
        return ConvBN(
            in_chs, b.out, b.kernel, stride, dilation=dilation, act=act, bn_kwargs=bn_kwargs, downsample=downsample
        )
    if isinstance(b, FusedIBSpec):
        return FusedIB(in_chs, b.out, b.kernel, stride, b.expand, act, dilation, drop_path, bn_kwargs, downsample)
    if isinstance(b, UIBSpec):
        return UIB(
            in_chs,
            b.out,
            b.start_dw,
            b.mid_dw,
            stride,
            b.expand,
            b.end_dw,
            act,
            dilation,
            layer_scale_init,
            drop_path,
            bn_kwargs,
            downsample,
        )
    if isinstance(b, AttentionSpec):
        return AttentionBlock(
            in_chs,
            b.heads,
            b.key_dim,
            b.value_dim,
            b.kv_heads,
            b.kv_stride,
            b.dw_kernel,
            layer_scale_init,
            drop_path,
            bn_kwargs,
        )
    raise TypeError(f"unknown block spec {b!r}")
