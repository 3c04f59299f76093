"""The CPU that latencies are measured on, named the same way by the build, `make report` and the
benchmarks."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import onnxruntime as ort

# The x86 instruction sets onnxruntime's int8 kernels use, best first. Whether a CPU has VNNI
# (one instruction per int8 dot product) decides most of what int8 gains: on an AMD EPYC with AVX2
# only, Xception's dense convolutions ran 2.0x faster in int8, against 3.3x on an AVX-512 VNNI CPU
# (docs/models.md, "int8 and the hardware").
INT8_INSTRUCTIONS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512bw", "avx2")


# Instructions that compute in bfloat16 in hardware. Without them OpenVINO emulates bf16 on AVX-512:
# MobileNet ran 3.6x slower than in fp32 with oneDNN held to AVX-512 VNNI (2026-12-06).
BF16_INSTRUCTIONS = ("amx_bf16", "avx512_bf16")


def _cpu_flags(cpuinfo: str | None) -> tuple[str, set[str]]:
    """The first CPU's model name and flags in /proc/cpuinfo (Linux; the CPUs are alike)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields.get("model name") or "CPU unknown", set(fields.get("flags", "").split())


def native_bf16(cpuinfo: str | None = None) -> list[str]:
    """The CPU's bfloat16 instructions (BF16_INSTRUCTIONS), best first; empty where it has none."""
    return [flag for flag in BF16_INSTRUCTIONS if flag in _cpu_flags(cpuinfo)[1]]


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU's model name and its int8 instruction sets, from /proc/cpuinfo (Linux)."""
    name, flags = _cpu_flags(cpuinfo)
    if not flags:
        return name
    found = [flag for flag in INT8_INSTRUCTIONS if flag in flags]
    vnni = any("vnni" in flag or flag == "amx_int8" for flag in found)
    listed = " ".join(found) or "none of " + "/".join(INT8_INSTRUCTIONS)
    return f"{name} (int8: {listed}{'' if vnni else ', no VNNI'})"


def machine_description() -> str:
    """Architecture, CPU with its int8 instructions, logical CPUs and onnxruntime's version: what a
    latency figure needs beside it to be compared."""
    cpus = os.cpu_count()
    return f"{platform.machine()} {cpu_description()}, {cpus} logical CPUs, onnxruntime {ort.__version__}"
