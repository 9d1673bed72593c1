"""Triton kernels of st_bitnet::ternary_linear: bit-exact vs the reference.

Without a GPU they run under Triton's CPU interpreter (``TRITON_INTERPRET=1``) on small shapes; real-GPU
tests are marked ``gpu`` and skip without CUDA.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from st_bitnet.bitlinear import BitLinear, ternary_linear_reference
from st_bitnet.ops import register_kernels, set_kernel_mode
from st_bitnet.ops.layouts import to_layout

_INTERPRETER_CHECKS = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: it reads the switch once
import torch
from st_bitnet.bitlinear import quantize_activations_int8, ternary_linear_reference
from st_bitnet.ops.layouts import to_layout
try:
    from st_bitnet.ops import triton_kernels as tk
    assert tk.INTERPRET
    tk.quantize_rows(torch.randn(2, 20))
except Exception as e:
    print("SKIP", type(e).__name__, str(e)[:300])
    sys.exit(0)


def problem(g, m, k, n, dtype=torch.float32, bias=True):
    x = (torch.randn(m, k, generator=g) * float(10 ** torch.empty(1).uniform_(-2, 2, generator=g))).to(dtype)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(1, generator=g) * 3 + 0.05
    return x, w, ws, (torch.randn(n, generator=g) if bias else None)


# 1. activation quantization equals torch's, including the 1e-5 clamp, zero rows and .5 ties
g = torch.Generator().manual_seed(0)
x = torch.randn(9, 300, generator=g) * 3
x[1] *= 1e-8
x[2] = 0.0
x[3, :50] = 0.5 / (127.0 / x[3].abs().max())
xq, xs = tk.quantize_rows(x)
want_q, want_s = quantize_activations_int8(x)
assert torch.equal(xq, want_q) and torch.equal(xs, want_s.squeeze(-1)), "quantize_rows differs from torch"

# 2. both GEMMs, random small shapes (K, N not multiples of the blocks), three dtypes, bias or not
tk.self_test(torch.device("cpu"))
for layout, seed in (("int8", 1), ("packed2", 2)):
    g = torch.Generator().manual_seed(seed)
    for i in range(int(sys.argv[1])):
        m, k, n = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (40, 100, 50))
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        x, w, ws, b = problem(g, m, k, n, dtype, bias=bool(i % 2))
        got = tk.ternary_linear_triton(x, to_layout(w, layout), ws, b, n, layout)
        want = ternary_linear_reference(x, w, ws, b)
        assert got.dtype == want.dtype and torch.equal(got, want), f"{layout} M={m} K={k} N={n} {dtype}"

# 3. leading dims, empty batch, corrupt codes
g = torch.Generator().manual_seed(3)
x, w, ws, b = problem(g, 6, 40, 10)
for layout in ("int8", "packed2"):
    y = tk.ternary_linear_triton(x.reshape(2, 3, 40), to_layout(w, layout), ws, b, 10, layout)
    assert torch.equal(y, ternary_linear_reference(x, w, ws, b).reshape(2, 3, 10)), layout
    assert tk.ternary_linear_triton(x[:0], to_layout(w, layout), ws, b, 10, layout).shape == (0, 10)
bad = to_layout(torch.zeros(8, 32, dtype=torch.int8), "packed2")
bad[0, 0] = 0xFF
try:
    tk.ternary_linear_triton(torch.randn(2, 32), bad, torch.ones(1), None, 8, "packed2")
    raise AssertionError("corrupt 2-bit codes were accepted")
except ValueError as e:
    assert "code 3" in str(e)

# 4. rows holding NaN / +inf / -inf / a mix: identical to the reference, NaN positions included
g = torch.Generator().manual_seed(4)
for layout in ("int8", "packed2"):
    for dtype in (torch.float32, torch.bfloat16):
        x, w, ws, b = problem(g, 9, 70, 21, dtype)
        for row, values in enumerate(([float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")],
                                      [float("nan"), float("inf")])):
            x[2 * row % 9, torch.randperm(70, generator=g)[: len(values)]] = torch.tensor(values, dtype=dtype)
        got = tk.ternary_linear_triton(x, to_layout(w, layout), ws, b, 21, layout)
        want = ternary_linear_reference(x, w, ws, b)
        assert want.isnan().any(dim=-1).sum() == 5
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=f"non-finite rows {layout} {dtype}")
print("ok")
"""


def test_triton_kernels_under_interpreter():
    """Triton's CPU interpreter runs the real kernels (small shapes): bit-exact vs the reference."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_CHECKS, "12"], capture_output=True, text=True, env=env, timeout=600
    )
    if out.stdout.startswith("SKIP"):
        pytest.skip(f"the Triton interpreter cannot run these kernels here: {out.stdout[5:].strip()}")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.stdout + out.stderr)[-3000:]


# --------------------------------------------------------------------------------------------------
# real GPU
# --------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("layout", ["int8", "packed2"])
def test_cuda_op_fuzz(layout):
    register_kernels()
    op = torch.ops.st_bitnet.ternary_linear
    g = torch.Generator().manual_seed(4)
    shapes = [(1, 640, 256), (7, 1024, 3072), (128, 640, 2048), (300, 2048, 640), (2048, 1024, 1024), (33, 70, 37)]
    for i, (m, k, n) in enumerate(shapes * 2):
        dtype = (torch.bfloat16, torch.float32, torch.float16)[i % 3]
        x, w, ws, b = _problem(g, m, k, n, dtype, bias=bool(i % 2))
        got = op(x.cuda(), to_layout(w, layout).cuda(), ws.cuda(), None if b is None else b.cuda(), n, layout)
        assert torch.equal(got.cpu(), ternary_linear_reference(x, w, ws, b)), f"{layout} M={m} K={k} N={n}"


@pytest.mark.gpu
@cuda
def test_cuda_packed_bitlinear_dispatch_and_opcheck():
    register_kernels()
    torch.manual_seed(0)
    layer = BitLinear(640, 1024, bias=True).eval().pack_().cuda()
    for m in (1, 16, 64, 512):
        x = torch.randn(m, 640, device="cuda", dtype=torch.bfloat16)
        set_kernel_mode("reference")
        want = layer(x)
        set_kernel_mode(None)
        assert torch.equal(layer(x), want)
    state = layer._kernel_state
    assert state is not None and "int8" in state and "packed2" in state
    x = torch.randn(5, 640, device="cuda")
    for layout, w in (("int8", state["int8"]), ("packed2", state["packed2"])):
        torch.library.opcheck(torch.ops.st_bitnet.ternary_linear, (x, w, layer.weight_scale, layer.bias, 1024, layout))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("layout", ["int8", "packed2"])
def test_cuda_op_nonfinite_rows(layout):
    # rows holding NaN / +-inf: all-NaN outputs exactly where the reference has them, other rows bit-exact
    register_kernels()
    op = torch.ops.st_bitnet.ternary_linear
    g = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.bfloat16):
        x, w, ws, b = _problem(g, 40, 640, 96, dtype, bias=True)
        for row, value in enumerate((float("nan"), float("inf"), -float("inf"))):
            x[3 * row, 7 * row + 1] = value
        x[20, 5], x[20, 9] = float("inf"), -float("inf")
        got = op(x.cuda(), to_layout(w, layout).cuda(), ws.cuda(), b.cuda(), 96, layout).cpu()
        want = ternary_linear_reference(x, w, ws, b)
        assert want.isnan().any(dim=-1).sum() == 4
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
