"""Choose the training compute dtype at run time: bf16 autocast where this CPU multiplies bf16 natively.

On CPUs with bf16 matrix units (Intel AMX) or bf16 dot-product instructions (AVX512_BF16: Zen 4, Cooper Lake)
oneDNN runs bf16 GEMMs several times faster than float32; elsewhere bf16 is emulated and slower. The latent
BitLinear's integer-valued operands (ternary weights, int8 activations) are exact in bf16 and oneDNN accumulates
in float32, so its forward product stays exact; the quantizer scales stay float32 (see ``BitLinear._qat_forward``).

``training.bf16: auto`` in a recipe resolves here: a short GEMM probe on the running machine decides, and the
choice is logged. An explicit ``true`` / ``false`` is kept as written.
"""

from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger(__name__)

# bf16 must beat float32 by this factor on the probe to be chosen (below it the lost precision buys too little).
MIN_BF16_SPEEDUP = 1.3
_PROBE_SHAPE = (512, 384, 1536)  # tokens x in x out: one MiniLM-sized FFN projection


def _gemm_seconds(dtype: torch.dtype, repeats: int = 5) -> float:
    m, k, n = _PROBE_SHAPE
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    a @ b  # warm-up: oneDNN picks its kernel on the first call
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def cpu_bf16_speedup() -> float:
    """float32 / bf16 time of one GEMM on this CPU with the current thread count (>1: bf16 is faster)."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if supported is not None and not supported():
        return 0.0
    return _gemm_seconds(torch.float32) / _gemm_seconds(torch.bfloat16)


def resolve_bf16(value, use_cpu: bool) -> tuple[bool, str]:
    """``training.bf16`` -> (bf16 on or off, the reason logged). ``value``: True, False, None or ``"auto"``."""
    if value is None or isinstance(value, bool):
        return bool(value), "set in the recipe"
    if value != "auto":
        raise ValueError(f"training.bf16 must be true, false or auto, got {value!r}")
    if not use_cpu and torch.cuda.is_available():
        ok = torch.cuda.is_bf16_supported()
        return ok, f"auto: CUDA device {'supports' if ok else 'lacks'} bf16"
    speedup = cpu_bf16_speedup()
    chosen = speedup >= MIN_BF16_SPEEDUP
    reason = (f"auto: bf16 GEMM {speedup:.2f}x float32 on this CPU "
              f"({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}); "
              f"{'bf16 autocast' if chosen else 'float32'}")  # fmt: skip
    return chosen, reason


def autocast_forward(module: torch.nn.Module) -> torch.nn.Module:
    """Run ``module``'s forward under CPU bf16 autocast, float32 tensors out (in place; returns the module).

    The transformers Trainer does not autocast on the CPU even with ``bf16=True``; this wraps the student's (and
    the teacher's) forward the way accelerate wraps a model on GPU, so the losses' own arithmetic (similarity
    softmaxes at small temperatures) stays float32.
    """
    if getattr(module, "_st_bitnet_autocast", False):
        return module
    forward = module.forward

    def to_float(value):
        if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
            return value.float()
        if isinstance(value, dict):
            return type(value)({k: to_float(v) for k, v in value.items()}) if type(value) is dict else \
                {k: to_float(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(to_float(v) for v in value)
        return value

    def autocast_wrapped(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        return to_float(out)

    module.forward = autocast_wrapped
    module._st_bitnet_autocast = True
    return module


def remove_autocast_forward(module: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`autocast_forward` (the module's own forward again); a no-op on an unwrapped module."""
    if getattr(module, "_st_bitnet_autocast", False):
        del module.forward  # the instance attribute; the class's forward shows through again
        del module._st_bitnet_autocast
    return module
