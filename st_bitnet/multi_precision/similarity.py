"""Code-space similarity kernels: popcount Hamming for 1 bit, integer dot for 8/4/2 bits, on packed code arrays.

Every score equals the cosine (or dot) of the dequantized vectors, so ranking in code space and ranking the
dequantized floats agree exactly:

- 1 bit: ``cos = 1 - 2 * hamming / dim`` (the dequantized vectors are ``+-1``).
- 2 / 4 / 8 bits: the dot of the odd centered integers ``m = 2c + 1 - 2**b`` (exact in float64), divided by the
  integer norms for cosine.
- 16 bits: float16 values in float32.

These functions take raw arrays whose precision the caller has checked; users call
:func:`st_bitnet.multi_precision.similarity` or :meth:`QuantizedEmbeddings.similarity`, which validate both sides.
"""

from __future__ import annotations

import numpy as np

from .packing import centered_codes, unpack_codes

METRICS = ("cosine", "dot")

# Pairs per chunk for the popcount: keeps the (rows, cols, bytes) XOR tensor around 64 MiB.
_HAMMING_CHUNK_BYTES = 1 << 26


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return np.unpackbits(x, axis=-1).reshape(*x.shape, 8).sum(-1, dtype=np.uint8)  # pragma: no cover


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(len(a), len(b))`` Hamming distances (``np.int32``) between rows of packed 1-bit codes, by XOR + popcount."""
    out = np.empty((len(a), len(b)), dtype=np.int32)
    rows = max(1, _HAMMING_CHUNK_BYTES // max(1, len(b) * a.shape[1]))
    for start in range(0, len(a), rows):
        block = a[start : start + rows, None, :] ^ b[None, :, :]
        out[start : start + rows] = _popcount(block).sum(-1, dtype=np.int32)
    return out


def code_similarity(a: np.ndarray, b: np.ndarray, bits: int, dim: int, metric: str = "cosine") -> np.ndarray:
    """``(len(a), len(b))`` float64 scores of two code arrays of one precision (packed bytes, float16 for 16 bits).

    Raises:
        ValueError: On an unknown metric.
    """
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; expected one of {METRICS}.")
    if bits == 1:
        dot = dim - 2.0 * hamming_matrix(a, b).astype(np.float64)  # dot of +-1 vectors
        return dot / dim if metric == "cosine" else dot
    if bits == 16:
        x, y = a.astype(np.float64), b.astype(np.float64)
        dot = x @ y.T
        if metric == "dot":
            return dot
        return dot / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)).clip(min=1e-12)
    # Integer dot of centered codes; float64 holds every partial sum exactly (|m| < 256, dim < 2**30).
    x = centered_codes(unpack_codes(a, bits, dim), bits).astype(np.float64)
    y = centered_codes(unpack_codes(b, bits, dim), bits).astype(np.float64)
    dot = x @ y.T
    if metric == "dot":
        return dot / float(1 << (2 * bits))  # the dot of the dequantized midpoints m / 2**b
    norms = np.outer(np.sqrt((x * x).sum(1)), np.sqrt((y * y).sum(1)))
    return dot / norms  # centered codes are odd, so no norm is zero
