"""What this machine is, for logs and benchmark tables: CPU model and the instruction sets that pick code paths."""

from __future__ import annotations

import platform
from pathlib import Path

# /proc/cpuinfo flags that decide st_bitnet's and oneDNN's fast paths, in the order reported.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimddp")


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags", "Features") and key not in info:
                info[key] = value.strip()
    except OSError:
        pass
    return info


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_isa() -> list[str]:
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return [f for f in ISA_FLAGS if f in flags]


def cpu_description() -> str:
    """``"AMD EPYC (avx2, avx512f, avx512_vnni, avx512_bf16)"``: model name and the relevant ISA flags."""
    isa = cpu_isa()
    return f"{cpu_model()} ({', '.join(isa) if isa else 'no SIMD flags read'})"
