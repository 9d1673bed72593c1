"""st_bitnet.ops: the ternary_linear op, its CPU kernel and the packed-BitLinear dispatch.

Every kernel result is compared bit for bit (torch.equal) with st_bitnet.bitlinear.ternary_linear_reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import reference_forward

from st_bitnet.bitlinear import BitLinear, BitRMSNorm, pack_ternary, ternary_linear_reference
from st_bitnet.ops import cpu_kernel, dispatch, register_kernels, set_kernel_mode
from st_bitnet.ops.layouts import LAYOUTS, pack_tile16, to_layout, unpack_tile16

register_kernels()
op = torch.ops.st_bitnet.ternary_linear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    # one build per test session, outside the user's cache
    monkeypatch.setenv("ST_BITNET_CACHE", str(tmp_path_factory.getbasetemp() / "st_bitnet_cache"))
    set_kernel_mode(None)
    yield
    set_kernel_mode(None)


def _random_problem(g, m, k, n, bias=True, scale=1.0):
    x = torch.randn(m, k, generator=g) * scale
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    ws = torch.rand(1, generator=g) * 3 + 0.05
    b = torch.randn(n, generator=g) if bias else None
    return x, w, ws, b


# --------------------------------------------------------------------------------------------------
# import hygiene
# --------------------------------------------------------------------------------------------------
_HYGIENE_SCRIPT = """
import os, sys, importlib.abc
st_root = os.path.dirname(os.path.abspath(sys.argv[1]))
importers = []

class Spy(importlib.abc.MetaPathFinder):
    # records which source file executes an 'import triton...' (first frame outside importlib)
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            f = sys._getframe(1)
            while f and ("importlib" in f.f_code.co_filename or f.f_code.co_filename.startswith("<frozen")):
                f = f.f_back
            importers.append(f.f_code.co_filename if f else "?")
        return None

sys.meta_path.insert(0, Spy())
import torch
import st_bitnet, st_bitnet.ops
st_bitnet.ops.register_kernels()
layer = st_bitnet.BitLinear(32, 8).eval().pack_()
layer(torch.randn(2, 32))  # a CPU forward (C kernel or reference) must not pull Triton either
ours = [f for f in importers if os.path.abspath(f).startswith(st_root)]
assert not ours, f"st_bitnet imports triton from {ours}"
assert not torch.cuda.is_initialized(), "CUDA initialised"
print("ok", "triton loaded by third-party imports:" , "triton" in sys.modules)
"""


def test_import_touches_neither_cuda_nor_triton():
    # transformers (PreTrainedModel -> flash_attention -> torch._dynamo) may import Triton itself when it
    # is installed; what st_bitnet guarantees is that none of *its* code imports it or initialises CUDA.
    import st_bitnet

    env = {**os.environ, "ST_BITNET_KERNEL": "reference"}  # no compiler run needed for this check
    out = subprocess.run(
        [sys.executable, "-c", _HYGIENE_SCRIPT, st_bitnet.__file__], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_ops_modules_never_import_triton_at_top_level():
    # the only module allowed to import triton is triton_kernels, and only cuda_kernel imports it (lazily)
    import pathlib

    import st_bitnet.ops as ops

    for path in pathlib.Path(ops.__file__).parent.glob("*.py"):
        if path.name == "triton_kernels.py":
            continue
        top_level = [ln for ln in path.read_text().splitlines() if ln.startswith(("import ", "from "))]
        assert not any("triton" in ln for ln in top_level), f"{path.name} imports triton at import time"


# --------------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(1, 1), (16, 16), (37, 70), (640, 33), (5, 1000)])
def test_tile16_roundtrip(n, k):
    w = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    blob = pack_tile16(w)
    assert blob.shape == (-(-n // 16), -(-k // 16), 64) and blob.dtype == torch.uint8
    assert torch.equal(unpack_tile16(blob, n, k), w)


def test_tile16_bit_positions():
    # output 17 (block 1, o = 1), input 16*2 + 4*3 + 2 (group 2, step s = 3, kk = 2) -> bits 6-7 of byte 1*4 + 2
    w = torch.zeros(20, 50, dtype=torch.int8)
    w[17, 2 * 16 + 4 * 3 + 2] = 1  # code 2
    blob = pack_tile16(w)
    assert int(blob[1, 2, 6]) == (2 << 6) | 0b010101
    assert int(blob[1, 2, 5]) == 0b01010101


# --------------------------------------------------------------------------------------------------
# the op: reference semantics, opcheck, errors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(device, layout):
    g = torch.Generator().manual_seed(0)
    for m, k, n, bias in [(3, 40, 24, True), (1, 17, 5, False)]:
        x, w, ws, b = _random_problem(g, m, k, n, bias)
        args = (x.to(device), to_layout(w, layout).to(device), ws.to(device), None if b is None else b.to(device), n, layout)
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_op_matches_reference(device, layout, dtype):
    g = torch.Generator().manual_seed(1)
    x, w, ws, b = _random_problem(g, 2 * 3, 90, 33)
    x = x.reshape(2, 3, 90).to(dtype)
    want = ternary_linear_reference(x, w, ws, b)
    got = op(x.to(device), to_layout(w, layout).to(device), ws.to(device), b.to(device), 33, layout)
    assert got.dtype == dtype and got.shape == (2, 3, 33)
    assert torch.equal(got.cpu(), want)


def test_op_bf16_weight_scale_and_bias():
    g = torch.Generator().manual_seed(2)
    x, w, ws, b = _random_problem(g, 4, 48, 20)
    ws, b = ws.bfloat16(), b.bfloat16()
    assert torch.equal(op(x, pack_tile16(w), ws, b, 20, "tile16"), ternary_linear_reference(x, w, ws, b))


def test_op_errors():
    x = torch.randn(3, 32)
    w = torch.randint(-1, 2, (8, 32), dtype=torch.int8)
    ws = torch.ones(1)
    blob = pack_tile16(w)
    with pytest.raises(TypeError, match="x must be a float"):
        op(x.to(torch.int32), blob, ws, None, 8, "tile16")
    with pytest.raises(TypeError, match="must be torch.uint8"):
        op(x, blob.to(torch.int8), ws, None, 8, "tile16")
    with pytest.raises(ValueError, match="must have shape"):
        op(x[:, :15], blob, ws, None, 8, "tile16")
    with pytest.raises(ValueError, match="must have shape"):
        op(x, pack_ternary(w), ws, None, 9 + 8, "packed2")
    with pytest.raises(ValueError, match="unknown layout"):
        op(x, blob, ws, None, 8, "int4")
    with pytest.raises(ValueError, match="weight_scale"):
        op(x, blob, torch.ones(2), None, 8, "tile16")
    with pytest.raises(ValueError, match="bias"):
        op(x, blob, ws, torch.ones(7), 8, "tile16")
    corrupt = blob.clone()
    corrupt[0, 0, 0] = 0xFF  # code 3
    with pytest.raises(ValueError, match="code 3"):
        op(x, corrupt, ws, None, 8, "tile16")
    corrupt2 = pack_ternary(w)
    corrupt2[1, 3] |= 0b11000000
    with pytest.raises(ValueError, match="code 3"):
        op(x, corrupt2, ws, None, 8, "packed2")


def test_op_empty_batch_and_single_token():
    g = torch.Generator().manual_seed(3)
    x, w, ws, b = _random_problem(g, 1, 640, 256)
    blob = pack_tile16(w)
    assert torch.equal(op(x, blob, ws, b, 256, "tile16"), ternary_linear_reference(x, w, ws, b))
    empty = torch.randn(0, 7, 640)
    assert op(empty, blob, ws, b, 256, "tile16").shape == (0, 7, 256)


def test_op_under_torch_compile():
    g = torch.Generator().manual_seed(4)
    x, w, ws, b = _random_problem(g, 5, 40, 24)
    blob = pack_tile16(w)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return op(x * 2.0, blob, ws, b, 24, "tile16") + 1.0

    want = ternary_linear_reference(x * 2.0, w, ws, b) + 1.0
    assert torch.equal(f(x), want)


# --------------------------------------------------------------------------------------------------
# CPU kernel: bit-exact fuzz over every build variant this machine runs
# --------------------------------------------------------------------------------------------------
def _variants():
    out = ["native", "scalar"]
    if cpu_kernel._cpu_signature().find("avx2") >= 0:
        out.insert(1, "avx2")
    return out


@pytest.mark.parametrize("variant", _variants())
def test_cpu_kernel_fuzz_bit_exact(variant):
    lib = cpu_kernel.load_library(variant)
    if lib is None:
        pytest.skip(f"no C compiler for the {variant} CPU kernel")
    g = torch.Generator().manual_seed(hash(variant) % 1000)
    cases = 1000 if variant == "native" else 400
    for i in range(cases):
        m = int(torch.randint(0, 21, (1,), generator=g))
        k = int(torch.randint(1, 200, (1,), generator=g))
        n = int(torch.randint(1, 70, (1,), generator=g))
        scale = float(10 ** torch.empty(1).uniform_(-3, 3, generator=g))
        x, w, ws, b = _random_problem(g, m, k, n, bias=bool(i % 2), scale=scale)
        if m and i % 5 == 0:
            x[0] *= 1e-8  # absmax below the 1e-5 clamp
        if m and i % 7 == 0:
            x[-1] = 0.0
        if m and i % 9 == 0:
            x[m // 2, : k // 2] = 0.5 / ((127.0 / x[m // 2].abs().max()))  # exact .5 ties after scaling
        got = cpu_kernel.run_tile16(lib, x, pack_tile16(w), ws, b, n)
        want = ternary_linear_reference(x, w, ws, b)
        assert torch.equal(got, want), f"{variant}: mismatch at M={m} K={k} N={n} (case {i})"


_NONFINITE_PATTERNS = (
    [float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")], [float("nan"), float("inf")],
    [float("nan"), -float("inf"), float("inf")],
)


def _poison_rows(g, x):
    """Put NaN / +inf / -inf / mixes at random positions of random rows of ``x`` (in place); returns the rows."""
    m, k = x.shape
    rows = torch.randperm(m, generator=g)[: max(1, m // 3)].tolist() if m else []
    for row in rows:
        values = _NONFINITE_PATTERNS[int(torch.randint(len(_NONFINITE_PATTERNS), (1,), generator=g))][:k]
        x[row, torch.randperm(k, generator=g)[: len(values)]] = torch.tensor(values)
    return rows


def _assert_identical(got, want, msg):
    """Same values bit for bit, NaN at the same positions."""
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=msg)


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("fused_norm", [False, True])
def test_cpu_kernel_nonfinite_rows_match_reference(variant, fused_norm):
    # A token holding NaN or +-inf gives an all-NaN output row in the reference (and in QAT); every build
    # variant, with and without the fused norm, must give the same, and leave the other rows untouched.
    lib = cpu_kernel.load_library(variant)
    if lib is None:
        pytest.skip(f"no C compiler for the {variant} CPU kernel")
    g = torch.Generator().manual_seed(33)
    for i in range(150):
        m = int(torch.randint(1, 13, (1,), generator=g))
        k = int(torch.randint(1, 150, (1,), generator=g))
        n = int(torch.randint(1, 40, (1,), generator=g))
        x, w, ws, b = _random_problem(g, m, k, n, bias=bool(i % 2))
        rows = _poison_rows(g, x)
        if fused_norm:
            norm_w = torch.rand(k, generator=g) + 0.5
            got = cpu_kernel.run_tile16(lib, x, pack_tile16(w), ws, b, n, norm_w, 1e-6)
            want = _normed_reference(x, norm_w, 1e-6, w, ws, b)
        else:
            got = cpu_kernel.run_tile16(lib, x, pack_tile16(w), ws, b, n)
            want = ternary_linear_reference(x, w, ws, b)
        assert want[rows].isnan().all()
        _assert_identical(got, want, f"{variant} fused={fused_norm}: M={m} K={k} N={n} rows {rows} (case {i})")


def test_packed_bitlinear_nonfinite_inputs_every_path():
    # the module paths (fused C call, unfused op, bf16, the reference switch) and the latent QAT layer agree
    g = torch.Generator().manual_seed(8)
    latent = BitLinear(64, 24, bias=True)
    with torch.no_grad():
        latent.rms_norm.weight.uniform_(0.5, 1.5, generator=g)
    x = torch.randn(10, 64, generator=g)
    rows = _poison_rows(g, x)
    with torch.no_grad():
        want_qat = latent(x)
    layer = latent.eval().pack_()
    want = reference_forward(layer, x)
    assert want[rows].isnan().all() and not want[[r for r in range(10) if r not in rows]].isnan().any()
    _assert_identical(want_qat, want, "QAT vs packed reference")
    with torch.inference_mode():
        _assert_identical(layer(x), want, "fused C path")
    _assert_identical(layer(x.clone().requires_grad_(True)).detach(), want, "unfused op path")
    set_kernel_mode("reference")
    _assert_identical(layer(x), want, "reference switch")
    set_kernel_mode(None)
    half = layer.to(torch.bfloat16)
    _assert_identical(half(x.bfloat16()), reference_forward(half, x.bfloat16()), "bf16")
    plain = BitLinear(64, 24, use_rms_norm=False).eval().pack_()  # no norm: the raw NaN/inf reach the kernel
    with torch.inference_mode():
        got = plain(x)
    assert got[rows].isnan().all()
    _assert_identical(got, reference_forward(plain, x), "no norm")


def test_cpu_kernel_large_k_bounds():
    # K large enough to need several int16 -> int32 widenings (AVX2) with |x_q| = 127 everywhere and all
    # weights +1 (largest sums): checks the overflow argument at its worst case.
    for variant in _variants():
        lib = cpu_kernel.load_library(variant)
        if lib is None:
            continue
        k, n = 4100, 33
        x = torch.ones(3, k)
        x[1] = -1.0
        w = torch.ones(n, k, dtype=torch.int8)
        w[::2] = -1
        ws = torch.tensor([0.37])
        assert torch.equal(cpu_kernel.run_tile16(lib, x, pack_tile16(w), ws, None, n), ternary_linear_reference(x, w, ws))


def test_cpu_kernel_threads_agree():
    lib = cpu_kernel.load_library()
    if lib is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(5)
    x, w, ws, b = _random_problem(g, 200, 640, 300)
    blob = pack_tile16(w)
    want = ternary_linear_reference(x, w, ws, b)
    old = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert torch.equal(cpu_kernel.run_tile16(lib, x, blob, ws, b, 300), want)
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------------
# CPU kernel with BitLinear's RMSNorm fused into its quantization pass
# --------------------------------------------------------------------------------------------------
def test_torch_sum_order_replay_matches_torch():
    # The fused norm recomputes mean(x**2) in C in torch's own summation order; it must equal torch's value
    # bit for bit for every length (tails, cascade levels, one vs many threads), or the probe must refuse.
    lib = cpu_kernel.load_library()
    if lib is None:
        pytest.skip("no C compiler")
    vw = cpu_kernel._probe_vec_width(lib)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert vw == 8  # ATen dispatches sum to its AVX2 kernel on AVX-512 machines too
    if vw is None:
        pytest.skip("torch's summation order is not replayed on this platform (torch computes the variance)")
    g = torch.Generator().manual_seed(11)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for k in [*range(1, 140), 511, 640, 1024, 1536, 2048, 3072, 4097, 5120, 30000]:
                x = torch.randn(4, k, generator=g) * 10 ** float(torch.empty(()).uniform_(-3, 3, generator=g))
                got = torch.empty(4)
                assert lib.st_mean_sq_f32(x.data_ptr(), 4, k, k, vw, got.data_ptr()) == 0
                assert torch.equal(got, x.pow(2).mean(-1)), f"K={k}, {threads} threads"
    finally:
        torch.set_num_threads(old)


def _normed_reference(x, norm_w, eps, w, ws, b):
    norm = BitRMSNorm(x.shape[-1], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(norm_w)
    return ternary_linear_reference(norm(x), w, ws, b)


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("torch_variance", [False, True])
def test_cpu_kernel_fused_norm_fuzz_bit_exact(variant, torch_variance, monkeypatch):
    # RMSNorm + quantization + GEMM in one C pass == BitRMSNorm then the reference, bit for bit. Both ways of
    # getting the variance: replayed in C (default) and handed over by torch (platforms without a replay).
    lib = cpu_kernel.load_library(variant)
    if lib is None:
        pytest.skip(f"no C compiler for the {variant} CPU kernel")
    if torch_variance:
        monkeypatch.setitem(cpu_kernel._vec_widths, id(lib), None)
    g = torch.Generator().manual_seed(21 + hash(variant) % 1000)
    cases = 600 if variant == "native" and not torch_variance else 200
    for i in range(cases):
        m = int(torch.randint(0, 21, (1,), generator=g))
        k = int(torch.randint(1, 200, (1,), generator=g))
        n = int(torch.randint(1, 70, (1,), generator=g))
        scale = float(10 ** torch.empty(1).uniform_(-3, 3, generator=g))
        x, w, ws, b = _random_problem(g, m, k, n, bias=bool(i % 2), scale=scale)
        norm_w = torch.randn(k, generator=g) * float(10 ** torch.empty(1).uniform_(-1, 1, generator=g))
        if i % 4 == 0:
            norm_w[: k // 3] = 0.0
        eps = (1e-6, 1e-5, 0.3)[i % 3]
        if m and i % 5 == 0:
            x[0] *= 1e-8  # rms far below eps
        if m and i % 7 == 0:
            x[-1] = 0.0
        got = cpu_kernel.run_tile16(lib, x, pack_tile16(w), ws, b, n, norm_w, eps)
        want = _normed_reference(x, norm_w, eps, w, ws, b)
        assert torch.equal(got, want), f"{variant}: mismatch at M={m} K={k} N={n} eps={eps} (case {i})"


def test_cpu_kernel_fused_norm_real_shapes_and_long_rows():
    # model-sized rows (several cascade levels of torch's sum) and K >= 32768, where torch's variance is used
    lib = cpu_kernel.load_library()
    if lib is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(12)
    for m, k, n in ((70, 640, 40), (9, 3072, 33), (2, 2**15 + 3, 17)):
        x, w, ws, b = _random_problem(g, m, k, n)
        norm_w = torch.rand(k, generator=g) + 0.5
        got = cpu_kernel.run_tile16(lib, x, pack_tile16(w), ws, b, n, norm_w, 1e-6)
        assert torch.equal(got, _normed_reference(x, norm_w, 1e-6, w, ws, b)), (m, k, n)


def test_cpu_kernel_fused_norm_rejects_other_dtypes():
    lib = cpu_kernel.load_library()
    if lib is None:
        pytest.skip("no C compiler")
    w = pack_tile16(torch.ones(4, 32, dtype=torch.int8))
    with pytest.raises(ValueError, match="fused norm"):
        cpu_kernel.run_tile16(lib, torch.randn(2, 32).bfloat16(), w, torch.ones(1), None, 4, torch.ones(32))
    with pytest.raises(ValueError, match="fused norm"):
        cpu_kernel.run_tile16(lib, torch.randn(2, 32), w, torch.ones(1), None, 4, torch.ones(31))


def test_interrupted_or_fallback_build_never_cached_as_native(tmp_path, monkeypatch):
    # A compile killed midway must not leave (or cache) a library; a build without -march=native (a compiler
    # that rejects it) is cached under its own flags, so the native key still gets a real native build later.
    cc = cpu_kernel._find_compiler()
    if cc is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("ST_BITNET_CACHE", str(tmp_path))
    real_run = subprocess.run

    def run_with(returncode):
        def fake(cmd, *args, **kwargs):
            if "-march=native" in cmd and "-o" in cmd:
                return subprocess.CompletedProcess(cmd, returncode, "", "killed" if returncode < 0 else "unknown flag")
            return real_run(cmd, *args, **kwargs)
        return fake

    native_key = cpu_kernel.library_path("native", cc, ["-march=native", "-fopenmp"])
    monkeypatch.setattr(cpu_kernel.subprocess, "run", run_with(-2))  # SIGINT during the native compile
    with pytest.raises(cpu_kernel.CompileInterrupted):
        cpu_kernel.build_library("native")
    assert not list(native_key.parent.glob("*"))
    monkeypatch.setattr(cpu_kernel.subprocess, "run", run_with(1))  # the compiler rejects -march=native
    fallback = cpu_kernel.build_library("native")
    assert fallback.exists() and fallback != native_key and not native_key.exists()
    monkeypatch.setattr(cpu_kernel.subprocess, "run", real_run)
    assert cpu_kernel.build_library("native") == native_key and native_key.exists()


def test_no_compiler_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_find_compiler", lambda: None)
    monkeypatch.setattr(cpu_kernel, "_libs", {})
    monkeypatch.setattr(cpu_kernel, "_warned", False)
    g = torch.Generator().manual_seed(6)
    x, w, ws, b = _random_problem(g, 3, 20, 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1 = op(x, pack_tile16(w), ws, b, 10, "tile16")
        y2 = op(x, pack_tile16(w), ws, b, 10, "tile16")
    msgs = [str(c.message) for c in caught if "CPU ternary kernel is unavailable" in str(c.message)]
    assert len(msgs) == 1 and "no C compiler" in msgs[0]
    assert torch.equal(y1, ternary_linear_reference(x, w, ws, b)) and torch.equal(y1, y2)


# --------------------------------------------------------------------------------------------------
# packed BitLinear through the dispatch
# --------------------------------------------------------------------------------------------------
def _packed_layer(k=70, n=37, bias=True, seed=7):
    torch.manual_seed(seed)
    layer = BitLinear(k, n, bias=bias).eval()
    with torch.no_grad():
        layer.rms_norm.weight.uniform_(0.5, 1.5)
        if bias:
            layer.bias.normal_()
    return layer.pack_()


def test_packed_bitlinear_uses_kernel_and_caches_layout(monkeypatch):
    layer = _packed_layer()
    x = torch.randn(4, 9, 70)
    set_kernel_mode("reference")
    want = layer(x)
    assert layer._kernel_state is None
    set_kernel_mode("auto")
    got = layer(x)
    assert torch.equal(got, want)
    state = layer._kernel_state
    assert state is not None and state["cpu"].shape == (3, 5, 64)
    calls = []
    monkeypatch.setattr(dispatch, "_build_state", lambda *a: calls.append(a) or state)
    layer(x)
    assert calls == []  # cached: no repack on the second call
    monkeypatch.undo()
    layer.to(torch.float32)  # .to() drops the cache
    assert layer._kernel_state is None
    layer(x)
    stale = layer._kernel_state["cpu"].clone()
    with torch.no_grad():  # in-place weight change (e.g. load_state_dict) invalidates it too
        layer.weight.copy_(_packed_layer(seed=8).weight)
    assert torch.equal(layer(x), reference_forward(layer, x))
    assert not torch.equal(layer._kernel_state["cpu"], stale)


def test_env_switch_forces_reference(monkeypatch):
    monkeypatch.setenv("ST_BITNET_KERNEL", "reference")
    layer = _packed_layer()
    layer(torch.randn(2, 70))
    assert layer._kernel_state is None
    monkeypatch.setenv("ST_BITNET_KERNEL", "bogus")
    with pytest.raises(ValueError, match="ST_BITNET_KERNEL"):
        layer(torch.randn(2, 70))


def test_packed_bitlinear_bf16_and_compile():
    layer = _packed_layer(k=64, n=48).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    want = reference_forward(layer, x)
    assert torch.equal(layer(x), want)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), want)
    fresh = _packed_layer(k=64, n=48).to(torch.bfloat16)  # traced before any eager call: no state yet
    assert torch.equal(torch.compile(fresh, fullgraph=True, backend="aot_eager")(x), want)


def test_packed_bitlinear_fused_norm_paths_match_reference(monkeypatch):
    # The module path fuses the norm for float32 CPU inference and falls back to norm-then-op otherwise
    # (bf16, inputs that need gradients, no norm); every path gives the reference's numbers.
    layer = _packed_layer(k=96, n=40)
    x = torch.randn(3, 7, 96)
    want = reference_forward(layer, x)
    calls = []
    real = cpu_kernel.run_tile16
    def spy(*a, **kw):  # records the norm weight handed to the C call (None: unfused call through the op)
        calls.append(a[6] if len(a) > 6 else None)
        return real(*a, **kw)

    monkeypatch.setattr(cpu_kernel, "run_tile16", spy)
    with torch.inference_mode():
        assert torch.equal(layer(x), want)
    assert calls and calls[-1] is layer.rms_norm.weight  # fused: the norm weight went to the C call
    strided = torch.randn(96, 21).t().reshape(3, 7, 96)  # non-contiguous view of the same shape
    assert torch.equal(layer(strided), reference_forward(layer, strided))
    xg = x.clone().requires_grad_(True)
    n_fused = sum(c is not None for c in calls)
    assert torch.equal(layer(xg), want)  # needs autograd: unfused path (norm in torch, then the op)
    assert sum(c is not None for c in calls) == n_fused and calls[-1] is None
    # torch.compile traces the unfused path (norm in torch + the op) with the same numbers
    assert torch.equal(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), want)
    plain = BitLinear(96, 40, use_rms_norm=False).eval().pack_()
    assert torch.equal(plain(x), reference_forward(plain, x))
    half = _packed_layer(k=96, n=40).to(torch.bfloat16)
    xb = x.bfloat16()
    assert torch.equal(half(xb), reference_forward(half, xb))


def test_register_kernels_is_idempotent_and_installs_hook(monkeypatch):
    register_kernels()
    register_kernels()
    assert BitLinear.packed_kernel is dispatch.packed_forward
    layer = _packed_layer(k=64, n=8)
    x = torch.randn(3, 64)
    calls = []

    def spy(module, inputs):
        calls.append(module)
        return dispatch.packed_forward(module, inputs)

    spy.applies_rms_norm = True
    monkeypatch.setattr(BitLinear, "packed_kernel", staticmethod(spy))
    want = reference_forward(layer, x)
    calls.clear()
    assert torch.equal(layer(x), want) and len(calls) == 1  # the installed path runs
    BitLinear.set_packed_kernel(None)
    assert torch.equal(layer(x), want) and len(calls) == 1  # reference, no kernel call
    try:
        import st_bitnet.ops as ops

        monkeypatch.setattr(ops, "_registered", False)
        register_kernels()
        assert BitLinear.packed_kernel is dispatch.packed_forward
    finally:
        BitLinear.set_packed_kernel(dispatch.packed_forward)


def test_kernel_switches_are_read_from_ops_modes(monkeypatch):
    from st_bitnet.ops import modes

    monkeypatch.setenv("ST_BITNET_GPU_WEIGHTS", "2bit")
    assert modes.gpu_weight_mode() == "2bit"
    monkeypatch.setenv("ST_BITNET_GPU_WEIGHTS", "fp8")
    with pytest.raises(ValueError, match="ST_BITNET_GPU_WEIGHTS"):
        modes.gpu_weight_mode()
    monkeypatch.setenv("ST_BITNET_CPU_ISA", "scalar")
    assert modes.cpu_isa() == "scalar"
    monkeypatch.delenv("ST_BITNET_CPU_ISA")
    assert modes.cpu_isa() == "native"
    with pytest.raises(ValueError, match="kernel mode"):
        modes.set_kernel_mode("fast")
    # the CPU kernel obeys the same switch: in reference mode it never asks for the C library
    monkeypatch.setattr(cpu_kernel, "load_library", lambda *a, **k: pytest.fail("library used in reference mode"))
    layer = _packed_layer(k=64, n=8)
    x = torch.randn(2, 64)
    modes.set_kernel_mode("reference")
    try:
        assert modes.kernel_mode() == "reference" and not modes.kernels_enabled()
        torch.ops.st_bitnet.ternary_linear(x, layer.weight, layer.weight_scale, layer.bias, 8, "packed2")
        layer(x)
    finally:
        modes.set_kernel_mode(None)


def test_cpu_kernel_self_test_passes_under_autocast():
    # the self-test decides once per process whether the kernel is used; an ambient autocast must not veto it
    lib = cpu_kernel.load_library("native")
    if lib is None:
        pytest.skip("no C compiler for the native CPU kernel")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cpu_kernel._self_test(lib)
