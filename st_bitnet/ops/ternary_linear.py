"""The one op schema of st_bitnet's low-bit kernels: ``torch.ops.st_bitnet.ternary_linear``.

``ternary_linear(x, weight, weight_scale, bias, out_features, layout) -> y``

* ``x``: ``(..., K)`` float activations (already RMS-normalized by BitLinear).
* ``weight``: ternary weights in one of the layouts of :mod:`st_bitnet.ops.layouts`
  (``"int8"``, ``"packed2"`` = the on-disk packed layout, ``"tile16"`` = the CPU kernel's).
* ``weight_scale``: ``(1,)`` float, ``1 / mean|W|``; ``bias``: optional ``(N,)`` float.
* returns ``(..., N)`` in ``x.dtype``, equal bit for bit to
  :func:`st_bitnet.bitlinear.ternary_linear_reference`.

The default body (every device, and ``torch.compile``'s fake-tensor pass via ``register_fake``) is the
pure-PyTorch reference. Device kernels register on top of it (``cpu_kernel.py``, ``cuda_kernel.py``)
and must agree with it exactly; tests check that with ``torch.library.opcheck`` and a fuzz.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..bitlinear import ternary_linear_reference
from .layouts import LAYOUTS, decode_weight, expected_weight_dtype, expected_weight_shape

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# int32 accumulators: |sum| <= 2 * 128 * K must stay below 2**31.
MAX_IN_FEATURES = 2**22


def check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    layout: str,
) -> None:
    """Raise a clear error for any input the kernels cannot take (shared by every implementation)."""
    if layout not in LAYOUTS:
        raise ValueError(f"ternary_linear: unknown layout {layout!r}; expected one of {LAYOUTS}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"ternary_linear: x must be a float tensor ({_FLOAT_DTYPES}), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"ternary_linear: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if k >= MAX_IN_FEATURES:
        raise ValueError(f"ternary_linear: in_features {k} is too large (limit {MAX_IN_FEATURES - 1})")
    if out_features < 1:
        raise ValueError(f"ternary_linear: out_features must be positive, got {out_features}")
    for name, t in (("weight", weight), ("weight_scale", weight_scale), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"ternary_linear: {name} is on {t.device} but x is on {x.device}")
    want_dtype = expected_weight_dtype(layout)
    if weight.dtype != want_dtype:
        raise TypeError(f"ternary_linear: a {layout!r} weight must be {want_dtype}, got {weight.dtype}")
    want_shape = expected_weight_shape(layout, out_features, k)
    if tuple(weight.shape) != want_shape:
        raise ValueError(
            f"ternary_linear: a {layout!r} weight for in_features={k}, out_features={out_features} "
            f"must have shape {want_shape}, got {tuple(weight.shape)}"
        )
    if weight_scale.numel() != 1 or not weight_scale.dtype.is_floating_point:
        raise ValueError(
            f"ternary_linear: weight_scale must be a float tensor with one element, got "
            f"{weight_scale.dtype} of shape {tuple(weight_scale.shape)}"
        )
    if bias is not None and (tuple(bias.shape) != (out_features,) or not bias.dtype.is_floating_point):
        raise ValueError(
            f"ternary_linear: bias must be a float tensor of shape ({out_features},), got "
            f"{bias.dtype} of shape {tuple(bias.shape)}"
        )


@torch.library.custom_op("st_bitnet::ternary_linear", mutates_args=())
def ternary_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    layout: str,
) -> torch.Tensor:
    """W1.58A8 linear (default body = the integer-exact pure-PyTorch reference, any device)."""
    check_inputs(x, weight, weight_scale, bias, out_features, layout)
    return reference_impl(x, weight, weight_scale, bias, out_features, layout)


def reference_impl(x, weight, weight_scale, bias, out_features, layout) -> torch.Tensor:
    w_q = decode_weight(weight, layout, out_features, x.shape[-1])
    return ternary_linear_reference(x, w_q, weight_scale.reshape(1), bias)


@ternary_linear.register_fake
def _(x, weight, weight_scale, bias, out_features, layout):
    check_inputs(x, weight, weight_scale, bias, out_features, layout)
    return x.new_empty((*x.shape[:-1], out_features))
