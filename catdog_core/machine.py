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


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU's model name and its int8 instruction sets, from /proc/cpuinfo (Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first CPU's; they are alike
    name = fields.get("model name") or "CPU unknown"
    flags = set(fields.get("flags", "").split())
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
