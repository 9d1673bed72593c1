"""CPU kernel of ``st_bitnet::ternary_linear``: a plain C library built at first use, called via ctypes.

Why not a torch C++ extension: it needs ninja and torch's headers and takes ~1 minute to build; this C
file needs only the system compiler (``cc``/``gcc``/``clang``, with OpenMP when available) and builds
in about a second. The build is cached under ``$ST_BITNET_CACHE`` (default
``~/.cache/st_bitnet/kernels``), keyed by the source, the compiler, its flags and the CPU's features,
so a changed CPU or compiler rebuilds. When no compiler works, the op falls back to the pure-PyTorch
reference with one warning.

The library reads the ``tile16`` layout; the op accepts every layout and converts others once per
weight tensor (cached by identity + version), so the module path (:mod:`st_bitnet.ops.dispatch`)
passes ``tile16`` directly and nothing is repacked per call.

Environment: ``ST_BITNET_CPU_ISA=native|avx2|scalar`` forces a build variant (default ``native``:
``-march=native``, the C file picks AVX-512 VNNI / AVX2 / NEON dotprod / scalar from the compiler's
macros).

AMX: on CPUs that report AMX-TILE + AMX-INT8 (Intel Sapphire Rapids and later), :func:`amx_library` builds the
same source once more with ``-DST_WITH_AMX -mamx-tile -mamx-int8``, asks the OS for the tile registers
(``st_amx_init``: CPUID + ``arch_prctl``, safe on any CPU) and runs a self-test against the reference; only a
library that passes all three is used (``ST_BITNET_CPU_AMX=off`` disables it). Its weights are ``amx64`` int8
tiles (:func:`st_bitnet.ops.layouts.pack_amx64`), built once per layer.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from .layouts import AMX_TILE_K, decode_weight, has_invalid_codes, pack_amx64, pack_tile16
from .modes import cpu_amx_mode, cpu_isa, kernels_enabled
from .ternary_linear import check_inputs, reference_impl, ternary_linear
from .weight_cache import WeightCache

SOURCE = Path(__file__).with_name("ternary_linear_cpu.c")
ABI_VERSION = 2
VARIANTS = ("native", "avx2", "scalar")
AMX_FLAGS = ("-mamx-tile", "-mamx-int8", "-DST_WITH_AMX")
# Below this many tokens the AMX path's 16-row tiles are mostly padding: the VNNI path is used.
AMX_MIN_TOKENS = 16

_lock = threading.Lock()
_libs: dict[str, object] = {}  # variant -> ctypes.CDLL, or an error string when the build failed
_warned = False


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("ST_BITNET_CACHE")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "st_bitnet" / "kernels"


def _find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    sig = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name", "CPU part")):
                    sig.append(line.strip())
                    if len(sig) > 6:
                        break
    except OSError:
        sig.append(platform.processor())
    return "\n".join(sig)


def _variant_flags(variant: str) -> list[str]:
    if variant == "native":
        return ["-march=native"]
    if variant == "avx2":
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise RuntimeError("the avx2 variant needs an x86-64 CPU")
        return ["-mavx2", "-mfma", "-mno-avx512f"]
    if variant == "scalar":
        return ["-DST_FORCE_SCALAR"]
    if variant == "amx":
        return ["-march=native", *AMX_FLAGS]
    raise ValueError(f"unknown CPU kernel variant {variant!r}; expected one of {VARIANTS}")


_BASE_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")


class CompileInterrupted(RuntimeError):
    """The compiler was killed (a signal, e.g. Ctrl-C): no fallback build is tried or cached."""


def _build_attempts(flags: list[str]) -> list[list[str]]:
    """Flag sets to try, best first: OpenMP, then without (e.g. Apple clang without libomp); the variant's
    ``-march`` flags, then without them (compilers that do not know ``-march=native``)."""
    attempts = []
    for omp in (["-fopenmp"], []):
        # the AMX build needs its -march target (no fallback without it)
        marches = (flags,) if "-DST_WITH_AMX" in flags else (flags, [f for f in flags if not f.startswith("-march")])
        for march in marches:
            if [*march, *omp] not in attempts:
                attempts.append([*march, *omp])
    return attempts


def _compile(cc: str, flags: list[str], out: Path) -> str | None:
    """Compile with exactly ``flags``; returns None on success, else the compiler's error text."""
    cmd = [cc, *_BASE_FLAGS, *flags, str(SOURCE), "-o", str(out), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode < 0:
        raise CompileInterrupted(f"the compiler was killed by signal {-proc.returncode}: {' '.join(cmd)}")
    if proc.returncode == 0:
        return None
    return f"{' '.join(cmd)}\n{proc.stderr[-2000:]}"


def library_path(variant: str, cc: str, flags: list[str]) -> Path:
    """Cache file of the library built by ``cc`` with exactly ``flags`` (the key covers source, compiler, flags,
    CPU and ABI, so a fallback build never sits under the key of the flags it could not use)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(
        b"\0".join(
            s.encode()
            for s in (SOURCE.read_text(), cc, *version, " ".join(flags), _cpu_signature(), str(ABI_VERSION))
        )
    ).hexdigest()[:16]
    suffix = ".dll" if sys.platform == "win32" else ".so"
    return cache_dir() / f"ternary_linear_cpu-{variant}-{key}{suffix}"


def build_library(variant: str = "native") -> Path:
    """Compile (or find in the cache) the kernel library for ``variant``; returns the ``.so`` path.

    Flag sets are tried best first (:func:`_build_attempts`); a cached library counts only for the flags it was
    built with, and a compile killed midway raises :class:`CompileInterrupted` instead of falling back.
    """
    cc = _find_compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang)")
    errors = []
    for flags in _build_attempts(_variant_flags(variant)):
        target = library_path(variant, cc, flags)
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # build under a temporary name, then rename: no process ever loads (or caches) a half-written file
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=target.suffix, dir=target.parent)
        os.close(fd)
        try:
            error = _compile(cc, flags, Path(tmp))
            if error is None:
                os.replace(tmp, target)
                return target
            errors.append(error)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"compiling the CPU kernel failed:\n{errors[-1]}")


def _bind(path: Path):
    lib = ctypes.CDLL(str(path))
    i64, f32, i32, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
    lib.st_isa.restype = ctypes.c_char_p
    lib.st_abi_version.restype = ctypes.c_int
    lib.st_has_openmp.restype = ctypes.c_int
    if lib.st_abi_version() != ABI_VERSION:
        raise RuntimeError(f"stale CPU kernel library at {path}")
    lib.st_ternary_linear_f32.restype = ctypes.c_int
    lib.st_ternary_linear_f32.argtypes = [
        vp, i64, i64, i64, vp, f32, i32, vp, vp, i64, i64, f32, vp, vp, i64, vp, vp, vp, i32
    ]
    lib.st_quantize_f32.restype = ctypes.c_int
    lib.st_quantize_f32.argtypes = [vp, i64, i64, i64, vp, f32, i32, vp, i64, vp, vp, vp]
    lib.st_mean_sq_f32.restype = ctypes.c_int
    lib.st_mean_sq_f32.argtypes = [vp, i64, i64, i64, i32, vp]
    if hasattr(lib, "st_amx_init"):
        lib.st_amx_init.restype = ctypes.c_int
        lib.st_amx_init.argtypes = []
        lib.st_ternary_linear_amx_f32.restype = ctypes.c_int
        lib.st_ternary_linear_amx_f32.argtypes = [
            vp, i64, i64, i64, vp, f32, i32, vp, vp, i64, i64, f32, vp, vp, i64, vp, vp, i32
        ]
    return lib


def load_library(variant: str | None = None):
    """The ctypes library for ``variant`` (default: ``$ST_BITNET_CPU_ISA`` or ``native``); None if unusable.

    The first failure warns once and is remembered, so callers fall back to the reference quietly.
    """
    global _warned
    variant = variant or cpu_isa()
    lib = _libs.get(variant)
    if lib is None:
        with _lock:
            lib = _libs.get(variant)
            if lib is None:
                try:
                    lib = _bind(build_library(variant))
                    _self_test(lib)
                except Exception as e:  # no compiler, failed build, failed self-test
                    lib = f"{type(e).__name__}: {e}"
                _libs[variant] = lib
    if isinstance(lib, str):
        if not _warned:
            _warned = True
            warnings.warn(
                f"st_bitnet: the CPU ternary kernel is unavailable ({lib.splitlines()[0][:300]}); using the "
                "slower pure-PyTorch reference (same numbers).",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    return lib


def available(variant: str | None = None) -> bool:
    return load_library(variant) is not None


def isa(variant: str | None = None) -> str | None:
    lib = load_library(variant)
    return None if lib is None else lib.st_isa().decode()


def cpu_reports_amx() -> bool:
    """Whether the kernel's CPU flags list AMX-TILE and AMX-INT8 (Linux ``/proc/cpuinfo``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"amx_tile", "amx_int8"} <= flags
    except OSError:
        pass
    return False


def amx_library():
    """The AMX-enabled library when this process may use it, else None (decided once per process).

    Needs: ``ST_BITNET_CPU_AMX`` not ``off``, the default ``native`` ISA, x86-64 Linux whose CPU flags list
    AMX-INT8, a compiler that builds the AMX variant, ``st_amx_init() == 0`` (CPUID and the OS permission) and
    a self-test bit-identical to the reference. A CPU that reports AMX but fails a later step warns once.
    """
    if cpu_amx_mode() == "off" or cpu_isa() != "native":
        return None
    lib = _libs.get("amx")
    if lib is None:
        with _lock:
            lib = _libs.get("amx")
            if lib is None:
                lib = _load_amx()
                _libs["amx"] = lib
    if isinstance(lib, str):
        return None
    return lib


def amx_library_for(x: torch.Tensor):
    """:func:`amx_library` when ``x`` holds at least :data:`AMX_MIN_TOKENS` rows of features, else None."""
    if x.shape[-1] == 0 or x.numel() // x.shape[-1] < AMX_MIN_TOKENS:
        return None
    return amx_library()


def _load_amx():
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform != "linux" or not cpu_reports_amx():
        return "the CPU reports no AMX-INT8"
    try:
        lib = _bind(build_library("amx"))
        rc = lib.st_amx_init()
        if rc != 0:
            raise RuntimeError(f"st_amx_init returned {rc} (no AMX-INT8 in CPUID, or the OS refused the tile data)")
        _self_test_amx(lib)
        return lib
    except Exception as e:
        message = f"{type(e).__name__}: {e}"
        warnings.warn(f"st_bitnet: the CPU reports AMX but its kernel is unusable ({message.splitlines()[0][:300]}); "
                      "using the AVX-512 VNNI path (same numbers).", RuntimeWarning, stacklevel=4)
        return message


# --------------------------------------------------------------------------------------------------
# Calling
# --------------------------------------------------------------------------------------------------
# torch splits a single row's sum over threads from this length on (TensorIterator's GRAIN_SIZE); the C
# replay of its summation order is only used below it.
_SUMSQ_MAX_K = 32768
_vec_widths: dict[int, int | None] = {}  # id(lib) -> torch's summation width (None: replay unusable)


def _probe_vec_width(lib) -> int | None:
    """The lane count of torch's float sum (``Vectorized<float>::size()`` of the kernel ``sum`` dispatches
    to: 8 with AVX2 *and* AVX-512, since ATen does not dispatch ``sum`` to AVX-512), found by comparing
    the C replay of its summation order with ``x.pow(2).mean(-1)`` on awkward lengths. None when no
    width reproduces torch exactly; the fused norm then takes torch's own variance (still exact)."""
    key = id(lib)
    if key not in _vec_widths:
        g = torch.Generator().manual_seed(0)
        lengths = [*range(1, 70), 127, 128, 129, 255, 257, 640, 1000, 1024, 2048, 3072, 4099, 16411]
        scales = [10 ** float(torch.empty(()).uniform_(-4, 4, generator=g)) for _ in lengths]
        rows = [torch.randn(3, k, generator=g) * c for k, c in zip(lengths, scales)]
        found = None
        for vw in (8, 16, 4, 32):
            ok = True
            for x in rows:
                want = x.pow(2).mean(-1)
                got = torch.empty(x.shape[0])
                lib.st_mean_sq_f32(x.data_ptr(), x.shape[0], x.shape[1], x.shape[1], vw, got.data_ptr())
                if not torch.equal(got, want):
                    ok = False
                    break
            if ok:
                found = vw
                break
        _vec_widths[key] = found
    return _vec_widths[key]


def _kernel_inputs(lib, x: torch.Tensor, bias, weight_scale, norm_weight):
    """What both C entry points take besides the weights: flat float32 rows and the norm / scale / bias pointers."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if norm_weight is not None:
        if x2.dtype != torch.float32 or norm_weight.dtype != torch.float32 or norm_weight.numel() != k:
            raise ValueError("a fused norm needs float32 x and a float32 norm weight of size in_features")
        norm_weight = norm_weight.detach().contiguous()
    elif x2.dtype != torch.float32:
        x2 = x2.float()  # exact for bf16/fp16; the reference rounds float64 the same way
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    ws = float(weight_scale.detach().reshape(()).to(torch.float32))
    nw_ptr, vw, var = None, 0, None
    if norm_weight is not None and x2.shape[0]:
        nw_ptr = norm_weight.data_ptr()
        vw = _probe_vec_width(lib) or 0
        # torch's summation order also depends on the input's memory layout: the replay covers
        # contiguous inputs; otherwise take torch's own variance of the original x (exact by definition)
        if vw == 0 or k >= _SUMSQ_MAX_K or not x.is_contiguous():
            var = x.pow(2).mean(-1).reshape(-1).contiguous()
    # norm_weight and b are returned so that their memory lives as long as the pointers are used
    return x2, b, ws, norm_weight, nw_ptr, vw, var


def run_tile16(
    lib,
    x: torch.Tensor,
    blob: torch.Tensor,
    weight_scale: torch.Tensor,
    bias,
    out_features: int,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
):
    """Run the library on a ``tile16`` blob; returns ``(..., N)`` in ``x.dtype``.

    With ``norm_weight`` (float32 ``x`` and weight only), the library first applies BitRMSNorm
    (``norm_weight * (x * rsqrt(mean(x**2) + norm_eps))``, the arithmetic of
    :class:`st_bitnet.bitlinear.BitRMSNorm`) in its quantization pass, bit for bit like the unfused
    ``ternary_linear_reference(BitRMSNorm(x), ...)``.
    """
    k = x.shape[-1]
    x2, b, ws, norm_weight, nw_ptr, vw, var = _kernel_inputs(lib, x, bias, weight_scale, norm_weight)
    m = x2.shape[0]
    kp = blob.shape[1] * 16
    y = torch.empty(m, out_features, dtype=torch.float32)
    if m:
        xq = torch.empty(m * kp, dtype=torch.int8)
        xs = torch.empty(m, dtype=torch.float32)
        xsum = torch.empty(m, dtype=torch.int32)
        rc = lib.st_ternary_linear_f32(
            x2.data_ptr(), m, k, x2.stride(0) if m > 1 else k, nw_ptr, float(norm_eps), vw,
            None if var is None else var.data_ptr(), blob.data_ptr(), out_features, kp, ws,
            None if b is None else b.data_ptr(), y.data_ptr(), out_features, xq.data_ptr(), xs.data_ptr(),
            xsum.data_ptr(), torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"st_bitnet CPU kernel rejected its arguments (code {rc})")
    y = y.reshape(*x.shape[:-1], out_features)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def run_amx64(
    lib,
    x: torch.Tensor,
    blob: torch.Tensor,
    weight_scale: torch.Tensor,
    bias,
    out_features: int,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-6,
):
    """:func:`run_tile16` on the AMX path: ``blob`` is an ``amx64`` tensor, ``lib`` from :func:`amx_library`."""
    if blob.dtype != torch.int8 or blob.dim() != 4 or blob.shape[2:] != (16, 64):
        raise ValueError(f"run_amx64 expects an amx64 int8 blob (nb, kb, 16, 64), got {blob.dtype} {tuple(blob.shape)}")
    k = x.shape[-1]
    x2, b, ws, norm_weight, nw_ptr, vw, var = _kernel_inputs(lib, x, bias, weight_scale, norm_weight)
    m = x2.shape[0]
    kp = blob.shape[1] * AMX_TILE_K
    y = torch.empty(m, out_features, dtype=torch.float32)
    if m:
        xq = torch.empty(-(-m // 16) * 16 * kp, dtype=torch.int8)
        xs = torch.empty(m, dtype=torch.float32)
        rc = lib.st_ternary_linear_amx_f32(
            x2.data_ptr(), m, k, x2.stride(0) if m > 1 else k, nw_ptr, float(norm_eps), vw,
            None if var is None else var.data_ptr(), blob.data_ptr(), out_features, kp, ws,
            None if b is None else b.data_ptr(), y.data_ptr(), out_features, xq.data_ptr(), xs.data_ptr(),
            torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"st_bitnet AMX kernel rejected its arguments (code {rc})")
    y = y.reshape(*x.shape[:-1], out_features)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


_cache = WeightCache()


def tile16_weight(weight: torch.Tensor, layout: str, out_features: int, in_features: int) -> torch.Tensor:
    """The ``tile16`` form of ``weight`` (validated; converted once per weight tensor and version)."""

    def build():
        if layout == "tile16":
            if has_invalid_codes(weight):
                raise ValueError("tile16 ternary weight holds the invalid 2-bit code 3 (corrupt data?)")
            return weight.contiguous()
        return pack_tile16(decode_weight(weight, layout, out_features, in_features))

    return _cache.get(weight, f"tile16<-{layout}", build)


def amx64_weight(weight: torch.Tensor, layout: str, out_features: int, in_features: int) -> torch.Tensor:
    """The ``amx64`` form of ``weight`` (validated; converted once per weight tensor and version)."""
    return _cache.get(weight, f"amx64<-{layout}",
                      lambda: pack_amx64(decode_weight(weight, layout, out_features, in_features)))


def ternary_linear_cpu(x, weight, weight_scale, bias, out_features, layout):
    """CPU implementation registered on the op: the C kernel, or the reference when unavailable."""
    check_inputs(x, weight, weight_scale, bias, out_features, layout)
    lib = load_library() if kernels_enabled() else None
    if lib is None:
        return reference_impl(x, weight, weight_scale, bias, out_features, layout)
    amx = amx_library_for(x)
    if amx is not None:
        return run_amx64(amx, x, amx64_weight(weight, layout, out_features, x.shape[-1]), weight_scale, bias, out_features)
    blob = tile16_weight(weight, layout, out_features, x.shape[-1])
    return run_tile16(lib, x, blob, weight_scale, bias, out_features)


_registered = False


def register() -> None:
    """Register the CPU kernel on the op (idempotent; cheap: the library builds at the first call)."""
    global _registered
    if not _registered:
        ternary_linear.register_kernel("cpu")(ternary_linear_cpu)
        _registered = True


def _self_test(lib) -> None:
    """Refuse a library that disagrees with the reference on a small awkward problem (miscompiles)."""
    from ..bitlinear import BitRMSNorm, ternary_linear_reference

    g = torch.Generator().manual_seed(0)
    for m, k, n in ((5, 70, 37), (9, 33, 18), (1, 16, 1)):
        x = torch.randn(m, k, generator=g)
        w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
        ws = torch.tensor([1.7])
        bias = torch.randn(n, generator=g)
        got = run_tile16(lib, x, pack_tile16(w), ws, bias, n)
        want = ternary_linear_reference(x, w, ws, bias)
        norm = BitRMSNorm(k, eps=1e-6)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5, generator=g)
            want_normed = ternary_linear_reference(norm(x), w, ws, bias)
        got_normed = run_tile16(lib, x, pack_tile16(w), ws, bias, n, norm.weight, norm.variance_epsilon)
        if not (torch.equal(got, want) and torch.equal(got_normed, want_normed)):
            raise RuntimeError(f"CPU kernel self-test failed ({lib.st_isa().decode()}, shape {m}x{k}x{n})")


def _self_test_amx(lib) -> None:
    """Refuse an AMX library that disagrees with the reference (tails in M, N and K, bias, fused norm)."""
    from ..bitlinear import BitRMSNorm, ternary_linear_reference

    g = torch.Generator().manual_seed(1)
    for m, k, n in ((1, 70, 37), (17, 33, 18), (40, 200, 50), (16, 64, 16), (33, 129, 70)):
        x = torch.randn(m, k, generator=g)
        w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
        ws = torch.tensor([1.3])
        bias = torch.randn(n, generator=g)
        norm = BitRMSNorm(k, eps=1e-6)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5, generator=g)
            want_normed = ternary_linear_reference(norm(x), w, ws, bias)
        got = run_amx64(lib, x, pack_amx64(w), ws, bias, n)
        got_normed = run_amx64(lib, x, pack_amx64(w), ws, bias, n, norm.weight, norm.variance_epsilon)
        if not (torch.equal(got, ternary_linear_reference(x, w, ws, bias)) and torch.equal(got_normed, want_normed)):
            raise RuntimeError(f"AMX kernel self-test failed (shape {m}x{k}x{n})")
