"""CUDA kernel of ``st_bitnet::ternary_linear``: Triton, loaded at the first call on a CUDA tensor.

Registering this kernel only stores a Python callable for the CUDA dispatch key: it neither imports
Triton nor touches CUDA. At the first call it imports :mod:`.triton_kernels`, runs a small self-test
against the reference on the device and, if Triton is missing or anything disagrees, warns once and
uses the pure-PyTorch reference from then on (same numbers, slower).

Layouts: ``int8`` (int8 tensor-core GEMM, large batches) and ``packed2`` (2-bit weights decoded in the
K loop, small batches); anything else runs the reference.
"""

from __future__ import annotations

import threading
import warnings

import torch

from .modes import kernels_enabled
from .ternary_linear import check_inputs, reference_impl, ternary_linear

_lock = threading.Lock()
_impl = None  # the triton_kernels module once usable, or an error string
_registered = False


def _load():
    global _impl
    if _impl is None:
        with _lock:
            if _impl is None:
                try:
                    from . import triton_kernels

                    triton_kernels.self_test(torch.device("cuda", torch.cuda.current_device()))
                    _impl = triton_kernels
                except Exception as e:  # no triton, unsupported GPU, failed self-test
                    _impl = f"{type(e).__name__}: {e}"
                    warnings.warn(
                        f"st_bitnet: the Triton CUDA kernel is unavailable ({_impl.splitlines()[0][:300]}); "
                        "using the pure-PyTorch reference (same numbers, slower).",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return None if isinstance(_impl, str) else _impl


def ternary_linear_cuda(x, weight, weight_scale, bias, out_features, layout):
    check_inputs(x, weight, weight_scale, bias, out_features, layout)
    impl = _load() if kernels_enabled() and layout in ("int8", "packed2") else None
    if impl is None:
        return reference_impl(x, weight, weight_scale, bias, out_features, layout)
    return impl.ternary_linear_triton(x, weight, weight_scale, bias, out_features, layout)


def register() -> None:
    """Register the (lazy) CUDA kernel on the op. Idempotent; imports nothing, touches no device."""
    global _registered
    if not _registered:
        ternary_linear.register_kernel("cuda")(ternary_linear_cuda)
        _registered = True
