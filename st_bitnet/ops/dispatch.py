"""Routing packed BitLinear layers to ``st_bitnet::ternary_linear`` with a cached per-device layout.

:func:`packed_linear` runs a packed layer through the op. At the first call on a device it converts the layer's on-disk weights once into the layout that device's kernel
reads and keeps it in ``module._kernel_state`` (BitLinear drops that cache on ``.to()``; a changed
weight tensor, e.g. after ``load_state_dict``, is detected too):

* CPU: ``tile16`` (2-bit, same memory as on disk); on AMX CPUs also ``amx64`` int8 tiles (4x), built at the first
  call of at least ``cpu_kernel.AMX_MIN_TOKENS`` tokens, which then run on the tile unit.
* CUDA: ``int8`` (4x the disk size) for large batches, where int8 tensor cores win, and the on-disk
  ``packed2`` for small batches, where reading 8x fewer weight bytes wins. Choose with
  ``ST_BITNET_GPU_WEIGHTS=auto|int8|2bit`` (``auto`` keeps both; ``2bit`` saves memory).

What BitLinear installs is :func:`packed_forward` (it receives the raw input and applies the layer's
RMSNorm itself): on CPU, for float32, it calls the C library directly (no op dispatch) with the norm
fused into the kernel's quantization pass, bit-identical to ``BitRMSNorm`` + the reference. Elsewhere
(CUDA, other dtypes, ``torch.compile``, inputs that need gradients) it runs the norm in PyTorch and
then :func:`packed_linear` (the op).

Switches (``ST_BITNET_KERNEL``, ``ST_BITNET_GPU_WEIGHTS``, :func:`set_kernel_mode`): :mod:`st_bitnet.ops.modes`.
"""

from __future__ import annotations

import torch

from ..bitlinear import packed_linear_reference, unpack_ternary
from . import cpu_kernel
from .layouts import pack_amx64, pack_tile16
from .modes import gpu_weight_mode, kernels_enabled

# CUDA: at or above this many tokens, use int8-resident weights (tensor-core bound); below, 2-bit.
GPU_INT8_MIN_TOKENS = 64


def _weight_key(module) -> tuple:
    w = module.weight
    try:
        version = w._version
    except RuntimeError:  # inference tensor: cannot change in place
        version = -1
    return (w.device, w.data_ptr(), version)


def _build_state(module, device: torch.device) -> dict:
    n = module.out_features
    state = {"key": _weight_key(module)}
    if device.type == "cpu":
        state["cpu"] = pack_tile16(unpack_ternary(module.weight, n))
    elif device.type == "cuda":
        mode = gpu_weight_mode()
        state["gpu_mode"] = mode
        if mode in ("auto", "int8"):
            state["int8"] = unpack_ternary(module.weight, n).contiguous()
        if mode in ("auto", "2bit"):
            unpack_ternary(module.weight, n)  # validates the 2-bit codes once
            state["packed2"] = module.weight
    return state


def _kernel_state(module, device: torch.device):
    state = module._kernel_state
    if torch.compiler.is_compiling():
        return state  # no cache bookkeeping while tracing; a state built eagerly before is reused
    if state is None or state["key"] != _weight_key(module):
        state = _build_state(module, device)
        module._kernel_state = state
    return state


def packed_linear(module, x: torch.Tensor) -> torch.Tensor:
    """Forward of a packed BitLinear on ``x`` (already RMS-normalized) through the op."""
    if not kernels_enabled() or x.device.type not in ("cpu", "cuda"):
        return packed_linear_reference(module, x)
    if x.device != module.weight.device:
        raise ValueError(f"BitLinear: input is on {x.device} but the layer's weights are on {module.weight.device}")
    op = torch.ops.st_bitnet.ternary_linear
    n = module.out_features
    state = _kernel_state(module, x.device)
    if state is None:  # traced by torch.compile before any eager call: the op converts (and caches) itself
        return op(x, module.weight, module.weight_scale, module.bias, n, "packed2")
    if x.device.type == "cpu":
        return op(x, state["cpu"], module.weight_scale, module.bias, n, "tile16")
    tokens = x.numel() // x.shape[-1]
    if "int8" in state and ("packed2" not in state or tokens >= GPU_INT8_MIN_TOKENS):
        return op(x, state["int8"], module.weight_scale, module.bias, n, "int8")
    return op(x, state["packed2"], module.weight_scale, module.bias, n, "packed2")


def _cpu_fused_ok(module, x: torch.Tensor) -> bool:
    """Whether the direct C call (norm fused) may run: eager CPU float32 inference with the kernel on."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or module.weight.device.type != "cpu":
        return False
    norm = module.rms_norm
    if norm is not None and norm.weight.dtype != torch.float32:
        return False  # other dtypes round in between (BitRMSNorm casts back to the input dtype): unfused
    if torch.is_grad_enabled() and (
        x.requires_grad
        or (norm is not None and norm.weight.requires_grad)
        or (module.bias is not None and module.bias.requires_grad)
    ):
        return False  # the C call records no autograd graph
    return kernels_enabled() and not torch.compiler.is_compiling()


def packed_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Forward of a packed BitLinear on its raw input ``x`` (the layer's RMSNorm, if any, applied here).

    CPU float32 eager inference: one call into the C library, RMSNorm + activation quantization +
    ternary GEMM + rescale fused, bit-identical to ``ternary_linear_reference(BitRMSNorm(x), ...)``.
    Otherwise the norm runs in PyTorch and the result goes through :func:`packed_linear`.
    """
    norm = module.rms_norm
    if _cpu_fused_ok(module, x):
        lib = cpu_kernel.load_library()
        if lib is not None:
            state = _kernel_state(module, x.device)
            ws, bias = module.weight_scale, module.bias
            if ws.numel() != 1 or (bias is not None and bias.shape != (module.out_features,)):
                # malformed module: let the op raise its clear error
                return packed_linear(module, x if norm is None else norm(x))
            norm_args = (None if norm is None else norm.weight, 0.0 if norm is None else norm.variance_epsilon)
            amx = cpu_kernel.amx_library_for(x)
            if amx is not None:
                if "amx" not in state:
                    state["amx"] = pack_amx64(unpack_ternary(module.weight, module.out_features))
                return cpu_kernel.run_amx64(amx, x, state["amx"], ws, bias, module.out_features, *norm_args)
            return cpu_kernel.run_tile16(lib, x, state["cpu"], ws, bias, module.out_features, *norm_args)
    if norm is not None:
        x = norm(x)
    return packed_linear(module, x)


packed_forward.applies_rms_norm = True  # BitLinear hands it the raw input
