"""Low-bit kernels behind BitLinear: one op, ``torch.ops.st_bitnet.ternary_linear``, with per-device kernels.

* :mod:`.ternary_linear`: the op schema; default body = the integer-exact pure-PyTorch reference.
* :mod:`.cpu_kernel`: C kernel (AVX-512 VNNI / AVX2 / NEON dotprod / scalar, OpenMP), built with the
  system compiler at first use and cached; falls back to the reference with one warning.
* :mod:`.cuda_kernel`: Triton kernels, imported at the first call on a CUDA tensor (never at import).
* :mod:`.modes`: the switches (``ST_BITNET_KERNEL``, ``ST_BITNET_GPU_WEIGHTS``, ``ST_BITNET_CPU_ISA``).
* :mod:`.dispatch`: the packed-BitLinear forward (per-device weight layout cached on the module; on
  CPU the layer's RMSNorm is fused into the kernel).

Importing this package neither initialises CUDA nor imports Triton. ``register_kernels()`` (called by
``import st_bitnet``) is idempotent and only registers Python callables.

Example::

    import torch, st_bitnet
    from st_bitnet.ops import set_kernel_mode
    layer = st_bitnet.BitLinear(640, 2048).eval()
    layer.pack_()
    y = layer(torch.randn(8, 640))        # C kernel on CPU, Triton on CUDA
    set_kernel_mode("reference")           # or ST_BITNET_KERNEL=reference: pure PyTorch, same numbers
"""

from __future__ import annotations

from . import cpu_kernel, cuda_kernel
from .dispatch import packed_forward, packed_linear
from .modes import kernel_mode, set_kernel_mode
from .layouts import LAYOUTS, decode_weight, pack_tile16, to_layout, unpack_tile16
from .ternary_linear import ternary_linear

_registered = False


def register_kernels() -> None:
    """Register the device kernels on the op and install :func:`packed_forward` as BitLinear's packed
    forward. Idempotent and cheap (kernels build/compile lazily at their first call)."""
    global _registered
    if _registered:
        return
    from ..bitlinear import BitLinear

    cpu_kernel.register()
    cuda_kernel.register()
    BitLinear.set_packed_kernel(packed_forward)
    _registered = True


__all__ = [
    "LAYOUTS",
    "decode_weight",
    "kernel_mode",
    "pack_tile16",
    "packed_forward",
    "packed_linear",
    "register_kernels",
    "set_kernel_mode",
    "ternary_linear",
    "to_layout",
    "unpack_tile16",
]
