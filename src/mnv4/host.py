"""What machine this is, for the records that latency and benchmark figures carry."""

from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["cpu_name", "cpu_description", "cpu_flags", "int8_support", "ort_u8s8_saturates"]

# CPU features that give int8 dot products accumulated straight into int32 (no int16 intermediate):
# x86 VNNI (AVX512-VNNI, AVX-VNNI) and AMX-INT8, ARM's dot-product and int8-matmul extensions.
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})


def _cpuinfo_field(*names: str) -> str | None:
    """The first /proc/cpuinfo line whose key is one of ``names`` (lower case), its value; None off Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in names:
                return value.strip()
    except OSError:  # not Linux
        pass
    return None


def cpu_name() -> str:
    """The CPU's marketing name (Linux: /proc/cpuinfo's "model name"), else what ``platform`` knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (Linux /proc/cpuinfo: x86 "flags", ARM "Features"), None where unknown."""
    flags = _cpuinfo_field("flags", "features")
    return None if flags is None else frozenset(flags.split())


def _is_x86(flags: frozenset[str]) -> bool:
    return "sse2" in flags  # every x86-64 CPU has it; ARM's flags are named differently


def int8_support(flags: frozenset[str] | None = None) -> tuple[bool | None, str]:
    """Whether this CPU has int8 dot-product instructions (VNNI, AMX-INT8, ARM dotprod) and one line
    saying so. Without them int8 kernels multiply through int16 (x86 AVX2's vpmaddubsw), so INT8 gains
    little or nothing over fp32, and ONNX Runtime's uint8 x int8 kernels can saturate (docs/deploy.md, "INT8 on
    CPUs without VNNI"). ``flags`` defaults to this machine's."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None, "int8: cannot tell whether this CPU has VNNI/AMX-INT8 (no /proc/cpuinfo)"
    have = sorted(flags & INT8_DOT_FLAGS)
    if have:
        return True, f"int8: this CPU has int8 dot products ({', '.join(have)})"
    what = (
        f"no VNNI/AMX-INT8 ({'AVX2' if 'avx2' in flags else 'SSE'} only)" if _is_x86(flags) else "no int8 dot products"
    )
    return False, (
        f"int8: this CPU has {what}: int8 multiplies through int16 here, so INT8 may run no faster than fp32 "
        "(docs/deploy.md, INT8 on CPUs without VNNI)"
    )


def ort_u8s8_saturates(flags: frozenset[str] | None = None) -> bool:
    """True on an x86 CPU without VNNI/AMX: ONNX Runtime's uint8-activation x int8-weight kernels then
    sum pairs of products in int16 with saturation (vpmaddubsw), which 8-bit weights can overflow.
    7-bit weights (``reduce_range``) cannot: 2 x 255 x 64 < 32767."""
    flags = cpu_flags() if flags is None else flags
    return flags is not None and _is_x86(flags) and int8_support(flags)[0] is False


def cpu_description(flags: frozenset[str] | None = None) -> str:
    """The CPU's name with what decides its speed: x86 family/model and the vector, int8 and bf16
    extensions, e.g. "AMD EPYC (family 23 model 1; AVX2, no VNNI, no BF16)". A virtual machine's name
    alone ("AMD EPYC") covers CPUs years apart, so every figure and latency cache names this."""
    flags = cpu_flags() if flags is None else flags
    parts = []
    family, model = _cpuinfo_field("cpu family"), _cpuinfo_field("model")
    if family and model and model.isdigit():
        parts.append(f"family {family} model {model}")
    if flags is not None and _is_x86(flags):
        simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "AVX" if "avx" in flags else "SSE"
        vnni = "VNNI" if int8_support(flags)[0] else "no VNNI"
        bf16 = "BF16" if flags & {"avx512_bf16", "amx_bf16"} else "no BF16"
        parts.append(", ".join([simd, vnni, bf16] + (["AMX"] if "amx_tile" in flags else [])))
    elif flags is not None:
        parts.append("int8 dot products" if int8_support(flags)[0] else "no int8 dot products")
    return f"{cpu_name()} ({'; '.join(parts)})" if parts else cpu_name()
