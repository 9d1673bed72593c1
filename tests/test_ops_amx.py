"""The CPU kernel's AMX path: its layout, that it compiles, that it is never picked where it cannot run, and (on an
AMX CPU) that it is bit-identical to the reference on fuzzed shapes, non-finite rows and the fused norm."""

from __future__ import annotations

import platform
import shutil
import subprocess
import warnings

import pytest
import torch
from conftest import reference_forward

from st_bitnet.bitlinear import BitLinear, BitRMSNorm, ternary_linear_reference
from st_bitnet.ops import cpu_kernel, register_kernels
from st_bitnet.ops.layouts import pack_amx64, unpack_amx64


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ST_BITNET_CACHE", str(tmp_path_factory.getbasetemp() / "kernel_cache"))


def _amx_or_skip():
    lib = cpu_kernel.amx_library()
    if lib is None:
        pytest.skip("this CPU has no usable AMX-INT8 (CPU flags, CPUID, OS tile permission or compiler)")
    return lib


def _normed_reference(x, norm_w, eps, w, ws, b):
    norm = BitRMSNorm(x.shape[-1], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(norm_w)
    return ternary_linear_reference(norm(x), w, ws, b)


@pytest.mark.parametrize("n,k", [(1, 1), (16, 64), (37, 70), (50, 129), (5, 1000)])
def test_amx64_roundtrip(n, k):
    w = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    blob = pack_amx64(w)
    assert blob.dtype == torch.int8 and blob.shape == (-(-n // 16), -(-k // 64), 16, 64)
    assert torch.equal(unpack_amx64(blob, n, k), w)


def test_amx64_bit_positions_and_zero_padding():
    # block [b, g], row r, byte 4*o + i  <->  output 16b + o, input 64g + 4r + i
    w = torch.zeros(40, 150, dtype=torch.int8)
    w[16 + 3, 64 + 4 * 2 + 1] = 1
    w[39, 149] = -1
    blob = pack_amx64(w)
    assert blob[1, 1, 2, 4 * 3 + 1] == 1 and blob[2, 2, (149 - 128) // 4, 4 * 7 + 149 % 4] == -1
    assert int(blob.abs().sum()) == 2  # padding is 0: it adds nothing to TDPBSSD's sums


def test_amx_source_compiles():
    # The AMX path runs only on AMX CPUs, but its code must build wherever a compiler knows the instructions.
    cc = cpu_kernel._find_compiler()
    if cc is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("needs an x86-64 C compiler")
    probe = subprocess.run([cc, "-mamx-int8", "-mamx-tile", "-x", "c", "-c", "-o", "/dev/null", "-"], input="",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{cc} does not know -mamx-int8")
    flags = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", *cpu_kernel.AMX_FLAGS, "-Wall", "-Werror"]
    out = cpu_kernel.cache_dir().parent / "amx_compile_check.so"
    out.parent.mkdir(parents=True, exist_ok=True)
    assert cpu_kernel._compile(cc, flags, out) is None
    nm = shutil.which("nm")
    if nm:
        symbols = subprocess.run([nm, "-D", str(out)], capture_output=True, text=True).stdout
        assert "st_amx_init" in symbols and "st_ternary_linear_amx_f32" in symbols


def test_amx_is_off_when_switched_off(monkeypatch):
    monkeypatch.setenv("ST_BITNET_CPU_AMX", "off")
    assert cpu_kernel.amx_library() is None
    monkeypatch.setenv("ST_BITNET_CPU_AMX", "sometimes")
    with pytest.raises(ValueError, match="ST_BITNET_CPU_AMX"):
        cpu_kernel.amx_library()


def test_amx_never_picked_where_the_cpu_cannot_run_it(monkeypatch):
    # A CPU whose flags claim AMX but whose CPUID denies it (or an OS that refuses the tile data) must end on
    # the VNNI path with one warning, without executing a tile instruction (st_amx_init only runs CPUID).
    if cpu_kernel.amx_library() is not None:
        pytest.skip("this CPU runs AMX: the refusal path cannot be shown here")
    if platform.machine().lower() not in ("x86_64", "amd64") or cpu_kernel._find_compiler() is None:
        pytest.skip("needs x86-64 and a C compiler")
    monkeypatch.setattr(cpu_kernel, "cpu_reports_amx", lambda: True)
    monkeypatch.delitem(cpu_kernel._libs, "amx", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu_kernel.amx_library() is None
    if "amx" in cpu_kernel._libs and "-mamx" in str(cpu_kernel._libs["amx"]):
        pytest.skip("the compiler cannot build the AMX variant")
    assert any("AMX" in str(w.message) for w in caught)
    assert "st_amx_init returned" in cpu_kernel._libs["amx"]
    # and the module path keeps working (VNNI), with no amx64 weights built
    layer = BitLinear(64, 24, bias=True).eval().pack_()
    x = torch.randn(40, 64)
    with torch.inference_mode():
        got = layer(x)
    assert torch.equal(got, reference_forward(layer, x)) and "amx" not in (layer._kernel_state or {})
    monkeypatch.delitem(cpu_kernel._libs, "amx", raising=False)


def test_amx_fuzz_bit_exact():
    lib = _amx_or_skip()
    g = torch.Generator().manual_seed(64)
    for i in range(1200):
        m = int(torch.randint(1, 301, (1,), generator=g))
        k = int(torch.randint(1, 300, (1,), generator=g)) | 1 if i % 2 else int(torch.randint(1, 300, (1,), generator=g))
        n = int(torch.randint(1, 90, (1,), generator=g)) | 1 if i % 3 else int(torch.randint(1, 90, (1,), generator=g))
        scale = float(10 ** torch.empty(1).uniform_(-3, 3, generator=g))
        x = torch.randn(m, k, generator=g) * scale
        w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
        ws = torch.rand(1, generator=g) * 3 + 0.05
        b = torch.randn(n, generator=g) if i % 2 else None
        if i % 5 == 0:
            x[0] *= 1e-8  # absmax below the 1e-5 clamp
        if i % 11 == 0:
            rows = torch.randperm(m, generator=g)[: max(1, m // 4)]
            x[rows, int(torch.randint(k, (1,), generator=g))] = float(("nan", "inf", "-inf")[i % 3])
        if i % 4 == 0:
            norm_w = torch.rand(k, generator=g) + 0.5
            got = cpu_kernel.run_amx64(lib, x, pack_amx64(w), ws, b, n, norm_w, 1e-6)
            want = _normed_reference(x, norm_w, 1e-6, w, ws, b)
        else:
            got = cpu_kernel.run_amx64(lib, x, pack_amx64(w), ws, b, n)
            want = ternary_linear_reference(x, w, ws, b)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                                   msg=f"AMX mismatch at M={m} K={k} N={n} (case {i})")


def test_amx_module_and_op_paths_match_reference():
    _amx_or_skip()
    layer = BitLinear(256, 96, bias=True)
    with torch.no_grad():
        layer.rms_norm.weight.uniform_(0.5, 1.5)
    layer = layer.eval().pack_()
    for tokens in (1, cpu_kernel.AMX_MIN_TOKENS - 1, cpu_kernel.AMX_MIN_TOKENS, 300):
        x = torch.randn(tokens, 256)
        with torch.inference_mode():
            got = layer(x)
        assert torch.equal(got, reference_forward(layer, x)), tokens
    assert "amx" in layer._kernel_state
    register_kernels()
    w = torch.randint(-1, 2, (70, 130), dtype=torch.int8)
    x = torch.randn(3, 20, 130)
    got = torch.ops.st_bitnet.ternary_linear(x, w, torch.tensor([0.7]), None, 70, "int8")
    assert torch.equal(got, ternary_linear_reference(x, w, torch.tensor([0.7]), None))
