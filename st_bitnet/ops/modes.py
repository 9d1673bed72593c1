"""The kernel switches: which path packed BitLinear layers take, read from the environment or set in code.

* ``ST_BITNET_KERNEL=auto|reference`` or :func:`set_kernel_mode`: ``reference`` forces the pure-PyTorch reference
  everywhere (same numbers, slower); ``auto`` (default) uses the device kernels where they are usable.
* ``ST_BITNET_GPU_WEIGHTS=auto|int8|2bit``: the weight layout kept on CUDA (``auto`` keeps int8 for large batches
  and the on-disk 2-bit codes for small ones; ``2bit`` saves memory, ``int8`` speed).
* ``ST_BITNET_CPU_ISA=native|avx2|scalar``: the instruction set the CPU kernel is compiled for.
* ``ST_BITNET_CPU_AMX=auto|off``: ``auto`` (default) multiplies on Intel AMX tiles where the CPU, the OS and the
  compiler allow it and the library passes its self-test (int8-resident weights, 4x the 2-bit memory); ``off``
  keeps the AVX-512 VNNI / AVX2 path.

This module imports nothing from the kernels, so every kernel module can read the switches.

Example::

    from st_bitnet.ops.modes import set_kernel_mode
    set_kernel_mode("reference")   # until set_kernel_mode(None): back to $ST_BITNET_KERNEL
"""

from __future__ import annotations

import os

KERNEL_MODES = ("auto", "reference")
GPU_WEIGHT_MODES = ("auto", "int8", "2bit")
DEFAULT_CPU_ISA = "native"
CPU_AMX_MODES = ("auto", "off")

_mode: str | None = None
_env_cache: tuple[str | None, str] | None = None  # (raw $ST_BITNET_KERNEL, parsed mode)


def _env_mode() -> str:
    global _env_cache
    raw = os.environ.get("ST_BITNET_KERNEL")
    if _env_cache is not None and _env_cache[0] == raw:  # read on every forward: parse only on change
        return _env_cache[1]
    mode = (raw or "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"ST_BITNET_KERNEL must be one of {KERNEL_MODES}, got {mode!r}")
    _env_cache = (raw, mode)
    return mode


def set_kernel_mode(mode: str | None) -> None:
    """``"auto"``: device kernels where usable; ``"reference"``: always the pure-PyTorch reference;
    ``None``: back to ``$ST_BITNET_KERNEL`` (default ``auto``).

    Raises:
        ValueError: For any other value.
    """
    global _mode
    if mode is not None and mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode must be one of {KERNEL_MODES} or None, got {mode!r}")
    _mode = mode


def kernel_mode() -> str:
    """The mode in force: the one set in code, else ``$ST_BITNET_KERNEL``, else ``"auto"``."""
    return _mode or _env_mode()


def kernels_enabled() -> bool:
    """Whether device kernels may run (``kernel_mode() == "auto"``)."""
    return kernel_mode() == "auto"


def gpu_weight_mode() -> str:
    """``$ST_BITNET_GPU_WEIGHTS`` (default ``auto``), checked against :data:`GPU_WEIGHT_MODES`."""
    mode = os.environ.get("ST_BITNET_GPU_WEIGHTS", "auto").strip().lower() or "auto"
    if mode not in GPU_WEIGHT_MODES:
        raise ValueError(f"ST_BITNET_GPU_WEIGHTS must be one of {GPU_WEIGHT_MODES}, got {mode!r}")
    return mode


def cpu_isa() -> str:
    """``$ST_BITNET_CPU_ISA`` (default ``native``): the instruction set the CPU kernel is built for."""
    return os.environ.get("ST_BITNET_CPU_ISA", DEFAULT_CPU_ISA)


def cpu_amx_mode() -> str:
    """``$ST_BITNET_CPU_AMX`` (default ``auto``), checked against :data:`CPU_AMX_MODES`."""
    mode = os.environ.get("ST_BITNET_CPU_AMX", "auto").strip().lower() or "auto"
    if mode not in CPU_AMX_MODES:
        raise ValueError(f"ST_BITNET_CPU_AMX must be one of {CPU_AMX_MODES}, got {mode!r}")
    return mode
