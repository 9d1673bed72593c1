"""Code-space similarity of :class:`QuantizedEmbeddings`: popcount Hamming for 1 bit, integer dot for 8/4/2 bits.

Every score equals the cosine (or dot) of the dequantized vectors, so ranking in code space and ranking the
dequantized floats agree exactly:

- 1 bit: ``cos = 1 - 2 * hamming / dim`` (the dequantized vectors are ``+-1``).
- 2 / 4 / 8 bits: the dot of the odd centered integers ``m = 2c + 1 - 2**b`` (exact in float64), divided by the
  integer norms for cosine.
- 16 bits: float16 values in float32.
"""

from __future__ import annotations

import numpy as np

from .quantized_embeddings import QuantizedEmbeddings, as_quantized

METRICS = ("cosine", "dot")

# Pairs per chunk for the popcount: keeps the (rows, cols, bytes) XOR tensor around 64 MiB.
_HAMMING_CHUNK_BYTES = 1 << 26


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return np.unpackbits(x, axis=-1).reshape(*x.shape, 8).sum(-1, dtype=np.uint8)  # pragma: no cover


def hamming_distance(a: QuantizedEmbeddings, b: QuantizedEmbeddings) -> np.ndarray:
    """``(len(a), len(b))`` Hamming distances (``np.int32``) between 1-bit codes, by XOR + popcount."""
    a, b = as_quantized(a, "a"), as_quantized(b, "b")
    _check_compatible(a, b)
    if a.bits != 1:
        raise ValueError(f"Hamming distance is defined for 1-bit codes, got {a.precision}.")
    out = np.empty((len(a), len(b)), dtype=np.int32)
    rows = max(1, _HAMMING_CHUNK_BYTES // max(1, len(b) * a.codes.shape[1]))
    for start in range(0, len(a), rows):
        block = a.codes[start : start + rows, None, :] ^ b.codes[None, :, :]
        out[start : start + rows] = _popcount(block).sum(-1, dtype=np.int32)
    return out


def _check_compatible(a: QuantizedEmbeddings, b: QuantizedEmbeddings) -> None:
    if a.bits != b.bits:
        raise ValueError(
            f"Cannot compare {a.precision} with {b.precision} embeddings: mixed precisions in one search. "
            f"Encode both sides at one precision, or reduce the wider nested codes with .to_bits({min(a.bits, b.bits)})."
        )
    if a.dim != b.dim:
        raise ValueError(f"Dimension mismatch: {a.dim} vs {b.dim}.")


def similarity(a: QuantizedEmbeddings, b: QuantizedEmbeddings, metric: str = "cosine") -> np.ndarray:
    """``(len(a), len(b))`` float64 scores computed on the codes.

    Args:
        a: Query-side embeddings.
        b: Corpus-side embeddings, same precision and dimension as ``a``.
        metric: ``"cosine"`` (default) or ``"dot"`` (dot of the dequantized vectors).

    Raises:
        TypeError: If either side is not :class:`QuantizedEmbeddings`.
        ValueError: On mixed precisions, mismatched dimensions or an unknown metric.
    """
    a, b = as_quantized(a, "a"), as_quantized(b, "b")
    _check_compatible(a, b)
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; expected one of {METRICS}.")
    if a.bits == 1:
        hamming = hamming_distance(a, b).astype(np.float64)
        dot = a.dim - 2.0 * hamming  # dot of +-1 vectors
        return dot / a.dim if metric == "cosine" else dot
    if a.bits == 16:
        x, y = a.codes.astype(np.float64), b.codes.astype(np.float64)
        dot = x @ y.T
        if metric == "dot":
            return dot
        return dot / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)).clip(min=1e-12)
    # Integer dot of centered codes; float64 holds every partial sum exactly (|m| < 256, dim < 2**30).
    x, y = a.centered().astype(np.float64), b.centered().astype(np.float64)
    dot = x @ y.T
    if metric == "dot":
        return dot / float(1 << (2 * a.bits))  # the dot of the dequantized midpoints m / 2**b
    norms = np.outer(np.sqrt((x * x).sum(1)), np.sqrt((y * y).sum(1)))
    return dot / norms  # centered codes are odd, so no norm is zero
