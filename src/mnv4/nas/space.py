"""The MNv4 search space as data (paper §6.1 and Appendix A; docs/nas.md).

Skeleton, as in the paper: a fixed 3x3 stride-2 conv stem, then four stages ending at strides
4 / 8 / 16 / 32 (the four stages of a :class:`ModelSpec`), then the fixed MobileNetV3 head
(1x1 conv to 960, pool, 1x1 conv to 1280, classifier). The stride-4 stage opens with the FusedIB
(the paper's "NAS-optimised FusedIB" stage); the other stages open with a stride-2 UIB. After its
first block every stage holds stride-1 UIBs.

Decisions (each a named choice list; an architecture, :data:`Arch`, maps every name to a value):

* ``stem``            stem width
* ``s{i}.depth``      blocks in stage i, the first (downsampling) block included
* ``s{i}.filters``    output width of every block of stage i
* ``s{i}.b0.kind``    first-block kind, in extended spaces only (uib, fused_ib, conv2)
* ``s{i}.b0.fexpand`` expansion of a fused_ib / conv2 first block
* ``s{i}.b{j}.start`` start depthwise kernel of UIB j (0 = absent)
* ``s{i}.b{j}.mid``   middle depthwise kernel (0 = absent; never absent on the stride-2 block,
                      which carries the stride there, as in every published MNv4)
* ``s{i}.b{j}.expand`` expansion ratio of UIB j (relative to its input width, spec rule)
* ``s{i}.b{j}.mqa``   1 = a Mobile MQA block follows UIB j (hybrid spaces, last two stages)

The four UIB instantiations are all reachable: IB (0, k), ConvNext-like (k, 0), ExtraDW (k1, k2)
and FFN (0, 0). Decisions of blocks beyond a stage's sampled depth are inactive: they do not change
the model (:meth:`SearchSpace.active`).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import MNv4Error
from ..files import preset_or_file
from ..models.blocks import make_divisible
from ..models.specs import AttentionSpec, BlockSpec, ConvBNSpec, FusedIBSpec, ModelSpec, UIBSpec, cn, fib, mqa, uib
from .compact import spec_from_string, spec_to_string

__all__ = [
    "Arch",
    "Decision",
    "StageSpace",
    "SearchSpace",
    "SPACES",
    "get_space",
    "COARSE_BLOCK",
]

Arch = dict[str, Any]
FIRST_KINDS = ("uib", "fused_ib", "conv2")
# Stage 1 of the paper's two-stage search: every block an IB with expansion 4 and a 3x3 DW (docs/nas.md).
COARSE_BLOCK = {"start": 0, "mid": 3, "expand": 4.0}


@dataclass(frozen=True)
class Decision:
    name: str
    choices: tuple[Any, ...]

    def __len__(self) -> int:
        return len(self.choices)

    def index(self, value: Any) -> int:
        try:
            return self.choices.index(value)
        except ValueError:
            raise MNv4Error(f"{value!r} is not a choice of {self.name} ({', '.join(map(str, self.choices))})") from None


@dataclass(frozen=True)
class StageSpace:
    """Choices of one stage. ``stride`` is the stage's output stride (4, 8, 16 or 32)."""

    stride: int
    depths: tuple[int, ...]
    filters: tuple[int, ...]
    first: tuple[str, ...] = ("uib",)
    start_dw: tuple[int, ...] = (0, 3, 5)
    mid_dw: tuple[int, ...] = (0, 3, 5)
    expand: tuple[float, ...] = (4.0,)
    fused_expand: tuple[float, ...] = (4.0,)
    mqa: AttentionSpec | None = None  # the MQA block a slot inserts; None = no slots

    def __post_init__(self) -> None:
        if not self.depths or min(self.depths) < 1:
            raise MNv4Error(f"stage /{self.stride}: depths must be >= 1 (the first block counts), got {self.depths}")
        for label, values in (
            ("filters", self.filters),
            ("start_dw", self.start_dw),
            ("mid_dw", self.mid_dw),
            ("expand", self.expand),
            ("fused_expand", self.fused_expand),
        ):
            if not values:
                raise MNv4Error(f"stage /{self.stride}: `{label}` has no choices")
            if len(set(values)) != len(values):
                raise MNv4Error(f"stage /{self.stride}: `{label}` repeats a choice: {values}")
        bad = [k for k in self.first if k not in FIRST_KINDS]
        if not self.first or bad:
            raise MNv4Error(f"stage /{self.stride}: first-block kinds must be among {FIRST_KINDS}, got {self.first}")
        if "uib" in self.first and not self.strided_mid:
            raise MNv4Error(f"stage /{self.stride}: the stride-2 UIB needs a middle DW choice other than 0")

    @property
    def strided_mid(self) -> tuple[int, ...]:
        return tuple(k for k in self.mid_dw if k)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mqa"] = spec_to_token(self.mqa) if self.mqa else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StageSpace:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MNv4Error(f"unknown stage field(s) {unknown}; known: {sorted(known)}")
        if d.get("mqa"):
            d["mqa"] = token_to_attention(d["mqa"])
        for key in ("depths", "filters", "first", "start_dw", "mid_dw"):
            if key in d:
                d[key] = tuple(d[key])
        for key in ("expand", "fused_expand"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)


def spec_to_token(a: AttentionSpec) -> str:
    from .compact import block_token

    return block_token(a)


def token_to_attention(token: str) -> AttentionSpec:
    from .compact import _parse_block

    b = _parse_block(token, None, token)
    if not isinstance(b, AttentionSpec):
        raise MNv4Error(f"an MQA slot needs an attention token like m4k64s2, got {token!r}")
    return b


@dataclass(frozen=True)
class SearchSpace:
    """A searchable MNv4 family; :meth:`to_spec` turns any :data:`Arch` into a buildable ModelSpec."""

    name: str
    stages: tuple[StageSpace, ...]
    stem: tuple[int, ...] = (32,)
    fused_kernel: int = 3
    act: str = "relu"
    layer_scale_init: float | None = None
    num_features: int = 960
    head_hidden_size: int = 1280
    _decisions: tuple[Decision, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.stages) != 4 or tuple(s.stride for s in self.stages) != (4, 8, 16, 32):
            raise MNv4Error(f"space {self.name}: needs four stages at strides 4, 8, 16, 32")
        object.__setattr__(self, "_decisions", tuple(self._build_decisions()))

    # -- decisions ------------------------------------------------------------------------------
    def _build_decisions(self) -> Iterable[Decision]:
        yield Decision("stem", tuple(self.stem))
        for i, st in enumerate(self.stages):
            yield Decision(f"s{i}.depth", st.depths)
            yield Decision(f"s{i}.filters", st.filters)
            if len(st.first) > 1:
                yield Decision(f"s{i}.b0.kind", st.first)
            if set(st.first) & {"fused_ib", "conv2"}:
                yield Decision(f"s{i}.b0.fexpand", st.fused_expand)
            for j in range(st.max_depth):
                if j > 0 or "uib" in st.first:
                    yield Decision(f"s{i}.b{j}.start", st.start_dw)
                    yield Decision(f"s{i}.b{j}.mid", st.strided_mid if j == 0 else st.mid_dw)
                    yield Decision(f"s{i}.b{j}.expand", st.expand)
                if st.mqa is not None:
                    yield Decision(f"s{i}.b{j}.mqa", (0, 1))

    @property
    def decisions(self) -> tuple[Decision, ...]:
        """Every decision, single-choice ones included (they are constants)."""
        return self._decisions

    def decision(self, name: str) -> Decision:
        for d in self._decisions:
            if d.name == name:
                return d
        raise MNv4Error(f"space {self.name} has no decision {name!r}")

    @property
    def searchable(self) -> tuple[Decision, ...]:
        return tuple(d for d in self._decisions if len(d) > 1)

    def first_kind(self, arch: Mapping[str, Any], i: int) -> str:
        st = self.stages[i]
        return arch.get(f"s{i}.b0.kind", st.first[0]) if len(st.first) > 1 else st.first[0]

    def active(self, arch: Mapping[str, Any]) -> list[str]:
        """Names of the decisions that shape ``arch`` (the others sit beyond a stage's depth)."""
        out = ["stem"]
        for i, st in enumerate(self.stages):
            out += [f"s{i}.depth", f"s{i}.filters"]
            kind = self.first_kind(arch, i)
            if len(st.first) > 1:
                out.append(f"s{i}.b0.kind")
            if kind != "uib":
                out.append(f"s{i}.b0.fexpand")
            for j in range(arch[f"s{i}.depth"]):
                if j > 0 or kind == "uib":
                    out += [f"s{i}.b{j}.start", f"s{i}.b{j}.mid", f"s{i}.b{j}.expand"]
                if st.mqa is not None:
                    out.append(f"s{i}.b{j}.mqa")
        return out

    def canonical(self, arch: Mapping[str, Any]) -> Arch:
        """``arch`` with inactive decisions reset to their first choice (equal models, equal dicts)."""
        self.validate(arch)
        act = set(self.active(arch))
        return {d.name: (arch[d.name] if d.name in act else d.choices[0]) for d in self._decisions}

    def validate(self, arch: Mapping[str, Any]) -> None:
        for d in self._decisions:
            if d.name not in arch:
                raise MNv4Error(f"architecture misses decision {d.name!r} of space {self.name}")
            d.index(arch[d.name])
        extra = sorted(set(arch) - {d.name for d in self._decisions})
        if extra:
            raise MNv4Error(f"architecture has decisions {extra} that space {self.name} does not define")

    # -- sampling -------------------------------------------------------------------------------
    def sample(self, rng: random.Random, fixed: Mapping[str, Any] | None = None) -> Arch:
        """A uniformly random architecture (each decision independently); ``fixed`` pins some."""
        fixed = fixed or {}
        return self.canonical({d.name: fixed.get(d.name, rng.choice(d.choices)) for d in self._decisions})

    def num_architectures(self) -> int:
        """Distinct models in the space (inactive decisions do not count)."""
        total = len(self.stem)
        for st in self.stages:
            b0 = 0
            for kind in st.first:
                n = len(st.fused_expand) if kind != "uib" else len(st.start_dw) * len(st.strided_mid) * len(st.expand)
                b0 += n
            per_block = len(st.start_dw) * len(st.mid_dw) * len(st.expand)
            slot = 2 if st.mqa is not None else 1
            stage = sum((b0 * slot) * (per_block * slot) ** (d - 1) for d in st.depths)
            total *= stage * len(st.filters)
        return total

    def coarse_fixed(self) -> dict[str, Any]:
        """Pinned values of the paper's coarse stage: every block an IB, expansion 4, 3x3 DW, no MQA."""
        out: dict[str, Any] = {}
        for d in self._decisions:
            key = d.name.rsplit(".", 1)[-1]
            if key in COARSE_BLOCK:
                want = COARSE_BLOCK[key]
                if want not in d.choices:
                    raise MNv4Error(
                        f"space {self.name}: the coarse stage needs {key} {want} but {d.name} offers {d.choices}"
                    )
                out[d.name] = want
            elif key == "mqa":
                out[d.name] = 0
            elif key == "kind":
                out[d.name] = d.choices[0]
            elif key == "fexpand":
                out[d.name] = 4.0 if 4.0 in d.choices else d.choices[0]
        return out

    def fine_fixed(self, arch: Mapping[str, Any], search_expand: bool = False) -> dict[str, Any]:
        """Pinned values of the fine stage: the widths and depths (and stem) found by the coarse stage,
        and, unless ``search_expand``, the coarse stage's expansions (4), as the paper keeps them."""
        keep = (".depth", ".filters") if search_expand else (".depth", ".filters", ".expand", ".fexpand")
        return {k: v for k, v in arch.items() if k == "stem" or k.endswith(keep)}

    # -- spec <-> arch --------------------------------------------------------------------------
    def to_spec(self, arch: Mapping[str, Any], name: str | None = None) -> ModelSpec:
        self.validate(arch)
        stem_out = arch["stem"]
        prev = stem_out
        stages = []
        for i, st in enumerate(self.stages):
            f = arch[f"s{i}.filters"]
            kind = self.first_kind(arch, i)
            blocks: list[BlockSpec] = []
            for j in range(arch[f"s{i}.depth"]):
                if j == 0 and kind == "fused_ib":
                    blocks.append(fib(self.fused_kernel, 2, f, arch[f"s{i}.b0.fexpand"]))
                elif j == 0 and kind == "conv2":
                    mid = make_divisible(prev * arch[f"s{i}.b0.fexpand"])
                    blocks += [cn(self.fused_kernel, 2, mid), cn(1, 1, f)]
                else:
                    p = f"s{i}.b{j}."
                    blocks.append(uib(arch[p + "start"], arch[p + "mid"], 2 if j == 0 else 1, f, arch[p + "expand"]))
                if st.mqa is not None and arch[f"s{i}.b{j}.mqa"]:
                    blocks.append(st.mqa)
            stages.append(tuple(blocks))
            prev = f
        return ModelSpec(
            name=name or f"{self.name}_nas",
            stem=cn(3, 2, stem_out),
            stages=tuple(stages),
            act=self.act,
            layer_scale_init=self.layer_scale_init,
            num_features=self.num_features,
            head_hidden_size=self.head_hidden_size,
        )

    def to_string(self, arch: Mapping[str, Any]) -> str:
        return spec_to_string(self.to_spec(arch))

    def from_string(self, text: str) -> Arch:
        arch = self.locate(spec_from_string(text))
        if arch is None:
            raise MNv4Error(f"{text!r} is a valid spec but not an architecture of space {self.name}")
        return arch

    def locate(self, spec: ModelSpec) -> Arch | None:
        """The architecture of this space that builds ``spec`` (name aside), or None if it is outside."""
        try:
            arch = self._locate(spec)
        except MNv4Error:  # a decision's value outside its choices (SearchSpace.validate)
            return None
        if arch is None:
            return None
        try:
            ok = self.to_spec(arch, spec.name) == spec
        except MNv4Error:
            return None
        return self.canonical(arch) if ok else None

    def _locate(self, spec: ModelSpec) -> Arch | None:
        """The decisions that build ``spec``, or None where a block has no decision that makes it."""
        head = (spec.act, spec.layer_scale_init, spec.num_features, spec.head_hidden_size)
        if head != (self.act, self.layer_scale_init, self.num_features, self.head_hidden_size):
            return None
        if spec.stem.kernel != 3 or spec.stem.stride != 2 or len(spec.stages) != len(self.stages):
            return None
        arch: Arch = {d.name: d.choices[0] for d in self._decisions}
        arch["stem"] = prev = spec.stem.out
        for i, (st, blocks) in enumerate(zip(self.stages, spec.stages)):
            found = self._stage_units(st, list(blocks), prev)
            decisions = self._stage_decisions(i, st, *found) if found is not None else None
            if decisions is None:
                return None
            arch.update(decisions)
            prev = decisions[f"s{i}.filters"]
        self.validate(arch)  # MNv4Error when a value is not among the decision's choices
        return arch

    def _stage_units(self, st: Any, blocks: list, prev: int) -> tuple[list[tuple[str, Any]], list[bool]] | None:
        """A stage's searchable blocks as (kind, payload), and after which of them an MQA block follows."""
        units: list[tuple[str, Any]] = []
        mqa_after: list[bool] = []
        k = 0
        while k < len(blocks):
            b = blocks[k]
            if isinstance(b, AttentionSpec):
                if not units or st.mqa is None or b != st.mqa or mqa_after[-1]:
                    return None
                mqa_after[-1] = True
                k += 1
                continue
            if not units and isinstance(b, ConvBNSpec):
                nxt = blocks[k + 1] if k + 1 < len(blocks) else None
                if not (isinstance(nxt, ConvBNSpec) and nxt.kernel == 1 and nxt.stride == 1):
                    return None
                if b.kernel != self.fused_kernel or b.stride != 2:
                    return None
                fe = next((e for e in st.fused_expand if make_divisible(prev * e) == b.out), None)
                if fe is None:
                    return None
                units.append(("conv2", (fe, nxt.out)))
                k += 2
            elif not units and isinstance(b, FusedIBSpec):
                if b.kernel != self.fused_kernel or b.stride != 2:
                    return None
                units.append(("fused_ib", b))
                k += 1
            elif isinstance(b, UIBSpec) and b.end_dw == 0 and b.stride == (1 if units else 2):
                units.append(("uib", b))
                k += 1
            else:
                return None
            mqa_after.append(False)
        return (units, mqa_after) if units else None

    def _stage_decisions(
        self, i: int, st: Any, units: list[tuple[str, Any]], mqa_after: list[bool]
    ) -> dict[str, Any] | None:
        """Stage ``i``'s decisions from its units (None where they cannot come from this space)."""
        widths = {p[1] if kind == "conv2" else p.out for kind, p in units}
        if len(widths) != 1:
            return None
        out: dict[str, Any] = {f"s{i}.filters": widths.pop(), f"s{i}.depth": len(units)}
        kind0 = units[0][0]
        if len(st.first) > 1:
            out[f"s{i}.b0.kind"] = kind0
        elif kind0 != st.first[0]:
            return None
        for j, (kind, p) in enumerate(units):
            if kind == "conv2":
                out[f"s{i}.b0.fexpand"] = p[0]
            elif kind == "fused_ib":
                out[f"s{i}.b0.fexpand"] = p.expand
            else:
                out[f"s{i}.b{j}.start"], out[f"s{i}.b{j}.mid"], out[f"s{i}.b{j}.expand"] = (
                    p.start_dw,
                    p.mid_dw,
                    p.expand,
                )
            if st.mqa is not None:
                out[f"s{i}.b{j}.mqa"] = int(mqa_after[j])
        return out

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stem": list(self.stem),
            "fused_kernel": self.fused_kernel,
            "act": self.act,
            "layer_scale_init": self.layer_scale_init,
            "num_features": self.num_features,
            "head_hidden_size": self.head_hidden_size,
            "stages": [s.to_dict() for s in self.stages],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchSpace:
        d = dict(d)
        try:
            stages = tuple(StageSpace.from_dict(s) for s in d.pop("stages"))
        except KeyError:
            raise MNv4Error("a search space needs `stages` (four stage mappings)") from None
        except TypeError as e:
            raise MNv4Error(f"bad stage in search space: {e}") from None
        if "stem" in d:
            d["stem"] = tuple(d["stem"])
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MNv4Error(f"unknown search-space field(s) {unknown}; known: {sorted(known)}")
        return cls(stages=stages, **d)

    def describe(self) -> str:
        lines = [f"search space {self.name}: {self.num_architectures():.3g} architectures"]
        lines.append(f"  stem conv3x3 s2, width {list(self.stem)}")
        for st in self.stages:
            first = "/".join(st.first)
            extra = f", MQA slots {spec_to_token(st.mqa)}" if st.mqa else ""
            lines.append(
                f"  stage /{st.stride}: first {first}, depth {list(st.depths)}, filters {list(st.filters)}, "
                f"start DW {list(st.start_dw)}, mid DW {list(st.mid_dw)}, expand {[f'{e:g}' for e in st.expand]}"
                + extra
            )
        lines.append(f"  head conv1x1 {self.num_features} -> pool -> conv1x1 {self.head_hidden_size} -> classifier")
        return "\n".join(lines)


def _uib_stage(stride: int, depths, filters, expand, mqa_block=None, first=("uib",), fused_expand=(4.0,)):
    return StageSpace(
        stride=stride,
        depths=tuple(depths),
        filters=tuple(filters),
        first=tuple(first),
        expand=tuple(float(e) for e in expand),
        fused_expand=tuple(float(e) for e in fused_expand),
        mqa=mqa_block,
    )


_EXPANDS = (2.0, 3.0, 4.0, 6.0)  # the ratios the published models use (docs/architecture.md §3)


def _preset(name: str, stem: int, stages: list[tuple], mqa_blocks=(None, None), ls=None) -> SearchSpace:
    s4, s8, s16, s32 = stages
    return SearchSpace(
        name=name,
        stem=(stem,),
        stages=(
            _uib_stage(4, s4[0], s4[1], _EXPANDS, first=("fused_ib",)),
            _uib_stage(8, s8[0], s8[1], _EXPANDS),
            _uib_stage(16, s16[0], s16[1], _EXPANDS, mqa_blocks[0]),
            _uib_stage(32, s32[0], s32[1], _EXPANDS, mqa_blocks[1]),
        ),
        layer_scale_init=ls,
    )


# Channel and depth choices bracket the published model of each size (the paper does not publish
# its own choice lists, the paper does not state them, docs/nas.md).
SPACES: dict[str, SearchSpace] = {
    "s": _preset(
        "s",
        32,
        [
            ((1, 2), (16, 24, 32)),
            ((1, 2, 3), (32, 48, 64)),
            ((2, 3, 4, 5, 6), (64, 80, 96, 112)),
            ((2, 3, 4, 5, 6), (96, 128, 160)),
        ],
    ),
    "m": _preset(
        "m",
        32,
        [
            ((1, 2), (32, 48, 64)),
            ((1, 2, 3, 4), (64, 80, 96)),
            ((4, 6, 8, 10), (128, 160, 192)),
            ((6, 8, 10, 11, 12), (192, 256, 320)),
        ],
    ),
    "l": _preset(
        "l",
        24,
        [
            ((1, 2), (32, 48, 64)),
            ((1, 2, 3, 4), (80, 96, 128)),
            ((6, 8, 10, 11, 12), (160, 192, 256)),
            ((8, 10, 12, 13, 14), (384, 512, 640)),
        ],
    ),
    "m_hybrid": _preset(
        "m_hybrid",
        32,
        [
            ((1, 2), (32, 48, 64)),
            ((1, 2, 3, 4), (64, 80, 96)),
            ((4, 6, 8, 10), (128, 160, 192)),
            ((6, 8, 10, 11, 12), (192, 256, 320)),
        ],
        mqa_blocks=(mqa(4, 64, kv_stride=2), mqa(4, 64, kv_stride=1)),
        ls=1e-5,
    ),
}

# Not searched by default: the union of the choices the published conv models make, so that
# Conv-S, Conv-M and Conv-L are points of it (docs/nas.md). Conv-S opens its stride-4 and stride-8
# stages with a pair of plain convs (kind "conv2"), not a FusedIB (docs/architecture.md §3, mnv4_conv_small).
SPACES["extended"] = SearchSpace(
    name="extended",
    stem=(24, 32),
    stages=(
        _uib_stage(4, (1, 2), (32, 48), (2, 3, 4, 6), first=("fused_ib", "conv2"), fused_expand=(1, 3, 4)),
        _uib_stage(8, (1, 2), (64, 80, 96), (2, 3, 4, 6), first=("uib", "conv2"), fused_expand=(1, 3, 4)),
        _uib_stage(16, tuple(range(2, 14)), (96, 160, 192), (2, 3, 4, 6)),
        _uib_stage(32, tuple(range(2, 14)), (128, 256, 512), (2, 3, 4, 6)),
    ),
)


def get_space(name_or_path: str | os.PathLike | SearchSpace) -> SearchSpace:
    """A preset by name (``s``, ``m``, ``l``, ``m_hybrid``, ``extended``) or a space from a JSON/YAML file."""
    return preset_or_file(name_or_path, SearchSpace, SPACES, "search space", "name, stem, stages, ...")
