"""Machine facts (mnv4.host): what the CPU can do decides INT8 settings and explains INT8 speed."""

from __future__ import annotations

import pytest

from mnv4.host import cpu_description, cpu_flags, cpu_name, int8_support, ort_u8s8_saturates

AVX2 = frozenset({"sse2", "avx", "avx2", "fma"})


@pytest.mark.parametrize(
    "flags, has, saturates",
    [
        (AVX2 | {"avx512f", "avx512_vnni"}, True, False),  # Intel Xeon (Cascade Lake on), AMD Zen 4
        (AVX2 | {"avx_vnni"}, True, False),  # Alder Lake's AVX-VNNI
        (AVX2, False, True),  # AVX2 only (AMD Zen 1-3, Intel before Cascade Lake): vpmaddubsw saturates
        (frozenset({"fp", "asimd", "asimddp"}), True, False),  # ARM with dot products
        (frozenset({"fp", "asimd"}), False, False),  # ARM without: slow, but not ORT's x86 saturation
    ],
)
def test_int8_support_from_flags(flags, has, saturates):
    got, line = int8_support(flags)
    assert got is has and line.startswith("int8:") and "\n" not in line
    assert ("no VNNI" in line) is (not has and "sse2" in flags)
    assert ort_u8s8_saturates(flags) is saturates
    described = cpu_description(flags)
    assert described.startswith(cpu_name())
    if "sse2" in flags:  # x86: the vector width and VNNI are named
        assert ("AVX-512" in described) is ("avx512f" in flags) and ("no VNNI" in described) is (not has)
    else:
        assert ("no int8 dot products" in described) is (not has)


def test_this_machine_is_described_in_one_line():
    flags = cpu_flags()
    has, line = int8_support()
    assert (has is None) is (flags is None) and line.startswith("int8:")
    if flags is not None and "sse2" in flags:  # this x86 machine: VNNI decides both
        assert has is bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
        assert ort_u8s8_saturates() is (not has) and ("no VNNI" in cpu_description()) is (not has)
