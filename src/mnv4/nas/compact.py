"""A one-line text form of any :class:`ModelSpec`, and back: handy in logs, file names and flags.

Grammar (``|`` separates the stem and the four stages, ``,`` the blocks of a stage)::

    spec   := stem "|" stage "|" stage "|" stage "|" stage ["@" option ("," option)*]
    stage  := item ("," item)*
    item   := block ["*" count]                  repeat the block count times
    block  := "c" k ["s" s] "o" out             conv-BN-act, kernel k
            | "f" k ["s" s] ["o" out] ["e" e]   FusedIB
            | "u" start mid ["s" s] ["o" out] ["e" e] ["d" end]   UIB; kernels are one digit, 0 = absent
            | "m" heads "k" key ["v" value] ["s" kv_stride] ["g" kv_heads] ["w" dw_kernel]   attention
    option := "act=" name | "ls=" init | "nf=" num_features | "hh=" head_hidden_size

Defaults: stride ``s`` 1, expansion ``e`` 4, ``o`` = the previous block's width (required on the
first block), ``v`` = key dim, ``g`` 1 (MQA), ``w`` 3. Conv-M reads
``c3s2o32|f3s2o48|u35s2o80,u33e2|u35s2o160e6,u33*2,u35,u33,u30,u00e2,u30|u55s2o256e6,...``.
"""

from __future__ import annotations

import re

from ..errors import MNv4Error
from ..models.specs import AttentionSpec, BlockSpec, ConvBNSpec, FusedIBSpec, ModelSpec, UIBSpec

__all__ = ["spec_to_string", "spec_from_string", "block_token"]

_DEFAULTS = {"act": "relu", "ls": None, "nf": 960, "hh": 1280}


def _num(x: float) -> str:
    return f"{x:g}"


def block_token(b: BlockSpec, prev_out: int | None = None) -> str:
    """The token of one block; ``o`` is left out when the width equals ``prev_out``."""

    def tail(stride: int, out: int, expand: float | None = None) -> str:
        t = f"s{stride}" if stride != 1 else ""
        t += "" if out == prev_out else f"o{out}"
        if expand is not None and expand != 4.0:
            t += f"e{_num(expand)}"
        return t

    if isinstance(b, ConvBNSpec):
        return f"c{b.kernel}" + (f"s{b.stride}" if b.stride != 1 else "") + f"o{b.out}"
    if isinstance(b, FusedIBSpec):
        return f"f{b.kernel}" + tail(b.stride, b.out, b.expand)
    if isinstance(b, UIBSpec):
        if max(b.start_dw, b.mid_dw, b.end_dw) > 9:
            raise MNv4Error(f"the compact form holds depthwise kernels up to 9, got {b}")
        return f"u{b.start_dw}{b.mid_dw}" + tail(b.stride, b.out, b.expand) + (f"d{b.end_dw}" if b.end_dw else "")
    if isinstance(b, AttentionSpec):
        t = f"m{b.heads}k{b.key_dim}"
        t += f"v{b.value_dim}" if b.value_dim != b.key_dim else ""
        t += f"s{b.kv_stride}" if b.kv_stride != 1 else ""
        t += f"g{b.kv_heads}" if b.kv_heads != 1 else ""
        t += f"w{b.dw_kernel}" if b.dw_kernel != 3 else ""
        return t
    raise MNv4Error(f"unknown block {b!r}")


def _stage_string(blocks: tuple[BlockSpec, ...], prev_out: int) -> tuple[str, int]:
    tokens: list[str] = []
    for b in blocks:
        tokens.append(block_token(b, prev_out))
        if not isinstance(b, AttentionSpec):
            prev_out = b.out
    items: list[str] = []
    i = 0
    while i < len(tokens):  # run-length: identical consecutive tokens become token*n
        n = 1
        while i + n < len(tokens) and tokens[i + n] == tokens[i]:
            n += 1
        items.append(tokens[i] + (f"*{n}" if n > 1 else ""))
        i += n
    return ",".join(items), prev_out


def spec_to_string(spec: ModelSpec) -> str:
    """``spec`` as one line (see the module docstring); :func:`spec_from_string` inverts it."""
    parts = [block_token(spec.stem)]
    prev = spec.stem.out
    for stage in spec.stages:
        text, prev = _stage_string(stage, prev)
        parts.append(text)
    out = "|".join(parts)
    opts = []
    if spec.act != _DEFAULTS["act"]:
        opts.append(f"act={spec.act}")
    if spec.layer_scale_init is not None:
        opts.append(f"ls={spec.layer_scale_init:g}")
    if spec.num_features != _DEFAULTS["nf"]:
        opts.append(f"nf={spec.num_features}")
    if spec.head_hidden_size != _DEFAULTS["hh"]:
        opts.append(f"hh={spec.head_hidden_size}")
    return out + ("@" + ",".join(opts) if opts else "")


_RE = {
    "c": re.compile(r"c(\d+)(?:s(\d+))?o(\d+)"),
    "f": re.compile(r"f(\d+)(?:s(\d+))?(?:o(\d+))?(?:e([\d.]+))?"),
    "u": re.compile(r"u(\d)(\d)(?:s(\d+))?(?:o(\d+))?(?:e([\d.]+))?(?:d(\d))?"),
    "m": re.compile(r"m(\d+)k(\d+)(?:v(\d+))?(?:s(\d+))?(?:g(\d+))?(?:w(\d+))?"),
}


def _bad(text: str, why: str) -> MNv4Error:
    return MNv4Error(f"invalid compact spec {text!r}: {why}")


def _parse_block(token: str, prev_out: int | None, text: str) -> BlockSpec:
    pattern = _RE.get(token[:1])
    m = pattern.fullmatch(token) if pattern else None
    if m is None:
        raise _bad(text, f"cannot read block {token!r} (expected c.., f.., u.. or m.. tokens)")
    g = m.groups()

    def out(value: str | None) -> int:
        if value is not None:
            return int(value)
        if prev_out is None:
            raise _bad(text, f"block {token!r} needs an explicit width oN (nothing before it)")
        return prev_out

    try:
        if token[0] == "c":
            return ConvBNSpec(int(g[2]), int(g[0]), int(g[1] or 1))
        if token[0] == "f":
            return FusedIBSpec(out(g[2]), int(g[0]), int(g[1] or 1), float(g[3] or 4))
        if token[0] == "u":
            return UIBSpec(int(g[0]), int(g[1]), int(g[2] or 1), out(g[3]), float(g[4] or 4), int(g[5] or 0))
        return AttentionSpec(int(g[0]), int(g[1]), int(g[2] or g[1]), int(g[3] or 1), int(g[4] or 1), int(g[5] or 3))
    except ValueError as e:
        raise _bad(text, f"block {token!r}: {e}") from None


def spec_from_string(text: str, name: str = "mnv4_custom") -> ModelSpec:
    """Parse the one-line form written by :func:`spec_to_string`."""
    body, _, opts = text.strip().partition("@")
    parts = body.split("|")
    if len(parts) != 5:
        raise _bad(text, f"expected a stem and 4 stages separated by '|', got {len(parts)} parts")
    stem = _parse_block(parts[0], None, text)
    if not isinstance(stem, ConvBNSpec):
        raise _bad(text, "the stem must be a conv token cKsSoN")
    prev: int = stem.out
    stages = []
    for part in parts[1:]:
        blocks: list[BlockSpec] = []
        for item in filter(None, part.split(",")):
            token, _, count = item.partition("*")
            if count and not count.isdigit():
                raise _bad(text, f"repeat count in {item!r} is not a number")
            b = _parse_block(token, prev, text)
            blocks.extend([b] * (int(count) if count else 1))
            if not isinstance(b, AttentionSpec):
                prev = b.out
        if not blocks:
            raise _bad(text, "a stage is empty")
        stages.append(tuple(blocks))
    kw = dict(_DEFAULTS)
    for opt in filter(None, opts.split(",")):
        key, eq, value = opt.partition("=")
        if not eq or key not in _DEFAULTS:
            raise _bad(text, f"unknown option {opt!r} (known: act=, ls=, nf=, hh=)")
        try:
            kw[key] = value if key == "act" else float(value) if key == "ls" else int(value)
        except ValueError:
            raise _bad(text, f"option {opt!r} has a bad value") from None
    return ModelSpec(
        name=name,
        stem=stem,
        stages=tuple(stages),
        act=kw["act"],
        layer_scale_init=kw["ls"],
        num_features=kw["nf"],
        head_hidden_size=kw["hh"],
    )
