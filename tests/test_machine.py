"""What the build and `make report` say about the CPU their latencies were measured on."""

from __future__ import annotations

from catdog_core.machine import cpu_description

AMD_AVX2 = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse4_2 fma avx avx2 f16c
processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse4_2 fma avx avx2 f16c
"""
INTEL_VNNI = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu avx avx2 avx512f avx512bw avx512_vnni amx_int8
"""


def test_the_cpu_is_named_with_the_int8_instructions_it_has_best_first() -> None:
    assert cpu_description(INTEL_VNNI) == (
        "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz (int8: amx_int8 avx512_vnni avx512bw avx2)"
    )


def test_a_cpu_without_vnni_says_so() -> None:
    assert cpu_description(AMD_AVX2) == "AMD EPYC (int8: avx2, no VNNI)"


def test_without_cpuinfo_nothing_is_claimed() -> None:
    assert cpu_description("") == "CPU unknown"
