"""BitLinear: ternary weights, int8 activations and an RMSNorm inside the projection (W1.58A8).

This file depends on ``torch`` only. It is copied next to every saved model that needs st_bitnet's own
model class, so that users without st_bitnet can load it with ``trust_remote_code=True``; keep it
self-contained (no imports from the rest of st_bitnet).

Numerics (shared by QAT, the reference path and every kernel, and identical to transformers' ``bitnet``
integration so checkpoints in that format give the same numbers with or without st_bitnet):

* weights: absmean ternary per tensor, ``weight_scale = 1 / mean|W|`` (clamped at 1e-5),
  ``W_q = clamp(round(W * weight_scale), -1, 1)``;
* activations: per-token absmax int8, ``x_scale = 127 / max|x|`` (clamped at 1e-5),
  ``x_q = clamp(round(x * x_scale), -128, 127)``;
* output: ``y = (x_q @ W_q^T) / (weight_scale * x_scale) + bias``, where the integer product is exact.

On disk the ternary weights are packed 4 per byte in transformers' ``pack_weights`` layout: a
``uint8`` tensor of shape ``(ceil(N / 4), K)`` whose row ``r`` holds output rows ``r, r + R, r + 2R,
r + 3R`` (``R = ceil(N / 4)``) in bits 0-1, 2-3, 4-5, 6-7, each stored as ``w + 1``.
"""

from __future__ import annotations

import math
import re
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

VALUES_PER_BYTE = 4
# Below this reduction length an fp32 GEMM on int8 x ternary inputs is integer-exact: every partial sum
# is an integer of magnitude <= 128 * K < 2**24, so no rounding can happen in any summation order.
_FP32_EXACT_MAX_K = 2**24 // 128

NORM_PLACEMENTS = ("per_projection", "subln", "none")
# Activation dtypes a packed layer upcasts exactly to float32 before its norm and quantization.
_NARROW_FLOATS = (torch.bfloat16, torch.float16)
# Projections fed by attention / FFN internals: the only ones that get a norm under "subln" (BitDistill).
_SUBLN_RE = re.compile(
    r"(^|\.)(o_proj|down_proj|out_proj|fc2|dense_4h_to_h|c_proj)$"
    r"|(^|\.)attention\.output\.dense$"
    r"|(^|\.)layer\.\d+\.output\.dense$"
)


def projection_gets_norm(name: str, placement: str) -> bool:
    """Whether the projection called ``name`` gets its own RMSNorm under ``placement``."""
    if placement not in NORM_PLACEMENTS:
        raise ValueError(f"norm placement must be one of {NORM_PLACEMENTS}, got {placement!r}")
    if placement == "per_projection":
        return True
    if placement == "subln":
        return bool(_SUBLN_RE.search(name))
    return False


# --------------------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------------------
class _RoundClampSTE(torch.autograd.Function):
    """round + clamp in the forward pass, identity gradient in the backward pass (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return x.round().clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


class _InferenceOnly(torch.autograd.Function):
    """Identity forward; a backward pass through a packed layer raises a clear error (nothing there can train)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError(
            "a packed BitLinear is inference-only (2-bit weights, no backward through its kernel): fine-tune the "
            "latent model instead (before st_bitnet.pack / save_pretrained), e.g. with LoRA via st_bitnet.lora"
        )


def weight_scale_absmean(weight: torch.Tensor) -> torch.Tensor:
    """Per-tensor ternary scale ``1 / mean|W|`` in float32, shape ``(1,)``."""
    return (1.0 / weight.detach().float().abs().mean().clamp(min=1e-5)).reshape(1)


def quantize_weight_ternary(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternary quantization: returns ``(W_q as int8 in {-1, 0, 1}, weight_scale (1,) fp32)``."""
    scale = weight_scale_absmean(weight)
    w_q = (weight.detach().float() * scale).round().clamp(-1, 1).to(torch.int8)
    return w_q, scale


def activation_scale_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-token int8 scale ``127 / max|x|`` over the last dimension, float32, keepdim."""
    return 127.0 / x.detach().float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantization: returns ``(x_q int8, x_scale fp32 of shape (..., 1))``.

    A token holding NaN or +-inf gets ``x_q = 0`` and a NaN (NaN input) or 0 (inf input) ``x_scale``, so its
    outputs ``x_q @ W_q^T / (weight_scale * x_scale)`` are all NaN (``0 / NaN``, ``0 / 0``), as in the QAT
    path. (Casting NaN to int8 is platform-defined; mapping it to 0 first keeps that result everywhere.)
    """
    scale = activation_scale_absmax(x)
    x_q = (x.float() * scale).round().clamp(-128, 127).nan_to_num(nan=0.0).to(torch.int8)
    return x_q, scale


# --------------------------------------------------------------------------------------------------
# 2-bit packing (transformers' layout)
# --------------------------------------------------------------------------------------------------
def pack_ternary(w_q: torch.Tensor) -> torch.Tensor:
    """Pack a ternary ``(N, K)`` tensor (values in {-1, 0, 1}) into ``uint8 (ceil(N/4), K)``.

    Works for any ``N`` (rows past ``N`` are zero-padded). For ``N % 4 == 0`` the result is
    byte-identical to ``transformers.integrations.bitnet.pack_weights``.
    """
    if w_q.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-D (out_features, in_features) tensor, got shape {tuple(w_q.shape)}")
    if w_q.numel() and (w_q.min() < -1 or w_q.max() > 1):
        raise ValueError("pack_ternary expects values in {-1, 0, 1}")
    n, k = w_q.shape
    rows = (n + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE
    padded = torch.zeros(rows * VALUES_PER_BYTE, k, dtype=torch.uint8, device=w_q.device)
    padded[:n] = (w_q.to(torch.int16) + 1).to(torch.uint8)
    packed = torch.zeros(rows, k, dtype=torch.uint8, device=w_q.device)
    for i in range(VALUES_PER_BYTE):
        packed |= padded[i * rows : (i + 1) * rows] << (2 * i)
    return packed


def unpack_ternary(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: ``uint8 (ceil(N/4), K)`` -> ``int8 (N, K)`` in {-1, 0, 1}."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_ternary expects a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    rows = packed.shape[0]
    if rows != (out_features + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE:
        raise ValueError(
            f"packed weight has {rows} rows, but out_features={out_features} needs "
            f"{(out_features + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE} (4 ternary values per byte along dim 0)"
        )
    parts = [((packed >> (2 * i)) & 3) for i in range(VALUES_PER_BYTE)]
    full = torch.cat(parts, dim=0)[:out_features]
    codes_ok = full.numel() == 0 or int(full.max()) <= 2
    if not codes_ok:
        raise ValueError("packed weight holds the invalid 2-bit code 3 (corrupt checkpoint?)")
    return full.to(torch.int8) - 1


# --------------------------------------------------------------------------------------------------
# Reference inference path
# --------------------------------------------------------------------------------------------------
def _exact_int_matmul(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Integer-exact ``x_q @ w_q^T`` returned as float32 (values are exact integers)."""
    k = x_q.shape[-1]
    # fp32 is exact below _FP32_EXACT_MAX_K (see above); on CUDA use fp64 so TF32 settings cannot matter.
    use_fp64 = k > _FP32_EXACT_MAX_K or x_q.device.type != "cpu"
    dtype = torch.float64 if use_fp64 else torch.float32
    # an ambient autocast (a bf16 training loop, a user's context) would round the products
    with torch.autocast(x_q.device.type, enabled=False):
        return F.linear(x_q.to(dtype), w_q.to(dtype)).to(torch.float32)


def ternary_linear_reference(
    x: torch.Tensor,
    weight_q: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The one reference W1.58A8 linear: every kernel is tested against this, bit for bit.

    Args:
        x: activations ``(..., K)``, any float dtype (already RMS-normalized if the layer has a norm).
        weight_q: ternary weights ``(N, K)`` as int8 (unpacked).
        weight_scale: ``(1,)`` tensor, ``1 / mean|W|``.
        bias: optional ``(N,)``.

    Returns:
        ``(..., N)`` in ``x.dtype``: ``(x_q @ W_q^T) / (weight_scale * x_scale) (+ bias)``, computed in
        float32 with an exact integer accumulation.
    """
    x_q, x_scale = quantize_activations_int8(x)
    acc = _exact_int_matmul(x_q, weight_q)
    y = acc / (weight_scale.float() * x_scale)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def packed_linear_reference(module: "BitLinear", x: torch.Tensor) -> torch.Tensor:
    """Reference forward of a packed BitLinear (unpacks on every call; kernels cache their layout)."""
    w_q = module.unpacked_weight()
    return ternary_linear_reference(x, w_q, module.weight_scale, module.bias)


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------
class BitRMSNorm(nn.Module):
    """RMSNorm with the exact arithmetic of transformers' ``LlamaRMSNorm`` (``weight * x / rms(x)``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


class BitLinear(nn.Module):
    """Drop-in ``nn.Linear`` replacement with ternary weights and int8 activations.

    Two states share one class:

    * **latent** (training, QAT): ``weight`` is a float ``nn.Parameter`` ``(N, K)``; the forward
      quantizes weights and activations on the fly with straight-through gradients.
    * **packed** (inference): ``weight`` is a ``uint8`` buffer ``(ceil(N/4), K)`` plus ``weight_scale``;
      the forward runs the installed kernel or the integer-exact reference.

    Both give the same numbers in float32 (the integer product is exact in either), so a model packed
    after training embeds exactly as it did before. The state dict of a packed layer uses
    transformers' BitNet names: ``weight``, ``weight_scale``, ``bias``, ``rms_norm.weight``.

    Args:
        in_features / out_features / bias: as for ``nn.Linear``.
        use_rms_norm: put an RMSNorm on the input, before the activation quantization.
        rms_norm_eps: its epsilon.
        packed: build the layer in the packed state (for loading packed checkpoints).

    Dtypes of a packed layer: its scale, bias and norm weight are float32 and stay float32 through
    ``model.to(torch.bfloat16)`` / ``.half()`` (device moves apply as usual); a bf16 or fp16 input is upcast
    exactly, normalized, quantized and rescaled in float32 (the same int8 values as the float32 model on those
    input values) and only the output is rounded to the input's dtype. So casting a packed model to bf16 runs the
    rest of the model (attention, norms, rotary, activations, embeddings) in bf16 and the projections unchanged.

    The packed forward runs :attr:`packed_kernel` when one is installed (``import st_bitnet`` installs the
    st_bitnet.ops kernels with :meth:`set_packed_kernel`), else the integer-exact reference: a copy of this file
    loaded through ``trust_remote_code`` without st_bitnet runs the reference.
    """

    packed_kernel: ClassVar[Callable[["BitLinear", torch.Tensor], torch.Tensor] | None] = None

    @classmethod
    def set_packed_kernel(cls, fn: Callable[["BitLinear", torch.Tensor], torch.Tensor] | None) -> None:
        """Install ``fn(module, x) -> Tensor`` as the inference path of packed layers of this class (None: reference).

        ``x`` is the RMS-normalized input, unless ``fn.applies_rms_norm`` is true: then ``fn`` receives the
        raw input and applies ``module.rms_norm`` itself (kernels that fuse the norm into their quantization).

        Example::

            BitLinear.set_packed_kernel(None)   # every packed layer runs the reference until kernels are set again
        """
        cls.packed_kernel = None if fn is None else staticmethod(fn)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        use_rms_norm: bool = True,
        rms_norm_eps: float = 1e-6,
        packed: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"BitLinear needs positive sizes, got in={in_features}, out={out_features}")
        self.in_features = in_features
        self.out_features = out_features
        # a packed layer computes its norm, scale and bias in float32 whatever the model's dtype (see ``_apply``)
        float_dtype = torch.float32 if packed else dtype
        self.rms_norm = BitRMSNorm(in_features, eps=rms_norm_eps, device=device, dtype=float_dtype) if use_rms_norm else None
        if packed:
            rows = (out_features + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE
            self.weight = nn.Buffer(torch.zeros(rows, in_features, dtype=torch.uint8, device=device))
            self.weight_scale = nn.Buffer(torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=float_dtype))
        else:
            self.register_parameter("bias", None)
        self._kernel_state = None  # layout cached by a kernel at first use (never saved)

    @property
    def is_packed(self) -> bool:
        return self.weight.dtype == torch.uint8

    @classmethod
    def from_linear(cls, linear: nn.Linear, use_rms_norm: bool = True, rms_norm_eps: float = 1e-6) -> "BitLinear":
        """A latent BitLinear that starts from ``linear``'s weights (and bias); its norm starts at identity."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            use_rms_norm=use_rms_norm,
            rms_norm_eps=rms_norm_eps,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new.train(linear.training)
        return new

    # -- state changes ----------------------------------------------------------------------------
    @torch.no_grad()
    def pack_(self) -> "BitLinear":
        """Quantize the latent weights and switch this layer to the packed state (in place)."""
        if self.is_packed:
            return self
        w_q, scale = quantize_weight_ternary(self.weight)
        del self.weight
        self.weight = nn.Buffer(pack_ternary(w_q))
        self.weight_scale = nn.Buffer(scale)  # float32 whatever the latent dtype: QAT divides by the fp32 scale
        if self.bias is not None:
            self.bias.requires_grad_(False)
        if self.rms_norm is not None:
            self.rms_norm.weight.requires_grad_(False)
        self._kernel_state = None
        return self

    def unpacked_weight(self) -> torch.Tensor:
        """Ternary weights as int8 ``(N, K)`` (quantizing the latent weights if not packed)."""
        if self.is_packed:
            return unpack_ternary(self.weight, self.out_features)
        return quantize_weight_ternary(self.weight)[0]

    def ternary_scale(self) -> torch.Tensor:
        return self.weight_scale if self.is_packed else weight_scale_absmean(self.weight)

    def _packed_float_state(self) -> list[tuple[nn.Module, str]]:
        """(owner, name) of the float tensors a packed layer computes with: scale, bias, norm weight."""
        slots = [(self, "weight_scale"), (self, "bias")]
        if self.rms_norm is not None:
            slots.append((self.rms_norm, "weight"))
        return [(owner, name) for owner, name in slots if getattr(owner, name, None) is not None]

    def _apply(self, fn, recurse=True):
        self._kernel_state = None  # device/dtype moves invalidate a kernel's cached layout
        if not self.is_packed:
            return super()._apply(fn, recurse)
        # A packed layer keeps the dtype of its scale, bias and norm weight (float32) through dtype casts such as
        # ``model.to(torch.bfloat16)``: the rest of the model then runs in bf16 while this layer still quantizes
        # and rescales in float32 (rounding the scale to bf16 would change every output). Device moves apply.
        before = [(owner, name, getattr(owner, name).detach()) for owner, name in self._packed_float_state()]
        super()._apply(fn, recurse)
        for owner, name, old in before:
            new = getattr(owner, name)
            if new.dtype == old.dtype:
                continue
            kept = old.to(device=new.device)
            if isinstance(new, nn.Parameter):
                new.data = kept
            else:
                owner._buffers[name] = kept
        return self

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"BitLinear expected last dimension {self.in_features}, got input of shape {tuple(x.shape)}")
        if self.is_packed:
            out_dtype = x.dtype
            if out_dtype in _NARROW_FLOATS:
                # bf16/fp16 activations (a model cast with ``.to(torch.bfloat16)``): the norm, the int8 quantization
                # and the rescale run in float32 on the exactly upcast input, as the float32 model would for the
                # same values; only the output is rounded to the input dtype.
                x = x.float()
            impl = self.packed_kernel
            if impl is not None and getattr(impl, "applies_rms_norm", False):
                y = impl(self, x)  # the kernel fuses the norm into its activation quantization
            else:
                y = (impl or packed_linear_reference)(self, x if self.rms_norm is None else self.rms_norm(x))
            y = y.to(out_dtype)
            # same outcome whichever path ran: training through a packed layer fails at backward, with a reason
            return _InferenceOnly.apply(y) if y.requires_grad else y
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        return self._qat_forward(x)

    def _qat_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scales are treated as constants; round/clamp pass gradients straight through. In float32 the
        # product of the integer-valued operands is exact, so this equals the reference bit for bit.
        w_scale = weight_scale_absmean(self.weight)
        x_scale = activation_scale_absmax(x)
        compute_dtype = torch.promote_types(x.dtype, torch.float32) if not torch.is_autocast_enabled() else x.dtype
        w_int = _RoundClampSTE.apply(self.weight.to(compute_dtype) * w_scale.to(compute_dtype), -1.0, 1.0)
        x_int = _RoundClampSTE.apply(x.to(compute_dtype) * x_scale.to(compute_dtype), -128.0, 127.0)
        acc = F.linear(x_int, w_int)
        y = acc.float() / (w_scale * x_scale)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        state = "packed" if self.is_packed else "latent"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {state}"
