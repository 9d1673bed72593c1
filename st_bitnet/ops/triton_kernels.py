"""Triton kernels of ``st_bitnet::ternary_linear`` (imported only by ``cuda_kernel`` at the first CUDA call).

Two passes, both bit-exact with the reference:

1. ``_quantize_rows``: one program per token: absmax, ``x_scale = (1 / absmax) * 127`` (IEEE division,
   ``div_rn``; torch evaluates ``127 / t`` as ``t.reciprocal() * 127``), ``x_q = rne(x * x_scale)``
   clamped to [-128, 127]; a row holding NaN or +-inf gets ``x_q = 0`` and a NaN scale (all its outputs
   NaN, as in the reference). Rounding uses the ``(v + 1.5 * 2**23) - 1.5 * 2**23`` identity (exact RNE
   for ``|v| < 2**22``); kernels launch with ``enable_fp_fusion=False`` so ``x * x_scale`` is rounded
   to float32 before, as in torch, and never contracted into an FMA.
2. A GEMM with the rescale fused in its epilogue, ``y = float(acc) / (weight_scale * x_scale) (+ bias)``
   (``div_rn`` again; Triton's plain ``/`` is an approximate division; bf16 outputs are rounded to
   nearest-even on the bits, as torch does, since the interpreter's cast truncates):

   * ``_int8_gemm``: int8 weights ``(N, K)`` resident, int8 x int8 tensor-core dot (large M);
   * ``_packed2_gemm``: the on-disk 2-bit layout ``(ceil(N/4), K)``; each weight byte is loaded once
     and decoded into 4 ternary tiles (output rows ``r + s * ceil(N/4)``), 4 dots share the activation
     tile (small M: 8x fewer weight bytes than int8).

Block shapes are autotuned per (M bucket, N, K) on a GPU; under ``TRITON_INTERPRET=1`` (CPU tests) a
fixed small configuration runs instead.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layouts import has_invalid_codes
from .weight_cache import WeightCache

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_RNE_MAGIC = 12582912.0  # 1.5 * 2**23
_FLT_MAX = 3.4028234663852886e38


@triton.jit
def _quantize_rows(x_ptr, xq_ptr, xs_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    bad = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
        # NaN or +-inf (maximum may drop a NaN): the row's outputs are NaN, as in the reference
        bad = bad | (~(tl.abs(v) <= _FLT_MAX)).to(tl.int32)
    row_bad = tl.max(bad, axis=0) > 0
    a = tl.maximum(tl.max(amax, axis=0), 1e-5)
    s = tl.math.div_rn(1.0, a) * 127.0
    s = tl.where(row_bad, float("nan"), s)
    for k0 in range(0, K, BLOCK_K):
        m = k0 + offs < K
        v = tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
        q = v * s
        q = (q + _RNE_MAGIC) - _RNE_MAGIC
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        q = tl.where(row_bad, 0.0, q)
        tl.store(xq_ptr + row * stride_qm + k0 + offs, q.to(tl.int8), mask=m)
    tl.store(xs_ptr + row, s)


@triton.jit
def _epilogue(acc, xs_ptr, ws_ptr, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS: tl.constexpr):
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=1.0)
    ws = tl.load(ws_ptr).to(tl.float32)
    denom = ws * xs
    y = tl.math.div_rn(acc.to(tl.float32), denom[:, None])
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if y_ptr.dtype.element_ty == tl.bfloat16:
        # float32 -> bfloat16 round-to-nearest-even on the bits, as torch does (the interpreter truncates)
        u = y.to(tl.uint32, bitcast=True)
        u = u + (0x7FFF + ((u >> 16) & 1))
        out = (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = y.to(y_ptr.dtype.element_ty)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], out, mask=mask)


@triton.jit
def _int8_gemm(
    xq_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, y_ptr, M, N, K, M_BUCKET, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: consecutive programs share weight tiles in L2
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm_safe = tl.where(rm < M, rm, 0).to(tl.int64)
    rn_safe = tl.where(rn < N, rn, 0).to(tl.int64)
    a_ptrs = xq_ptr + rm_safe[:, None] * stride_xm + rk[None, :]
    b_ptrs = w_ptr + rn_safe[None, :] * stride_wn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=rk[None, :] < K - k0, other=0)
        b = tl.load(b_ptrs, mask=rk[:, None] < K - k0, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    _epilogue(acc, xs_ptr, ws_ptr, bias_ptr, y_ptr, rm, rn, M, N, stride_ym, HAS_BIAS)


@triton.jit
def _packed2_gemm(
    xq_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, y_ptr, M, N, K, R, M_BUCKET, stride_xm, stride_wr, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(0)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    rm_safe = tl.where(rm < M, rm, 0).to(tl.int64)
    rr_safe = tl.where(rr < R, rr, 0).to(tl.int64)
    a_ptrs = xq_ptr + rm_safe[:, None] * stride_xm + rk[None, :]
    b_ptrs = w_ptr + rr_safe[None, :] * stride_wr + rk[:, None]
    acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.int32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.int32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.int32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=rk[None, :] < K - k0, other=0)
        p = tl.load(b_ptrs, mask=rk[:, None] < K - k0, other=0x55)  # padding: code 1 = weight 0
        acc0 = tl.dot(a, ((p & 3).to(tl.int8) - 1), acc0, out_dtype=tl.int32)
        acc1 = tl.dot(a, (((p >> 2) & 3).to(tl.int8) - 1), acc1, out_dtype=tl.int32)
        acc2 = tl.dot(a, (((p >> 4) & 3).to(tl.int8) - 1), acc2, out_dtype=tl.int32)
        acc3 = tl.dot(a, ((p >> 6).to(tl.int8) - 1), acc3, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    # byte row r holds output rows r, r + R, r + 2R, r + 3R (rows past N are padding: masked)
    rr_out = tl.where(rr < R, rr, N)
    _epilogue(acc0, xs_ptr, ws_ptr, bias_ptr, y_ptr, rm, rr_out, M, N, stride_ym, HAS_BIAS)
    _epilogue(acc1, xs_ptr, ws_ptr, bias_ptr, y_ptr, rm, rr_out + R, M, N, stride_ym, HAS_BIAS)
    _epilogue(acc2, xs_ptr, ws_ptr, bias_ptr, y_ptr, rm, rr_out + 2 * R, M, N, stride_ym, HAS_BIAS)
    _epilogue(acc3, xs_ptr, ws_ptr, bias_ptr, y_ptr, rm, rr_out + 3 * R, M, N, stride_ym, HAS_BIAS)


def _int8_configs():
    cfgs = []
    for bm, bn, bk, stages, warps in [
        (128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 64, 4, 4),
        (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (32, 64, 256, 4, 4), (16, 64, 256, 4, 4),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps))
    return cfgs


def _packed2_configs():
    cfgs = []
    for bm, br, bk, stages, warps in [
        (16, 32, 256, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 3, 4), (32, 32, 256, 4, 4), (32, 64, 128, 4, 4),
        (64, 32, 128, 4, 4), (64, 64, 128, 3, 4), (128, 64, 128, 3, 8),
    ]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_R": br, "BLOCK_K": bk}, num_stages=stages, num_warps=warps))
    return cfgs


if INTERPRET:
    _int8_launch, _packed2_launch = _int8_gemm, _packed2_gemm
    _INT8_FIXED = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
    _PACKED2_FIXED = {"BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 32}
else:
    _int8_launch = triton.autotune(_int8_configs(), key=["M_BUCKET", "N", "K"])(_int8_gemm)
    _packed2_launch = triton.autotune(_packed2_configs(), key=["M_BUCKET", "N", "K"])(_packed2_gemm)
    _INT8_FIXED = _PACKED2_FIXED = {}

_codes_checked = WeightCache()


def _m_bucket(m: int) -> int:
    return 1 << max(4, (m - 1).bit_length())


def quantize_rows(x2: torch.Tensor):
    m, k = x2.shape
    xq = torch.empty(m, k, dtype=torch.int8, device=x2.device)
    xs = torch.empty(m, dtype=torch.float32, device=x2.device)
    if m:
        block = min(triton.next_power_of_2(k), 4096 if not INTERPRET else 256)
        _quantize_rows[(m,)](x2, xq, xs, k, x2.stride(0), xq.stride(0), BLOCK_K=block, enable_fp_fusion=False)
    return xq, xs


def ternary_linear_triton(x, weight, weight_scale, bias, out_features, layout):
    """The op on CUDA (inputs already checked): quantize pass + fused-epilogue GEMM."""
    k = x.shape[-1]
    n = out_features
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if m:
        xq, xs = quantize_rows(x2)
        ws = weight_scale.reshape(1)
        has_bias = bias is not None
        b = bias if has_bias else ws  # any valid pointer when unused
        bucket = _m_bucket(m)
        if layout == "int8":
            w = weight if weight.stride(-1) == 1 else weight.contiguous()

            def grid(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

            _int8_launch[grid](
                xq, w, xs, ws, b, y, m, n, k, bucket, xq.stride(0), w.stride(0), y.stride(0),
                HAS_BIAS=has_bias, enable_fp_fusion=False, **_INT8_FIXED,
            )
        else:
            if _codes_checked.get(weight, "packed2", lambda: has_invalid_codes(weight)):
                raise ValueError("packed2 ternary weight holds the invalid 2-bit code 3 (corrupt checkpoint?)")
            w = weight if weight.stride(-1) == 1 else weight.contiguous()
            r = w.shape[0]

            def grid(meta):
                return (triton.cdiv(r, meta["BLOCK_R"]), triton.cdiv(m, meta["BLOCK_M"]))

            _packed2_launch[grid](
                xq, w, xs, ws, b, y, m, n, k, r, bucket, xq.stride(0), w.stride(0), y.stride(0),
                HAS_BIAS=has_bias, enable_fp_fusion=False, **_PACKED2_FIXED,
            )
    y = y.reshape(*x.shape[:-1], n)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def self_test(device: torch.device) -> None:
    """Raise unless both GEMMs agree bit for bit with the reference on a few awkward shapes."""
    from ..bitlinear import ternary_linear_reference
    from .layouts import to_layout

    g = torch.Generator().manual_seed(0)
    for m, k, n, dtype in ((5, 70, 37, torch.float32), (33, 130, 64, torch.bfloat16), (1, 16, 3, torch.float16)):
        x = torch.randn(m, k, generator=g).to(dtype)
        w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
        ws = torch.tensor([1.7])
        bias = torch.randn(n, generator=g)
        want = ternary_linear_reference(x, w, ws, bias)
        for layout in ("int8", "packed2"):
            got = ternary_linear_triton(
                x.to(device), to_layout(w, layout).to(device), ws.to(device), bias.to(device), n, layout
            )
            if not torch.equal(got.cpu(), want):
                raise RuntimeError(f"Triton {layout} kernel self-test failed at M={m} K={k} N={n} {dtype}")
