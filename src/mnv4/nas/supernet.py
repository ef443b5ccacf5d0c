"""The weight-sharing super-network: one network that runs any architecture of a search space.

Sharing rules (docs/nas.md):

* Widths. Every conv holds the widest tensor of its position; an architecture with fewer channels
  uses the *first k* input and output channels (a slice of the weight, BN parameters and running
  statistics). Stage filters, stem width and expansion ratios are all such first-k slices.
* UIB instantiations. The expansion and projection 1x1 convs (and their BNs) are one set of weights
  per block, shared by every start/middle DW choice. Each DW position has one depthwise weight
  (and BN) as wide as its largest kernel; a 3x3 choice uses the centre of the 5x5. With a separate
  weight per kernel size the two choices compute unrelated functions, and the shared projection
  after them cannot serve both: sampling 3x3 and 5x5 at random then barely trains (docs/nas.md
  gives the measurement). "No DW" is the identity.
* Depth. A stage holds its deepest block list; an architecture with depth d runs the first d
  blocks and skips the rest (they are residual blocks, so skipping is the identity).
* BatchNorm. Statistics under a changing architecture are not those of any one architecture, so
  training (and the controller's reward batches) normalise with the current batch's statistics
  and track no running averages. :meth:`SuperNet.calibrate_bn` computes the running statistics of
  one fixed architecture (cumulative average over a few training batches) before it is evaluated
  in eval mode or extracted.

:meth:`SuperNet.extract` builds the standalone :class:`MobileNetV4` of an architecture and copies
the corresponding weight slices in; its outputs equal the super-network's for that architecture.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MNv4Error, check_choice
from ..models.blocks import AttentionBlock, AttentionCore, ConvBN, FusedIB, LayerScale, make_act, make_divisible
from ..models.mobilenetv4 import MobileNetV4
from ..models.specs import AttentionSpec
from .space import Arch, SearchSpace

__all__ = ["SuperNet"]


class _SliceConvBN(nn.Module):
    """Conv (no bias) + BN + optional activation over the widest tensor; a call uses the first
    ``in`` / ``out`` channels. ``depthwise`` convs have ``out == in``."""

    def __init__(self, max_in: int, max_out: int, kernel: int, act: str | None, depthwise: bool = False) -> None:
        super().__init__()
        self.depthwise = depthwise
        self.kernel = kernel
        # An nn.Conv2d holds the widest weight (and shows profilers and the trainer a real conv); it is
        # only ever called through a slice of its weight.
        self.conv = nn.Conv2d(max_in, max_out, kernel, groups=max_in if depthwise else 1, bias=False)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        self.bn = nn.BatchNorm2d(max_out)
        self.act = make_act(act)
        self.calibrating = False

    def _weight(self, cin: int, out: int) -> torch.Tensor:
        w = self.conv.weight
        return w[:cin] if self.depthwise else w[:out, :cin]

    def _cropped(self, cin: int, out: int, kernel: int | None) -> torch.Tensor:
        """The weight of a ``kernel`` x ``kernel`` conv: the centre of the widest kernel."""
        w = self._weight(cin, out)
        k = kernel or self.kernel
        if k == self.kernel:
            return w
        if k > self.kernel or (self.kernel - k) % 2:
            raise MNv4Error(f"a {self.kernel}x{self.kernel} super-kernel has no centred {k}x{k} part")
        off = (self.kernel - k) // 2
        return w[:, :, off : off + k, off : off + k]

    def forward(
        self, x: torch.Tensor, out: int | None = None, stride: int = 1, kernel: int | None = None
    ) -> torch.Tensor:
        cin = x.shape[1]
        out = cin if self.depthwise else out
        w = self._cropped(cin, out, kernel)
        y = F.conv2d(x, w, None, stride, (w.shape[-1] - 1) // 2, 1, cin if self.depthwise else 1)
        bn = self.bn
        w, b = bn.weight[:out], bn.bias[:out]
        if self.calibrating:
            # Cumulative average: momentum 1/n on the n-th batch (running stats were reset first).
            n = int(bn.num_batches_tracked.item()) + 1
            bn.num_batches_tracked.fill_(n)
            y = F.batch_norm(y, bn.running_mean[:out], bn.running_var[:out], w, b, True, 1.0 / n, bn.eps)
        elif self.training:
            y = F.batch_norm(y, None, None, w, b, True, 0.0, bn.eps)
        else:
            y = F.batch_norm(y, bn.running_mean[:out], bn.running_var[:out], w, b, False, 0.0, bn.eps)
        return self.act(y)

    @torch.no_grad()
    def export_into(self, target: ConvBN, cin: int, out: int, kernel: int | None = None) -> None:
        out = cin if self.depthwise else out
        target.conv.weight.copy_(self._cropped(cin, out, kernel))
        _copy_bn(self.bn, target.bn, out)


def _copy_bn(src: nn.BatchNorm2d, dst: nn.BatchNorm2d, n: int) -> None:
    dst.weight.copy_(src.weight[:n])
    dst.bias.copy_(src.bias[:n])
    dst.running_mean.copy_(src.running_mean[:n])
    dst.running_var.copy_(src.running_var[:n])
    dst.eps = src.eps


def _slice_bn(bn: nn.BatchNorm2d, x: torch.Tensor, calibrating: bool) -> torch.Tensor:
    n = x.shape[1]
    if calibrating:
        k = int(bn.num_batches_tracked.item()) + 1
        bn.num_batches_tracked.fill_(k)
        return F.batch_norm(x, bn.running_mean[:n], bn.running_var[:n], bn.weight[:n], bn.bias[:n], True, 1 / k, bn.eps)
    if bn.training:
        return F.batch_norm(x, None, None, bn.weight[:n], bn.bias[:n], True, 0.0, bn.eps)
    return F.batch_norm(x, bn.running_mean[:n], bn.running_var[:n], bn.weight[:n], bn.bias[:n], False, 0.0, bn.eps)


@dataclass(frozen=True)
class _Step:
    """One block of an architecture's path through the super-network."""

    module: nn.Module
    kwargs: dict[str, Any]


class _SuperFusedIB(nn.Module):
    def __init__(self, max_in: int, max_out: int, max_mid: int, kernel: int, act: str) -> None:
        super().__init__()
        self.expand = _SliceConvBN(max_in, max_mid, kernel, act)
        self.project = _SliceConvBN(max_mid, max_out, 1, None)

    def forward(self, x: torch.Tensor, out: int, expand: float) -> torch.Tensor:
        mid = make_divisible(x.shape[1] * expand)
        return self.project(self.expand(x, mid, 2), out)

    def export_into(self, target: FusedIB, cin: int, out: int, expand: float) -> None:
        mid = make_divisible(cin * expand)
        self.expand.export_into(target.expand, cin, mid)
        self.project.export_into(target.project, mid, out)


@torch.no_grad()
def _identity_init(w: torch.Tensor) -> None:
    """A depthwise kernel that starts as the identity (a centred delta, plus a little noise), so a DW
    op and its "absent" choice begin as the same function and the shared 1x1 convs around them see
    compatible inputs (docs/nas.md measures the difference)."""
    k = w.shape[-1]
    w.normal_(0.0, 0.1 / k)
    w[:, :, k // 2, k // 2] += 1.0


class _ElasticDW(nn.Module):
    """The depthwise choices of one UIB position.

    ``sharing="centre"`` (the default): one weight (and BN) as wide as the largest kernel; a smaller
    kernel is its centre. ``"separate"``: a weight and BN per kernel size. ``init="identity"`` (the
    default) starts the kernels as a centred delta; ``"kaiming"`` as the standalone models do.
    The alternatives exist for the ablation in ``benchmarks/nas_sharing.py``.
    """

    def __init__(self, channels: int, kernels: list[int], act: str | None, sharing: str, init: str) -> None:
        super().__init__()
        self.kernels = sorted(kernels)
        if sharing == "centre":
            self.ops = nn.ModuleDict({"shared": _SliceConvBN(channels, channels, self.kernels[-1], act, True)})
        else:
            self.ops = nn.ModuleDict({str(k): _SliceConvBN(channels, channels, k, act, True) for k in self.kernels})
        if init == "identity":
            for op in self.ops.values():
                _identity_init(op.conv.weight)

    def op(self, kernel: int) -> _SliceConvBN:
        return self.ops["shared"] if "shared" in self.ops else self.ops[str(kernel)]

    def forward(self, x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
        return self.op(kernel)(x, stride=stride, kernel=kernel)

    def export_into(self, target: ConvBN, channels: int, kernel: int) -> None:
        self.op(kernel).export_into(target, channels, channels, kernel=kernel)

    def choice_specific_params(self) -> int:
        """Parameters that only one kernel choice uses (the outer ring of a shared super-kernel)."""
        if "shared" not in self.ops:
            return sum(p.numel() for p in self.parameters()) if len(self.kernels) > 1 else 0
        if len(self.kernels) < 2:
            return 0
        op = self.ops["shared"]
        return op.conv.weight.shape[0] * (self.kernels[-1] ** 2 - self.kernels[-2] ** 2)


class _SuperUIB(nn.Module):
    def __init__(
        self,
        max_in: int,
        max_out: int,
        max_mid: int,
        start_kernels: Iterable[int],
        mid_kernels: Iterable[int],
        act: str,
        layer_scale_init: float | None,
        kernel_sharing: str = "centre",
        dw_init: str = "identity",
    ) -> None:
        super().__init__()
        start = [k for k in start_kernels if k]
        mid = [k for k in mid_kernels if k]
        self.dw_start = _ElasticDW(max_in, start, None, kernel_sharing, dw_init) if start else None
        self.expand = _SliceConvBN(max_in, max_mid, 1, act)
        self.dw_mid = _ElasticDW(max_mid, mid, act, kernel_sharing, dw_init) if mid else None
        self.project = _SliceConvBN(max_mid, max_out, 1, None)
        self.gamma = nn.Parameter(torch.full((max_out,), float(layer_scale_init))) if layer_scale_init else None

    def forward(self, x: torch.Tensor, start: int, mid: int, stride: int, out: int, expand: float) -> torch.Tensor:
        shortcut = x
        cin = x.shape[1]
        width = make_divisible(cin * expand)
        if start:
            x = self.dw_start(x, start, 1 if mid else stride)
        x = self.expand(x, width)
        if mid:
            x = self.dw_mid(x, mid, stride)
        x = self.project(x, out)
        if self.gamma is not None:
            x = x * self.gamma[:out].view(1, -1, 1, 1)
        return x + shortcut if cin == out and stride == 1 else x

    @torch.no_grad()
    def export_into(self, target, cin: int, start: int, mid: int, stride: int, out: int, expand: float) -> None:
        width = make_divisible(cin * expand)
        if start:
            self.dw_start.export_into(target.dw_start, cin, start)
        self.expand.export_into(target.expand, cin, width)
        if mid:
            self.dw_mid.export_into(target.dw_mid, width, mid)
        self.project.export_into(target.project, width, out)
        if self.gamma is not None:
            if not isinstance(target.layer_scale, LayerScale):
                raise MNv4Error("extracted UIB has no layer scale but the super-network does")
            target.layer_scale.gamma.copy_(self.gamma[:out])


class _SuperMQA(nn.Module):
    """Mobile MQA block (docs/architecture.md §2.6) whose model width is a first-k slice; heads and dims are fixed."""

    def __init__(self, max_dim: int, spec: AttentionSpec, layer_scale_init: float | None) -> None:
        super().__init__()
        self.spec = spec
        self.norm = nn.BatchNorm2d(max_dim)
        self.query = nn.Parameter(torch.empty(spec.heads * spec.key_dim, max_dim, 1, 1))
        self.key = nn.Parameter(torch.empty(spec.kv_heads * spec.key_dim, max_dim, 1, 1))
        self.value = nn.Parameter(torch.empty(spec.kv_heads * spec.value_dim, max_dim, 1, 1))
        self.output = nn.Parameter(torch.empty(max_dim, spec.heads * spec.value_dim, 1, 1))
        for p in (self.query, self.key, self.value, self.output):
            nn.init.xavier_uniform_(p)
        if spec.kv_stride > 1:
            self.key_down = _SliceConvBN(max_dim, max_dim, spec.dw_kernel, None, True)
            self.value_down = _SliceConvBN(max_dim, max_dim, spec.dw_kernel, None, True)
        else:
            self.key_down = self.value_down = None
        self.core = AttentionCore(spec.key_dim)
        self.gamma = nn.Parameter(torch.full((max_dim,), float(layer_scale_init))) if layer_scale_init else None
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        b, c, h, w = x.shape
        g = s.kv_heads
        y = _slice_bn(self.norm, x, self.calibrating)
        q = F.conv2d(y, self.query[:, :c]).reshape(b * g, s.key_dim, -1)
        kx = self.key_down(y, stride=s.kv_stride) if self.key_down is not None else y
        vx = self.value_down(y, stride=s.kv_stride) if self.value_down is not None else y
        k = F.conv2d(kx, self.key[:, :c]).reshape(b * g, s.key_dim, -1)
        v = F.conv2d(vx, self.value[:, :c]).reshape(b * g, s.value_dim, -1)
        o = self.core(q, k, v)
        o = F.conv2d(o.reshape(b, -1, h, w), self.output[:c])
        if self.gamma is not None:
            o = o * self.gamma[:c].view(1, -1, 1, 1)
        return x + o

    @torch.no_grad()
    def export_into(self, target: AttentionBlock, cin: int) -> None:
        _copy_bn(self.norm, target.norm, cin)
        a = target.attn
        a.query.weight.copy_(self.query[:, :cin])
        a.key.weight.copy_(self.key[:, :cin])
        a.value.weight.copy_(self.value[:, :cin])
        a.output.weight.copy_(self.output[:cin])
        if self.key_down is not None:
            self.key_down.export_into(a.key_down, cin, cin)
            self.value_down.export_into(a.value_down, cin, cin)
        if self.gamma is not None:
            target.layer_scale.gamma.copy_(self.gamma[:cin])


def _max_mid(ins: Iterable[int], expands: Iterable[float]) -> int:
    return max(make_divisible(c * e) for c in ins for e in expands)


class SuperNet(nn.Module):
    """All architectures of ``space`` in one module. ``forward(x)`` runs the architecture set by
    :meth:`set_arch` (what a training loop, DDP and the controller use) or the one passed in."""

    def __init__(
        self, space: SearchSpace, num_classes: int = 1000, kernel_sharing: str = "centre", dw_init: str = "identity"
    ) -> None:
        super().__init__()
        check_choice("kernel_sharing", kernel_sharing, ("centre", "separate"))
        check_choice("dw_init", dw_init, ("identity", "kaiming"))
        self.space = space
        self.num_classes = num_classes
        act = space.act
        self.stem = _SliceConvBN(3, max(space.stem), 3, act)
        prev = list(space.stem)
        self.stages = nn.ModuleList()
        self.mqa = nn.ModuleList()
        for st in space.stages:
            blocks = nn.ModuleList()
            fmax = max(st.filters)
            for j in range(st.max_depth):
                if j == 0 and st.first != ("uib",):
                    if st.first != ("fused_ib",):
                        raise MNv4Error(
                            f"space {space.name}: the super-network shares weights over UIB and FusedIB first blocks "
                            f"only, stage /{st.stride} offers {st.first} (conv2 describes Conv-S, it is not searched)"
                        )
                    mid = _max_mid(prev, st.fused_expand)
                    blocks.append(_SuperFusedIB(max(prev), fmax, mid, space.fused_kernel, act))
                else:
                    ins = prev if j == 0 else st.filters
                    mids = st.strided_mid if j == 0 else st.mid_dw
                    blocks.append(
                        _SuperUIB(
                            max(ins),
                            fmax,
                            _max_mid(ins, st.expand),
                            st.start_dw,
                            mids,
                            act,
                            space.layer_scale_init,
                            kernel_sharing,
                            dw_init,
                        )
                    )
            self.stages.append(blocks)
            slots = nn.ModuleList()
            if st.mqa is not None:
                slots.extend(_SuperMQA(fmax, st.mqa, space.layer_scale_init) for _ in range(st.max_depth))
            self.mqa.append(slots)
            prev = list(st.filters)
        self.final_conv = _SliceConvBN(max(prev), space.num_features, 1, act)
        self.head_conv = ConvBN(space.num_features, space.head_hidden_size, 1, act=act)
        self.classifier = nn.Linear(space.head_hidden_size, num_classes)
        nn.init.kaiming_normal_(self.head_conv.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)
        self.arch: Arch | None = None

    # -- architecture ---------------------------------------------------------------------------
    def set_arch(self, arch: Mapping[str, Any]) -> None:
        self.arch = self.space.canonical(arch)

    def path(self, arch: Mapping[str, Any]) -> list[_Step]:
        """The blocks ``arch`` runs, in order, with their call arguments (head excluded)."""
        steps = [_Step(self.stem, dict(out=arch["stem"], stride=2))]
        for i, st in enumerate(self.space.stages):
            f = arch[f"s{i}.filters"]
            for j in range(arch[f"s{i}.depth"]):
                block = self.stages[i][j]
                if isinstance(block, _SuperFusedIB):
                    steps.append(_Step(block, dict(out=f, expand=arch[f"s{i}.b0.fexpand"])))
                else:
                    p = f"s{i}.b{j}."
                    kw = dict(
                        start=arch[p + "start"],
                        mid=arch[p + "mid"],
                        stride=2 if j == 0 else 1,
                        out=f,
                        expand=arch[p + "expand"],
                    )
                    steps.append(_Step(block, kw))
                if st.mqa is not None and arch[f"s{i}.b{j}.mqa"]:
                    steps.append(_Step(self.mqa[i][j], {}))
        return steps

    def forward(self, x: torch.Tensor, arch: Mapping[str, Any] | None = None) -> torch.Tensor:
        arch = self.space.canonical(arch) if arch is not None else self.arch
        if arch is None:
            raise MNv4Error("SuperNet: call set_arch(arch) (or pass arch=) before running it")
        for step in self.path(arch):
            x = step.module(x, **step.kwargs)
        x = self.final_conv(x, self.space.num_features)
        x = self.head_conv(x.mean((2, 3), keepdim=True)).flatten(1)
        return self.classifier(x)

    # -- BatchNorm ------------------------------------------------------------------------------
    def _slice_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (_SliceConvBN, _SuperMQA))]

    @torch.no_grad()
    def calibrate_bn(self, arch: Mapping[str, Any], batches: Iterable[torch.Tensor]) -> int:
        """Running BN statistics of ``arch``: reset, then the cumulative average over ``batches``
        (input tensors) in training-mode normalisation. Returns the number of batches used."""
        arch = self.space.canonical(arch)
        was_training = self.training
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        head_bn = self.head_conv.bn
        saved_momentum = head_bn.momentum
        head_bn.momentum = None  # nn.BatchNorm2d's own cumulative average
        mods = self._slice_modules()
        for m in mods:
            m.calibrating = True
        n = 0
        try:
            self.train()
            for x in batches:
                self(x, arch)
                n += 1
        finally:
            for m in mods:
                m.calibrating = False
            head_bn.momentum = saved_momentum
            self.train(was_training)
        if n == 0:
            raise MNv4Error("calibrate_bn needs at least one batch")
        return n

    # -- extraction -----------------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, arch: Mapping[str, Any], name: str | None = None) -> MobileNetV4:
        """The standalone model of ``arch`` with this super-network's weights (and BN statistics)."""
        arch = self.space.canonical(arch)
        spec = self.space.to_spec(arch, name)
        model = MobileNetV4(spec, num_classes=self.num_classes)
        targets: list[nn.Module] = [model.stem] + [b for stage in model.stages for b in stage]
        steps = self.path(arch)
        if len(steps) != len(targets):
            raise MNv4Error("internal error: super-network path and built model disagree")
        cin = 3
        for step, target in zip(steps, targets):
            m, kw = step.module, step.kwargs
            if isinstance(m, _SliceConvBN):
                m.export_into(target, cin, kw["out"])
                cin = kw["out"]
            elif isinstance(m, _SuperFusedIB):
                m.export_into(target, cin, kw["out"], kw["expand"])
                cin = kw["out"]
            elif isinstance(m, _SuperUIB):
                m.export_into(target, cin, **kw)
                cin = kw["out"]
            else:
                m.export_into(target, cin)
        self.final_conv.export_into(model.final_conv, cin, self.space.num_features)
        model.head_conv.load_state_dict(self.head_conv.state_dict())
        model.classifier.load_state_dict(self.classifier.state_dict())
        return model.train(self.training)

    def shared_fraction(self) -> float:
        """Share of the super-network's parameters that more than one choice of their block uses:
        everything but the depthwise weights that only one kernel choice reaches (the outer ring of
        a shared super-kernel, or every per-kernel weight when kernels are separate)."""
        total = sum(p.numel() for p in self.parameters())
        own = sum(m.choice_specific_params() for m in self.modules() if isinstance(m, _ElasticDW))
        return 1.0 - own / total
